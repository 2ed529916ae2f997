"""The needle / associative-recall family: one fact hidden in any text, swept over length and depth.

The fact is the shipped recall task's (``The code of KEY is VALUE.``, asked as ``What is
the code of KEY?``, see :mod:`oprm_rag.demo.recall_task`), so the shipped model can run
it; any instruction-following model can too. The haystack is held-out prose by default,
or sentences of your own text (``--haystack FILE``). Optional distractor facts (other
keys, ``--distractors`` per 1,000 tokens) turn the needle test into associative recall:
the more facts, the sooner a fixed-size state overflows.

Each cell (context length x needle depth) is answered ``trials`` times with different
keys, values and filler, in vanilla and OPRM mode; the usual heatmap (accuracy by
length and depth, one panel per mode) is written as a PNG.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import InputError
from .datasets import Example

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Engine

__all__ = ["needle_examples", "needle_score", "needle_summary", "plot_heatmap", "haystack_sentences",
           "needle_markdown"]

_DIGITS = re.compile(r"\d+")


def haystack_sentences(path: str | Path | None = None) -> tuple[str, ...]:
    """Filler sentences: the shipped held-out prose, or the sentences of a text file."""
    from ..demo.recall_task import heldout_prose, split_sentences

    if path is None:
        return heldout_prose()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--haystack {p}: cannot read it as UTF-8 text ({exc})") from None
    sentences = tuple(s for s in split_sentences(text) if "code of" not in s)
    if len(sentences) < 5:
        raise InputError(f"--haystack {p}: found {len(sentences)} sentences; give a text of at least a few "
                         "paragraphs of prose")
    return sentences


def _chars_per_token(model: "Engine", sentences: Sequence[str]) -> float:
    sample = " ".join(sentences[:200])[:8000]
    n = len(model.encode(sample))
    return max(1.0, len(sample) / max(1, n))


def needle_examples(model: "Engine", lengths: Sequence[int], depths: Sequence[float], trials: int, *, seed: int = 0,
                    sentences: Sequence[str] | None = None, distractors_per_1k: float = 0.0) -> list[Example]:
    """One example per (length, depth, trial): a haystack of about ``length`` tokens with the
    needle at ``depth`` (0 = start, 1 = end) of its sentences. Deterministic for a seed."""
    from ..demo.recall_task import Fact, fact_sentence, new_keys, question_for, random_value

    if not lengths or not depths or trials < 1:
        raise InputError("the needle sweep needs at least one length, one depth and one trial")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise InputError(f"needle depths are fractions of the text, 0 to 1; got {d}")
    sents = tuple(sentences) if sentences is not None else haystack_sentences()
    cpt = _chars_per_token(model, sents)
    out: list[Example] = []
    for length in lengths:
        if length < 16:
            raise InputError(f"needle lengths are in tokens, at least 16; got {length}")
        for depth in depths:
            for trial in range(trials):
                rng = random.Random(f"{seed}:{length}:{depth}:{trial}")
                filler: list[str] = []
                chars = 0
                while chars < length * cpt:
                    s = rng.choice(sents)
                    filler.append(s)
                    chars += len(s) + 1
                n_distract = int(round(distractors_per_1k * length / 1000))
                keys = new_keys(rng, n_distract + 1)
                needle = Fact(keys[0], random_value(rng))
                for k in keys[1:]:  # distractors anywhere
                    filler.insert(rng.randint(0, len(filler)), fact_sentence(Fact(k, random_value(rng))))
                at = int(round(depth * len(filler)))
                filler.insert(at, fact_sentence(needle))
                text = " ".join(filler)
                out.append(Example(
                    id=f"L{length}-D{depth:g}-T{trial}", dataset="needle", context=text,
                    input=question_for(needle.key), answers=[needle.value],
                    meta={"length": length, "depth": depth, "trial": trial, "distractors": n_distract}))
    return out


def needle_score(prediction: str, value: str) -> float:
    """1 when the first number in the answer is the needle's value."""
    found = _DIGITS.search(prediction)
    return float(found is not None and found.group(0) == value)


