"""The values the document state cache holds and hands out.

* :func:`cache_key`: the SHA-256 over everything a chunk state depends on;
* :class:`DocStates`: all chunk states of one document, in memory;
* :class:`DiskEntry`: a verified disk entry too big for the memory budget, read row by row;
* :class:`Claim`: the answer to "who computes this entry" (``hit``, ``own``, ``wait``);
* :class:`CacheStats`: what the cache counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..state import RecurrentState
from .rowfile import RowFile

__all__ = ["cache_key", "check_key", "row_indices", "DocStates", "DiskEntry", "Claim", "CacheStats", "FORMAT",
           "close_fd"]

FORMAT = "oprm-doc-states/2"


def cache_key(model_identity: str, prefix_ids: Sequence[int], chunking: dict[str, Any],
              doc_ids: Sequence[int]) -> str:
    """SHA-256 over everything a chunk state depends on."""
    h = hashlib.sha256()
    h.update(FORMAT.encode())
    h.update(model_identity.encode())
    h.update(json.dumps(list(map(int, prefix_ids))).encode())
    h.update(json.dumps(chunking, sort_keys=True).encode())
    h.update(len(doc_ids).to_bytes(8, "little"))
    h.update(np.asarray(doc_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def check_key(key: str) -> str:
    if not isinstance(key, str) or len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError("cache keys are SHA-256 hex digests")
    return key


def row_indices(indices: "int | Sequence[int] | range", count: int | None = None) -> list[int]:
    if isinstance(indices, (int, np.integer)):
        if count is None:
            return [int(indices)]
        return list(range(int(indices), int(indices) + count))
    return [int(i) for i in indices]


@dataclass
class DocStates:
    """All chunk states of one document, in memory (one row per chunk, document order)."""

    states: RecurrentState
    chunk_end_logits: torch.Tensor  # [n, v] float32 next-token logits after each [P, C_i]; [0] if not kept
    spans: list[tuple[int, int]]  # token spans of the chunks

    @property
    def nbytes(self) -> int:
        return self.states.nbytes + self.chunk_end_logits.numel() * self.chunk_end_logits.element_size()

    @property
    def n_chunks(self) -> int:
        return len(self.spans)

    def rows(self, indices: "int | Sequence[int]") -> tuple[RecurrentState, torch.Tensor | None]:
        """The states (and chunk-end logits, None if not kept) of chunks ``indices``."""
        idx = row_indices(indices)
        logits = self.chunk_end_logits[idx] if self.chunk_end_logits.numel() else None
        return self.states.select(idx), logits


class DiskEntry:
    """A verified disk entry too big for the memory budget, read row by row on demand.

    ``rows()`` reads only the rows asked for, each checked against its digest; a row that
    no longer matches (the file was changed in place after it was opened) raises
    :class:`~oprm_rag.errors.StateFormatError`: compute those chunks instead. The open file
    is closed when the entry is garbage-collected (or by :meth:`close`).
    """

    def __init__(self, rowfile: RowFile, family: str, spans: list[tuple[int, int]]) -> None:
        self._file = rowfile
        self.family = family
        self.spans = spans
        self._loaded: tuple[RecurrentState, torch.Tensor] | None = None
        self._finalizer = weakref.finalize(self, close_fd, rowfile.fd)

    @property
    def n_chunks(self) -> int:
        return len(self.spans)

    @property
    def nbytes(self) -> int:
        """Bytes all rows would take in memory (what this entry avoids holding)."""
        return self._file.row_nbytes * self._file.n_rows

    def rows(self, indices: "int | Sequence[int]") -> tuple[RecurrentState, torch.Tensor | None]:
        tensors = self._file.read_rows(row_indices(indices))
        states = RecurrentState(self.family, {k[6:]: v for k, v in tensors.items() if k.startswith("state.")})
        return states, tensors.get("chunk_end_logits")

    # Whole-entry views for callers that read ``entry.states``: they load every row, once.
    # Prefer rows(): these hold the whole entry in memory, which this class exists to avoid.
    def _whole(self) -> tuple[RecurrentState, torch.Tensor]:
        if self._loaded is None:
            states, logits = self.rows(range(self.n_chunks))
            self._loaded = (states, logits if logits is not None else torch.zeros(0))
        return self._loaded

    @property
    def states(self) -> RecurrentState:
        return self._whole()[0]

    @property
    def chunk_end_logits(self) -> torch.Tensor:
        return self._whole()[1]

    def close(self) -> None:
        self._finalizer()


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    disk_hits: int = 0
    evictions: int = 0
    bad_files: int = 0
    write_errors: int = 0
    refused_links: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Claim:
    """The answer to "who computes this entry": ``hit``, ``own`` (you do) or ``wait``."""

    status: str
    key: str
    entry: "DocStates | DiskEntry | None" = None
    event: threading.Event | None = field(default=None, repr=False)
