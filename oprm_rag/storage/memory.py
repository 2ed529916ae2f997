"""The memory tier: an LRU of documents' chunk states, bounded in bytes.

Entries being written reserve their bytes up front (:meth:`MemoryTier.reserve`), so the
tier never holds more than ``max_bytes`` even while a long document streams in.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from .entries import DocStates

__all__ = ["MemoryTier"]


class MemoryTier:
    """Documents' chunk states in memory, least recently used first out."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[str, DocStates]" = OrderedDict()
        self._bytes = 0
        self._reserved = 0
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> DocStates | None:
        """The entry for ``key`` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def insert(self, key: str, entry: DocStates) -> None:
        """Keep ``entry`` (evicting older ones); an entry larger than the tier is not kept."""
        with self._lock:
            self._insert(key, entry)

    def reserve(self, nbytes: int) -> bool:
        """Set memory aside for an entry being written (evicting older entries)."""
        with self._lock:
            if nbytes > self.max_bytes - self._reserved:
                return False
            self._evict_until(nbytes)
            self._reserved += nbytes
            return True

    def unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def insert_reserved(self, key: str, entry: DocStates, reserved: int) -> None:
        """Keep an entry whose bytes were reserved while it was written."""
        with self._lock:
            self._reserved -= reserved
            self._insert(key, entry)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _evict_until(self, free: int) -> None:
        while self._entries and self._bytes + self._reserved + free > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            self.evictions += 1

    def _insert(self, key: str, entry: DocStates) -> None:
        if entry.nbytes > self.max_bytes:
            return  # too big for memory; the disk tier may still hold it
        if key in self._entries:
            self._bytes -= self._entries.pop(key).nbytes
        self._evict_until(entry.nbytes)
        self._entries[key] = entry
        self._bytes += entry.nbytes
