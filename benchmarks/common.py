"""Shared helpers: the model under test, timing, documents, and writing results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes (CI runs this)")
    p.add_argument("--model", default=None, help="model folder (default: the shipped demo model)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write JSON and PNG")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


def setup(args: argparse.Namespace):
    import torch

    from oprm_rag import DEMO_MODEL
    from oprm_rag.engine.resolve import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model or DEMO_MODEL)


def document_run(description: str, quick: tuple[int, int] = (2048, 256), full: tuple[int, int] = (32768, 1024)):
    """Parse the options of a one-document timing benchmark and load the model.

    Returns ``(args, lm, doc_tokens, chunk_tokens, repeat)``: the sizes are the options'
    when given, else the quick or the full defaults.
    """
    p = parser(description)
    p.add_argument("--doc-tokens", type=int, default=None)
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    lm = setup(args)
    doc_tokens, chunk = quick if args.quick else full
    return args, lm, args.doc_tokens or doc_tokens, args.chunk_tokens or chunk, 1 if args.quick else args.repeat


def machine() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Median wall time of ``repeat`` runs, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def recall_document(lm: Any, n_facts: int, tokens: int, seed: int):
    """Held-out prose with ``n_facts`` facts, about ``tokens`` model tokens long."""
    from oprm_rag.demo.recall_task import build_document, heldout_prose

    rng = random.Random(seed)
    doc = build_document(rng, heldout_prose(), n_facts, int(tokens * 4.0))
    n = lm.count_tokens(doc.text)
    if n < tokens * 0.95 or n > tokens * 1.05:  # one correction for this tokenizer's chars per token
        rng = random.Random(seed)
        doc = build_document(rng, heldout_prose(), n_facts, int(tokens * 4.0 * tokens / max(1, n)))
    return doc


def write(name: str, out_dir: Path, data: dict[str, Any], plot: Callable[[Any], None] | None,
          quick: bool = False) -> Path:
    """Write ``name.json`` (and ``name.png`` from ``plot(ax_or_fig)``); quick runs get a suffix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_quick" if quick else name
    data = {"benchmark": name, "quick": quick, "machine": machine(), **data}
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(7.5, 4.2), dpi=120)
        plot(fig)
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}.png")
        plt.close(fig)
    print(f"wrote {path}")
    return path


def follow_up_plot(rows: list[dict[str, Any]], baseline: str, baseline_label: str,
                   bytes_label: str) -> Callable[[Any], None]:
    """A ``write`` plot for per-family follow-up rows: the follow-up's speed-up over
    ``baseline`` (a row key) and over the first question, and the state bytes per chunk."""

    def plot(fig: Any) -> None:
        ax, bx = fig.subplots(1, 2)
        names = [r["family"] for r in rows]
        y = range(len(rows))
        ax.barh([i + 0.2 for i in y], [r[baseline] for r in rows], height=0.4, color="#2ca02c",
                label=baseline_label)
        ax.barh([i - 0.2 for i in y], [r["speedup_vs_first"] for r in rows], height=0.4, color="#7f7f7f",
                label="vs the first question")
        ax.set_yticks(list(y), names, fontsize=7)
        ax.set_xlabel("follow-up speed-up (x)")
        ax.legend(fontsize=7)
        ax.set_title(f"{rows[0]['doc_tokens']:,}-token document, {rows[0]['chunk_tokens']}-token chunks", fontsize=8)
        bx.barh(list(y), [r["state_bytes_per_chunk"] / 1024 for r in rows], color="#1f77b4")
        bx.set_yticks(list(y), names, fontsize=7)
        bx.set_xlabel(bytes_label)

    return plot


def embedding_counter(lm: Any) -> tuple[dict[str, int], Any]:
    """A counter of the tokens ``lm``'s model embeds (``counter["tokens"]``), and the hook to
    remove: what a follow-up really ran, counted outside the project's own bookkeeping."""
    seen = {"tokens": 0}
    hook = lm.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: seen.__setitem__("tokens", seen["tokens"] + int(args[0].numel())))
    return seen, hook


@dataclass
class FollowUp:
    """A first question and a repeated follow-up on one cached selector, timed, with the
    tokens the model embedded for each (counted by :func:`embedding_counter`)."""

    selector: Any
    first: Any
    again: Any
    first_seconds: float
    follow_up_seconds: float  # the fastest of the repeats
    embedded_first: int
    embedded_follow_up: int


def time_follow_up(lm: Any, text: str, question: str, follow: str, repeat: int, **options: Any) -> FollowUp:
    """Ask ``question`` about ``text`` with a fresh 2 GiB document cache, then ``follow``
    ``repeat`` times from its cached chunk states (4 answer tokens each)."""
    from oprm_rag import OPRMSelector
    from oprm_rag.storage.cache import DocumentStateCache

    seen, hook = embedding_counter(lm)
    try:
        sel = OPRMSelector(lm, cache=DocumentStateCache(max_bytes=2 * 2**30), **options)
        t0 = time.perf_counter()
        first = sel.answer(question, text, max_new_tokens=4)
        t_first = time.perf_counter() - t0
        embedded_first = seen["tokens"]
        times = []
        for _ in range(repeat):
            seen["tokens"] = 0
            t0 = time.perf_counter()
            again = sel.answer(follow, text, max_new_tokens=4)
            times.append(time.perf_counter() - t0)
        return FollowUp(sel, first, again, t_first, min(times), embedded_first, seen["tokens"])
    finally:
        hook.remove()