def needle_summary(records: Sequence[Mapping[str, Any]], modes: Sequence[str], lengths: Sequence[int],
                   depths: Sequence[float], *, model: str | None = None, chunk_tokens: Any = None) -> dict[str, Any]:
    """Accuracy per (depth, length) cell and per length, for each mode."""
    grid: dict[str, list[list[float | None]]] = {}
    by_length: dict[str, dict[str, float | None]] = {}
    for m in modes:
        rows = []
        for d in depths:
            row = []
            for n in lengths:
                s = [float(r["score"]) for r in records
                     if r.get("mode") == m and r.get("length") == n and float(r.get("depth", -1)) == float(d)]
                row.append(round(sum(s) / len(s), 3) if s else None)
            rows.append(row)
        grid[m] = rows
        by_length[m] = {}
        for n in lengths:
            s = [float(r["score"]) for r in records if r.get("mode") == m and r.get("length") == n]
            by_length[m][str(n)] = round(sum(s) / len(s), 3) if s else None
    tokens = {}
    for n in lengths:
        t = [r.get("tokens") for r in records if r.get("length") == n and isinstance(r.get("tokens"), int)]
        tokens[str(n)] = round(sum(t) / len(t)) if t else None
    return {"benchmark": "needle", "model": model, "modes": list(modes), "lengths": list(lengths),
            "depths": list(depths), "accuracy": grid, "accuracy_by_length": by_length, "measured_tokens": tokens,
            "chunk_tokens": chunk_tokens}


def needle_markdown(summary: Mapping[str, Any]) -> str:
    """Accuracy by length for each mode, as a Markdown table."""
    modes = summary["modes"]
    lines = [f"Model: {summary.get('model') or '?'}", "",
             "| length (tokens) | measured tokens | " + " | ".join(modes) + " |",
             "| --- | --- | " + " | ".join("---" for _ in modes) + " |"]
    for n in summary["lengths"]:
        vals = [summary["accuracy_by_length"][m][str(n)] for m in modes]
        lines.append(f"| {n} | {summary['measured_tokens'].get(str(n)) or '-'} | "
                     + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def _display_name(model: "Engine") -> str:
    from .._about import DEMO_MODEL

    if not model:
        return "?"
    if Path(str(model)).resolve() == Path(DEMO_MODEL).resolve():
        return "the shipped demo model (Mamba-2, 0.6M parameters, trained on 512-token contexts)"
    return Path(str(model)).name if Path(str(model)).exists() else str(model)


def plot_heatmap(summary: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """The needle heatmap: accuracy by context length (x) and needle depth (y), a panel per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("the needle heatmap needs matplotlib: pip install matplotlib (or 'oprm-rag[plot]')") from None
    modes, lengths, depths = summary["modes"], summary["lengths"], summary["depths"]
    fig, axes = plt.subplots(1, len(modes), figsize=(1.2 + 1.0 * len(lengths) * len(modes) + 1.5,
                                                     1.4 + 0.45 * len(depths)), squeeze=False)
    image = None
    for ax, m in zip(axes[0], modes):
        grid = [[float("nan") if v is None else v for v in row] for row in summary["accuracy"][m]]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n:,}" for n in lengths], rotation=0, fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)")
        if ax is axes[0][0]:
            ax.set_ylabel("needle depth")
        label = "OPRM" if m == "oprm" else "vanilla (whole context)"
        if m == "oprm" and summary.get("chunk_tokens"):
            label += f", chunks of {summary['chunk_tokens']} tokens"
        ax.set_title(label, fontsize=10)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:  # not NaN
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, pad=0.02, label="accuracy")
    fig.suptitle(title or f"Needle in a haystack: {_display_name(summary.get('model'))}", fontsize=10, y=1.06)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
