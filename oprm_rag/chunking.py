"""Token-exact chunking with char offsets.

Chunks are cut on the model's own tokens, so a chunk of ``chunk_tokens`` is exactly
that many tokens of state to fill, and every chunk knows where it came from: its
document, its token span and its char span in the original text. Without overlap the
chunks tile each document: their token spans are disjoint and cover it completely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .options import Boundary
from .results import Chunk

__all__ = ["DocumentTokens", "chunk_document"]

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
#: Chinese and Japanese sentence ends (full-width, and no space follows them).
_WIDE_SENTENCE_END = re.compile(r"[。！？][」』”’）\"')\]]*$")


@dataclass(frozen=True, eq=False)
class DocumentTokens:
    """A document's text, its token ids [n] and each token's char span [n, 2] (int32 arrays)."""

    text: str
    token_ids: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        # int32: a vocabulary and a document's char count fit; half the memory of int64
        object.__setattr__(self, "token_ids", as_int32(self.token_ids).reshape(-1))
        object.__setattr__(self, "offsets", as_int32(self.offsets).reshape(-1, 2))


def as_int32(values: object) -> np.ndarray:
    """``values`` as int32 (no copy when they already are); ValueError if any does not fit."""
    arr = np.asarray(values)
    if arr.size and (arr.max() >= 2**31 or arr.min() < -(2**31)):
        raise ValueError("token ids and offsets must fit in 32 bits")
    return arr.astype(np.int32, copy=False)


def _char_span(doc: DocumentTokens, start: int, end: int) -> tuple[int, int]:
    """Chars covered by tokens [start, end): from the end of the previous token, so
    that adjacent chunks' char spans tile the text too (whitespace included)."""
    lo = 0 if start == 0 else int(doc.offsets[start - 1][1])
    hi = len(doc.text) if end == len(doc.token_ids) else int(doc.offsets[end - 1][1])
    return lo, max(lo, hi)


def _is_boundary(doc: DocumentTokens, end: int, boundary: Boundary) -> bool:
    """Whether a chunk may end after token ``end - 1`` (a paragraph or sentence end)."""
    if end >= len(doc.token_ids):
        return True
    stop = int(doc.offsets[end - 1][1])
    after = doc.text[stop:stop + 2]
    if boundary == "paragraph":
        return after.startswith("\n\n") or doc.text[max(0, stop - 2):stop] == "\n\n"
    tail = doc.text[max(0, stop - 4):stop]
    if _WIDE_SENTENCE_END.search(tail):
        return True
    return bool(_SENTENCE_END.search(tail)) and (not after or after[0].isspace())


def _find_cut(doc: DocumentTokens, lo: int, end: int, boundary: Boundary) -> int:
    """The last boundary in (lo, end], preferring paragraphs over sentences; else ``end``."""
    kinds: tuple[Boundary, ...] = ("paragraph", "sentence") if boundary == "paragraph" else ("sentence",)
    for kind in kinds:
        for cand in range(end, lo, -1):
            if _is_boundary(doc, cand, kind):
                return cand
    return end


def chunk_document(
    doc: DocumentTokens,
    doc_index: int,
    chunk_tokens: int | None,
    overlap: int = 0,
    boundary: Boundary | None = None,
    tolerance: float = 0.15,
) -> list[Chunk]:
    """Cut one document into chunks of at most ``chunk_tokens`` tokens.

    ``chunk_tokens=None`` keeps the document whole (plain inference). ``overlap``
    repeats that many tokens at the start of each chunk from the end of the previous
    one. ``boundary`` ends chunks, where possible, at a paragraph or sentence end found
    within the last ``tolerance`` share of the chunk; otherwise the cut is exact.
    """
    n = len(doc.token_ids)
    if chunk_tokens is None or chunk_tokens >= n:
        bounds = [(0, n)]
    else:
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        if not 0 <= overlap < chunk_tokens:
            raise ValueError(f"chunk_overlap must be in [0, chunk_tokens), got {overlap}")
        slack = int(chunk_tokens * tolerance) if boundary else 0
        bounds = []
        start = 0
        while start < n:
            end = min(n, start + chunk_tokens)
            if boundary and end < n:
                end = _find_cut(doc, max(start + overlap, end - slack - 1), end, boundary)
            bounds.append((start, end))
            if end >= n:
                break
            start = end - overlap
    chunks = []
    for i, (a, b) in enumerate(bounds):
        lo, hi = _char_span(doc, a, b)
        chunks.append(Chunk(doc_index, i, a, b, lo, hi, doc.text, doc.token_ids[a:b]))
    return chunks
