"""Scores from the records: a JSON summary and a Markdown table, beside the paper's numbers.

Vanilla and OPRM are compared on the same examples: when both modes ran, each
dataset's scores are taken over the examples that have a record in both (an
interrupted run never compares different subsets). Dataset scores are LongBench's
(mean x 100, 2 decimals); categories and the average are means of dataset scores, as
LongBench's tables are. The paper's numbers (``data/paper_results.json``, with its
source) stand beside ours where the model is one the paper reports.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .metrics import CATEGORIES, mean_percent, v2_accuracy
from .prompts import PAPER_DATASETS

__all__ = ["paper_results", "paper_entry", "paired", "longbench_summary", "v2_summary", "custom_summary",
           "markdown", "write_summary", "summary_paths", "LENGTH_BUCKETS"]

_PAPER_FILE = Path(__file__).parent / "data" / "paper_results.json"

#: LongBench-E's length buckets (``eval.py``'s ``scorer_e``), by the ``length`` field (words).
LENGTH_BUCKETS = (("0-4k", 0, 4000), ("4-8k", 4000, 8000), ("8k+", 8000, float("inf")))


@lru_cache(maxsize=1)
def paper_results() -> dict[str, Any]:
    """The paper's published numbers that this project could source (see the file's notes)."""
    return json.loads(_PAPER_FILE.read_text(encoding="utf-8"))


def paper_entry(model_name: str | None) -> tuple[str, dict[str, Any]] | None:
    """(label, entry) of the paper's model matching ``model_name`` (a hub name, or a local
    folder named like the hub model), else None."""
    if not model_name:
        return None
    name = model_name.strip().rstrip("/").lower()
    base = name.rsplit("/", 1)[-1]
    for label, entry in paper_results()["models"].items():
        for hub in entry.get("hub_names", []):
            hub = hub.lower()
            if name == hub or base == hub.rsplit("/", 1)[-1]:
                return label, entry
    return None


def paired(records: Iterable[Mapping[str, Any]], modes: Sequence[str]) -> dict[str, list[Mapping[str, Any]]]:
    """Records per mode, restricted to the ids every mode has (when more than one mode ran)."""
    by_mode: dict[str, dict[str, Mapping[str, Any]]] = {m: {} for m in modes}
    for r in records:
        if r.get("mode") in by_mode:
            by_mode[str(r["mode"])][str(r["_id"])] = r
    present = [m for m in modes if by_mode[m]]
    if len(present) > 1:
        common = set.intersection(*(set(by_mode[m]) for m in present))
        return {m: [by_mode[m][i] for i in sorted(common)] for m in modes}
    return {m: list(by_mode[m].values()) for m in modes}


def _delta(a: float | None, b: float | None, places: int = 2) -> float | None:
    return None if a is None or b is None else round(b - a, places)


def _mean(values: Iterable[float | None], places: int = 2) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), places) if vals else None


def _buckets(records: Sequence[Mapping[str, Any]]) -> dict[str, float | None] | None:
    lengths = [r.get("length") for r in records]
    if not records or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lengths):
        return None
    return {name: mean_percent(float(r["score"]) for r in records if lo <= r["length"] < hi)
            for name, lo, hi in LENGTH_BUCKETS}


def longbench_summary(records_by_dataset: Mapping[str, Sequence[Mapping[str, Any]]], modes: Sequence[str], *,
                      model: str | None = None, errors: int = 0) -> dict[str, Any]:
    """Per-dataset, per-category and average scores for each mode, and the paper's gain."""
    datasets: dict[str, Any] = {}
    pooled: dict[str, list[Mapping[str, Any]]] = {m: [] for m in modes}
    for name, recs in records_by_dataset.items():
        per = paired(recs, modes)
        entry: dict[str, Any] = {"n": {m: len(per[m]) for m in modes},
                                 "score": {m: mean_percent(float(r["score"]) for r in per[m]) for m in modes}}
        if len(modes) == 2:
            entry["delta"] = _delta(entry["score"][modes[0]], entry["score"][modes[1]])
        datasets[name] = entry
        for m in modes:
            pooled[m].extend(per[m])
    categories: dict[str, Any] = {}
    for cat, members in CATEGORIES.items():
        have = [d for d in members if d in datasets]
        if have:
            categories[cat] = {m: _mean(datasets[d]["score"][m] for d in have) for m in modes}
    average = {m: _mean(datasets[d]["score"][m] for d in datasets) for m in modes}
    summary: dict[str, Any] = {"benchmark": "longbench", "model": model, "modes": list(modes),
                               "datasets": datasets, "categories": categories, "average": average,
                               "errors": errors}
    buckets = {m: _buckets(pooled[m]) for m in modes}
    if any(b is not None for b in buckets.values()):
        summary["length_buckets"] = buckets
    if "vanilla" in modes and "oprm" in modes and average["vanilla"] and average["oprm"] is not None:
        summary["relative_gain"] = round(average["oprm"] / average["vanilla"] - 1, 4)
    match = paper_entry(model)
    if match is not None:
        label, entry = match
        ours = summary.get("relative_gain")
        theirs = entry.get("longbench_relative_gain")
        summary["paper"] = {
            "model": label, "source": paper_results()["source"], "relative_gain": theirs, "ours": ours,
            "difference": None if ours is None or theirs is None else round(ours - theirs, 4),
            "same_datasets": sorted(datasets) == sorted(PAPER_DATASETS),
            "settings": entry.get("paper_settings"),
        }
    return summary


