"""``EntryWriter``: one document's chunk states streamed into the cache, batch by batch."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from ..state import RecurrentState
from .disk import DiskTier
from .entries import DocStates, row_indices
from .memory import MemoryTier
from .rowfile import RowFileWriter
from .safedir import SafeDir, SymlinkRefused

__all__ = ["EntryWriter"]

logger = logging.getLogger("oprm_rag")


class EntryWriter:
    """Streams one entry into the cache's tiers, batch by batch; see
    :meth:`~oprm_rag.storage.cache.DocumentStateCache.open_writer`.

    It gets the tiers it writes to through its constructor: ``memory`` (None when the
    entry is in memory already) and ``disk`` (None without a disk tier); ``count`` tallies
    storage failures in the cache's statistics and ``done(key)`` releases threads waiting
    for the entry, once, however the writer ends.

    Memory: rows go straight to their offsets in a temp file; they are also kept in RAM
    only when the whole entry fits the memory budget (then the budget is reserved up
    front, so the memory tier never passes ``max_bytes``). Every failure is logged and
    turns the writer into a no-op: ``add``/``commit``/``abort`` never raise for a storage
    problem, and ``commit`` reports whether the entry was kept anywhere.
    """

    def __init__(self, key: str, model_identity: str, spans: Sequence[tuple[int, int]], meta: dict[str, str], *,
                 memory: MemoryTier | None, disk: DiskTier | None, count: Callable[[str], None],
                 done: Callable[[str], None]) -> None:
        self.memory = memory  # None: the entry is already in memory (``put``), only the disk copy is made
        self.disk = disk
        self._count = count
        self._done = done
        self.key = key
        self.model_identity = model_identity
        self.spans = [(int(a), int(b)) for a, b in spans]
        self.meta = dict(meta)
        self.n_chunks = len(self.spans)
        self._file: RowFileWriter | None = None
        self._dir: SafeDir | None = None
        self._mem_states: dict[str, torch.Tensor] | None = None
        self._mem_logits: torch.Tensor | None = None
        self._reserved = 0
        self._family: str | None = None
        self._has_logits: bool | None = None
        self._seen = bytearray(self.n_chunks)
        self._width: int | None = None
        self._started = False
        self._closed = False
        self.failed = False
        self.on_disk = False
        self.in_memory = False

    # -- the first batch fixes the layout
    def _start(self, states: RecurrentState, logits: torch.Tensor | None) -> None:
        self._started = True
        self._family = states.family
        self._has_logits = logits is not None
        row_bytes = sum(t[0].numel() * t.element_size() for t in states.tensors.values())
        if logits is not None:
            row_bytes += logits[0].numel() * 4
        total = row_bytes * self.n_chunks
        if self.memory is not None and total <= self.memory.max_bytes and self.memory.reserve(total):
            self._reserved = total
            self._mem_states = {k: torch.empty((self.n_chunks, *t.shape[1:]), dtype=t.dtype)
                                for k, t in states.tensors.items()}
            if logits is not None:
                self._mem_logits = torch.empty((self.n_chunks, *logits.shape[1:]), dtype=torch.float32)
        if self.disk is not None:
            try:
                self._dir, self._file = self.disk.create(self.key, self.n_chunks, str(self._family),
                                                         self.model_identity, self.spans, self.meta)
            except Exception as exc:  # noqa: BLE001 - the disk tier is best effort
                self._disk_failed("could not start the cache file", exc)

    def _disk_failed(self, what: str, exc: BaseException) -> None:
        if isinstance(exc, SymlinkRefused):
            self._count("refused_links")
            logger.warning("%s for %s: %s", what, self.key[:12], exc)
        else:
            self._count("write_errors")
            logger.warning("%s for %s (%s: %s); the answer is not affected, the entry is not kept on disk",
                           what, self.key[:12], exc.__class__.__name__, exc)
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None
        if self._dir is not None:
            self._dir.close()
            self._dir = None

    def _release_memory(self) -> None:
        if self._reserved:
            assert self.memory is not None
            self.memory.unreserve(self._reserved)
            self._reserved = 0
        self._mem_states = None
        self._mem_logits = None

    def _kv_width(self, states: RecurrentState, idx: list[int]) -> int | None:
        """Key slots of every row of this entry, for states with attention keys (None: none):
        the prefix plus the longest chunk, so rows of chunks of any length share one shape."""
        if states.kv_width is None:
            return None
        if self._width is None:
            first = self.spans[idx[0]]
            prefix = states.positions[0] - (first[1] - first[0])
            self._width = prefix + max(b - a for a, b in self.spans)
        return self._width

    @property
    def keeping(self) -> bool:
        """Whether any tier still takes this entry's rows."""
        return not self._closed and (not self._started or self._file is not None or self._mem_states is not None)

    def add(self, indices: "int | Sequence[int]", states: RecurrentState,
            chunk_end_logits: torch.Tensor | None = None) -> None:
        """Rows for chunks ``indices`` (an int: the first of ``len(states)`` consecutive chunks)."""
        if self._closed:
            return
        try:
            idx = row_indices(indices, states.batch_size)
            if len(idx) != states.batch_size or (chunk_end_logits is not None
                                                 and int(chunk_end_logits.shape[0]) != len(idx)):
                raise ValueError(f"{len(idx)} chunk indices for a batch of {states.batch_size} states")
            if any(not 0 <= i < self.n_chunks for i in idx):
                raise IndexError(f"chunk index outside 0..{self.n_chunks - 1}")
            states = states.to("cpu")
            states = states.with_kv_width(self._kv_width(states, idx))  # attention keys: one row shape
            logits = chunk_end_logits.detach().to("cpu", torch.float32) if chunk_end_logits is not None else None
            if not self._started:
                self._start(states, logits)
            if states.family != self._family or (logits is not None) != self._has_logits:
                raise ValueError("a batch of another model or layout")
            if self._mem_states is not None:
                if states.tensors.keys() != self._mem_states.keys():
                    raise ValueError("a batch with other state tensors")
                rows = torch.as_tensor(idx, dtype=torch.long)
                for k, t in states.tensors.items():
                    self._mem_states[k].index_copy_(0, rows, t.to(self._mem_states[k].dtype))
                if logits is not None and self._mem_logits is not None:
                    self._mem_logits.index_copy_(0, rows, logits)
            if self._file is not None:
                tensors = {f"state.{k}": t for k, t in states.tensors.items()}
                if logits is not None:
                    tensors["chunk_end_logits"] = logits
                try:
                    self._file.write_rows(idx, tensors)
                except Exception as exc:  # noqa: BLE001 - full disk, quota, I/O error: keep answering
                    self._disk_failed("could not write the cache file", exc)
            for i in idx:
                self._seen[i] = 1
        except Exception as exc:  # noqa: BLE001 - a cache problem never fails a question
            self._count("write_errors")
            logger.warning("cache entry %s dropped (%s: %s)", self.key[:12], exc.__class__.__name__, exc)
            self.abort()

    def commit(self) -> bool:
        """Keep the entry (memory and/or disk) and release threads waiting for it.

        Returns True if it was kept anywhere. Never raises for a storage problem.
        """
        if self._closed:
            return self.on_disk or self.in_memory
        try:
            if not self._started or not all(self._seen):
                missing = self.n_chunks - sum(self._seen)
                logger.warning("cache entry %s incomplete (%d of %d chunks never added); not kept",
                               self.key[:12], missing, self.n_chunks)
                self.abort()
                return False
            if self._file is not None:
                try:
                    self._file.commit()
                    self.on_disk = True
                except Exception as exc:  # noqa: BLE001
                    self._disk_failed("could not finish the cache file", exc)
                self._close_file()
            if self._mem_states is not None:
                entry = DocStates(RecurrentState(str(self._family), self._mem_states),
                                  self._mem_logits if self._mem_logits is not None else torch.zeros(0), self.spans)
                assert self.memory is not None
                self.memory.insert_reserved(self.key, entry, self._reserved)
                self._reserved = 0
                self.in_memory = True
            self._mem_states = None
            self._mem_logits = None
        finally:
            self._closed = True
            self._release_memory()
            self._close_file()
            self._done(self.key)
        return self.on_disk or self.in_memory

    def abort(self) -> None:
        """Drop everything written so far and release waiting threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.failed = True
        self._close_file()
        self._release_memory()
        self._done(self.key)

    def __enter__(self) -> "EntryWriter":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None or not self._closed:
            self.abort()
