"""Show what was scored: a terminal entropy chart and a PNG of entropy along the document."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .results import ChunkScore

__all__ = ["entropy_bars", "plot_entropy", "describe_chunk"]


def describe_chunk(chunk: ChunkScore, names: Sequence[str] | None = None, width: int = 300) -> str:
    name = names[chunk.doc_index] if names else f"document {chunk.doc_index}"
    text = " ".join(chunk.text.split())
    if len(text) > width:
        text = text[: width - 3] + "..."
    return (f"{name}, chars {chunk.char_start}-{chunk.char_end} (chunk {chunk.index}, "
            f"entropy {chunk.entropy:.3f} nats):\n  {text}")


def entropy_bars(chunks: Sequence[ChunkScore], width: int = 40, max_rows: int = 40) -> str:
    """One row per chunk (document order): a bar as long as the entropy, IDK and winner marked.

    Long documents are shown in evenly spaced rows, always including the winner.
    """
    if not chunks:
        return "(no chunks)"
    top = max(c.entropy for c in chunks) or 1.0
    rows = list(range(len(chunks)))
    if len(rows) > max_rows:
        step = len(rows) / max_rows
        keep = {int(i * step) for i in range(max_rows)}
        keep |= {i for i, c in enumerate(chunks) if c.selected}
        rows = sorted(keep)
    lines = [f"{'chunk':>9}  {'entropy':>7}  {'':<{width}}  top token"]
    for i in rows:
        c = chunks[i]
        n = max(1, round(width * c.entropy / top)) if c.entropy > 0 else 0
        bar = ("#" if c.selected else ("x" if c.is_idk else "=")) * n
        mark = " <- selected" if c.selected else (" (IDK)" if c.is_idk else "")
        lines.append(f"{c.doc_index:>3}:{c.index:<5}  {c.entropy:7.3f}  {bar:<{width}}  {c.top_token!r}{mark}")
    if len(rows) < len(chunks):
        lines.append(f"({len(chunks) - len(rows)} of {len(chunks)} chunks not shown)")
    lines.append("legend: # selected, = scored, x answered the IDK word (dropped)")
    return "\n".join(lines)


def plot_entropy(chunks: Sequence[ChunkScore], path: str | Path, title: str = "") -> Path:
    """Write a PNG: entropy per chunk along the document; IDK chunks and the winner marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    xs = list(range(len(chunks)))
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.25 * len(chunks) + 4)), 3.6), dpi=120)
    colors = ["#d62728" if c.selected else ("#bbbbbb" if c.is_idk else "#1f77b4") for c in chunks]
    ax.bar(xs, [c.entropy for c in chunks], color=colors, width=0.85)
    bounds = [i for i in range(1, len(chunks)) if chunks[i].doc_index != chunks[i - 1].doc_index]
    for b in bounds:
        ax.axvline(b - 0.5, color="k", lw=0.6, ls=":")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#1f77b4", label="scored"), Patch(color="#bbbbbb", label="IDK (dropped)"),
                       Patch(color="#d62728", label="selected")], loc="upper right", fontsize=8)
    ax.set_xlabel("chunk (document order)")
    ax.set_ylabel("first-token entropy (nats)")
    ax.set_title(title or "OPRM: entropy along the document", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
