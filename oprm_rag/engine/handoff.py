"""Hand a just-scored state to whoever generates next.

The selector finishes each chunk with the state after ``[P, C_i, Q]`` and the
first-answer logits. A chat model or LLM wrapper that then receives exactly those
tokens as (the start of) its prompt can resume from that state instead of prefilling
the chunk again. The registry lives on the model's engine, keyed by a hash of
the token prefix, bounded in bytes; model state never travels in document metadata.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from ..state import RecurrentState

__all__ = ["StateHandoff", "HandoffEntry", "token_hash"]


def token_hash(ids: Sequence[int]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(len(ids).to_bytes(8, "little"))
    h.update(b"".join(int(i).to_bytes(4, "little", signed=False) for i in ids))
    return h.hexdigest()


def _text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@dataclass
class HandoffEntry:
    """A batch-1 state after ``num_tokens`` prompt tokens and the next-token logits."""

    state: RecurrentState
    logits: torch.Tensor  # [v] float32
    ids: tuple[int, ...]
    text: str | None = None  # the text these ids were made from, piece by piece

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.logits.numel() * 4


class StateHandoff:
    """LRU of prefix states keyed by token-prefix hash; counts hits for inspection."""

    def __init__(self, max_bytes: int = 256 * 2**20, max_entries: int = 64) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: "OrderedDict[str, HandoffEntry]" = OrderedDict()
        self._lengths: dict[int, int] = {}
        self._texts: dict[str, str] = {}  # text hash -> entry key
        self._text_lengths: dict[int, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def remember(self, ids: Sequence[int], state: RecurrentState, logits: torch.Tensor,
                 text: str | None = None) -> None:
        """Register the state after ``ids`` (and the text they encode, if known)."""
        entry = HandoffEntry(state, logits.detach().float().reshape(-1), tuple(int(i) for i in ids), text)
        if entry.nbytes > self.max_bytes:
            return
        key = token_hash(ids)
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = entry
            self._bytes += entry.nbytes
            self._lengths[len(ids)] = self._lengths.get(len(ids), 0) + 1
            if text is not None:
                self._texts[_text_hash(text)] = key
                self._text_lengths[len(text)] = self._text_lengths.get(len(text), 0) + 1
            while self._entries and (self._bytes > self.max_bytes or len(self._entries) > self.max_entries):
                self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        self._lengths[entry.num_tokens] -= 1
        if not self._lengths[entry.num_tokens]:
            del self._lengths[entry.num_tokens]
        if entry.text is not None:
            self._texts.pop(_text_hash(entry.text), None)
            self._text_lengths[len(entry.text)] -= 1
            if not self._text_lengths[len(entry.text)]:
                del self._text_lengths[len(entry.text)]

    def lookup(self, ids: Sequence[int]) -> HandoffEntry | None:
        """The entry for the longest registered prefix of ``ids``, if any."""
        with self._lock:
            for n in sorted(self._lengths, reverse=True):
                if n <= len(ids):
                    key = token_hash(ids[:n])
                    entry = self._entries.get(key)
                    if entry is not None and entry.ids == tuple(ids[:n]):
                        self._entries.move_to_end(key)
                        self.hits += 1
                        return entry
            self.misses += 1
            return None

    def lookup_text(self, text: str) -> HandoffEntry | None:
        """The entry whose text is the longest prefix of ``text`` (no hit counted).

        Tokenising a whole prompt can merge tokens across the places where the selector
        tokenised P, C and Q separately; a text prefix match recovers the exact ids.
        """
        with self._lock:
            for n in sorted(self._text_lengths, reverse=True):
                if n <= len(text):
                    key = self._texts.get(_text_hash(text[:n]))
                    entry = self._entries.get(key) if key is not None else None
                    if entry is not None and entry.text == text[:n]:
                        return entry
            return None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._lengths.clear()
            self._texts.clear()
            self._text_lengths.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