def v2_summary(records: Sequence[Mapping[str, Any]], modes: Sequence[str], *, model: str | None = None,
               errors: int = 0) -> dict[str, Any]:
    """LongBench v2 accuracy per mode: overall, easy/hard, short/medium/long."""
    per = paired(records, modes)
    acc = {m: v2_accuracy(per[m]) for m in modes}
    out: dict[str, Any] = {"benchmark": "longbench_v2", "model": model, "modes": list(modes), "accuracy": acc,
                           "errors": errors}
    if len(modes) == 2:
        out["delta"] = {k: _delta(acc[modes[0]].get(k), acc[modes[1]].get(k), 1)  # type: ignore[arg-type]
                        for k in ("overall", "easy", "hard", "short", "medium", "long")}
    return out


def custom_summary(records_by_dataset: Mapping[str, Sequence[Mapping[str, Any]]], modes: Sequence[str], *,
                   model: str | None = None, metric: str = "f1", errors: int = 0) -> dict[str, Any]:
    """Mean score (percent) per file and mode."""
    datasets = {}
    for name, recs in records_by_dataset.items():
        per = paired(recs, modes)
        score = {m: mean_percent(float(r["score"]) for r in per[m]) for m in modes}
        entry: dict[str, Any] = {"n": {m: len(per[m]) for m in modes}, "score": score}
        if len(modes) == 2:
            entry["delta"] = _delta(score[modes[0]], score[modes[1]])
        datasets[name] = entry
    return {"benchmark": "custom", "model": model, "modes": list(modes), "metric": metric, "datasets": datasets,
            "errors": errors}


# ---------------------------------------------------------------------- Markdown
def _fmt(value: Any, places: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{places}f}"
    return str(value)


def _signed(value: Any, places: int = 2) -> str:
    return "-" if value is None else f"{value:+.{places}f}"


def markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a Markdown table (what the command prints)."""
    modes = list(summary["modes"])
    two = len(modes) == 2
    head = ["dataset", "n"] + modes + (["Δ"] if two else [])
    lines = [f"Model: {summary.get('model') or '?'}", "",
             "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    bench = summary["benchmark"]
    if bench == "longbench_v2":
        acc = summary["accuracy"]
        lines[2] = "| " + " | ".join(["split", "n"] + modes + (["Δ"] if two else [])) + " |"
        for key in ("overall", "easy", "hard", "short", "medium", "long"):
            n = acc[modes[0]].get("n") if key == "overall" else ""
            row = [key, str(n)] + [_fmt(acc[m].get(key), 1) for m in modes]
            if two:
                row.append(_signed(summary["delta"][key], 1))
            lines.append("| " + " | ".join(row) + " |")
    else:
        for name, entry in summary["datasets"].items():
            row = [name, "/".join(str(entry["n"][m]) for m in modes)] + [_fmt(entry["score"][m]) for m in modes]
            if two:
                row.append(_signed(entry.get("delta")))
            lines.append("| " + " | ".join(row) + " |")
        for cat, scores in summary.get("categories", {}).items():
            row = [f"*{cat}*", ""] + [_fmt(scores[m]) for m in modes]
            if two:
                row.append(_signed(_delta(scores[modes[0]], scores[modes[1]])))
            lines.append("| " + " | ".join(row) + " |")
        if bench == "longbench":
            avg = summary["average"]
            row = ["**average**", ""] + [f"**{_fmt(avg[m])}**" for m in modes]
            if two:
                row.append(_signed(_delta(avg[modes[0]], avg[modes[1]])))
            lines.append("| " + " | ".join(row) + " |")
        if summary.get("length_buckets"):
            lines += ["", "| length (LongBench-E buckets) | " + " | ".join(modes) + " |",
                      "| --- | " + " | ".join("---" for _ in modes) + " |"]
            for name, _, _ in LENGTH_BUCKETS:
                vals = [(summary["length_buckets"][m] or {}).get(name) for m in modes]
                lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |")
    if "relative_gain" in summary:
        lines += ["", f"OPRM / vanilla - 1 on the average: {summary['relative_gain']:+.1%}"]
    paper = summary.get("paper")
    if paper:
        theirs = paper.get("relative_gain")
        lines.append(f"Paper ({paper['model']}): {theirs:+.0%} on LongBench"
                     + (f"; ours {paper['ours']:+.1%}, difference {paper['difference']:+.1%}"
                        if paper.get("ours") is not None else "; run --mode both to compare")
                     + ("" if paper.get("same_datasets") else
                        " (not the same dataset set: the paper's average covers its 16 English datasets)"))
        lines.append(f"  source: {paper['source']}")
    if summary.get("errors"):
        lines += ["", f"{summary['errors']} example(s) could not be answered (see errors.jsonl); they are not "
                      "in the scores and a rerun retries them."]
    return "\n".join(lines)


def summary_paths(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Where :func:`write_summary` writes: ``OUT/<name>_summary.json`` and ``.md``."""
    out = Path(out_dir)
    return out / f"{name}_summary.json", out / f"{name}_summary.md"


def write_summary(out_dir: str | Path, name: str, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """``OUT/<name>_summary.json`` and ``OUT/<name>_summary.md``."""
    j, m = summary_paths(out_dir, name)
    j.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    m.write_text(markdown(summary) + "\n", encoding="utf-8")
    return j, m
