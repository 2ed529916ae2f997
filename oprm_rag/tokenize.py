"""Tokenise documents of any length into compact arrays.

A fast tokenizer returns Python lists of ids and offset tuples: about 150 bytes a token,
150 MB for a million-token document. Memory must not grow with document length, so
long texts are tokenised in slices and kept as int64 arrays (24 bytes a token).

Slices are cut just before a space that precedes a letter and follows a non-space:
for byte-level BPE (GPT-2 style) and metaspace (SentencePiece style) pre-tokenisers
this is a pre-token boundary, so the pieces tokenise exactly as the whole. Each cut is
checked anyway: the text around it is tokenised whole and compared with the pieces;
on any disagreement the cut moves to the next candidate.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

__all__ = ["encode_with_offsets", "SLICE_CHARS"]

SLICE_CHARS = 32_000  # ~9K tokens: bounds the tokenizer's transient memory (~1.4 KB a token)
_CHECK = 400  # chars each side of a cut tokenised whole to verify it
_CUT = re.compile(r"(?<=\S) (?=[A-Za-z])")


def _encode(tokenizer: Any, text: str, base: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2) + base
    return ids, offs


def _cut_is_clean(tokenizer: Any, text: str, cut: int) -> bool:
    lo, hi = max(0, cut - _CHECK), min(len(text), cut + _CHECK)
    # start the window at a candidate boundary too, so its own start is clean
    m = _CUT.search(text, lo, cut)
    lo = m.start() if m and m.start() < cut else lo
    whole = tokenizer(text[lo:hi], add_special_tokens=False)["input_ids"]
    left = tokenizer(text[lo:cut], add_special_tokens=False)["input_ids"]
    right = tokenizer(text[cut:hi], add_special_tokens=False)["input_ids"]
    return list(whole) == list(left) + list(right)


def _cuts(tokenizer: Any, text: str, slice_chars: int) -> list[int]:
    cuts = []
    pos = slice_chars
    while pos < len(text) - _CHECK:
        cut = None
        for m in _CUT.finditer(text, pos, min(len(text), pos + slice_chars // 2)):
            if _cut_is_clean(tokenizer, text, m.start()):
                cut = m.start()
                break
        if cut is None:  # no clean cut found nearby: keep tokenising the span whole
            pos += slice_chars // 2
            continue
        cuts.append(cut)
        pos = cut + slice_chars
    return cuts


def encode_with_offsets(tokenizer: Any, text: str, slice_chars: int = SLICE_CHARS) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n] and char offsets [n, 2] of ``text`` (no special tokens)."""
    if len(text) <= slice_chars + _CHECK:
        return _encode(tokenizer, text, 0)
    bounds = [0, *_cuts(tokenizer, text, slice_chars), len(text)]
    ids, offs = zip(*(_encode(tokenizer, text[a:b], a) for a, b in zip(bounds, bounds[1:])))
    return np.concatenate(ids), np.concatenate(offs)
