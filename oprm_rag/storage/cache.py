"""Document state cache: follow-up questions at the cost of the question alone.

For a recurrent model the state after ``[P, C_i]`` does not depend on the question and
has a fixed size. Keeping those states turns every later question about the same
document into N short prefills of ``Q``. Entries are keyed by a hash of the model
identity and dtype, the prompt prefix, the chunking settings and the document's token
ids; one entry holds all chunk states of one document under one chunking.

Tiers: an in-memory LRU bounded in bytes, and optionally a directory with one
safetensors file per entry. The rules of the disk tier:

* **A cache never fails a question.** A write that fails (a full disk, a quota, a
  read-only folder, anything the writer raises) is logged as a warning and dropped,
  leaving no partial file; the answer goes through. Temp files of writers that were
  killed are deleted when a cache is next opened on the folder (after
  :data:`ORPHAN_AGE_S`).
* **Memory stays bounded.** :meth:`DocumentStateCache.open_writer` streams an entry to
  disk batch by batch (each row at its final offset), and disk entries too big for the
  memory budget are read row by row (:class:`DiskEntry`), so memory with a disk cache is
  ``max_bytes`` plus one batch, whatever the document's length.
* **It deletes and follows nothing it does not own.** Files are opened relative to the
  folder's handle with ``O_NOFOLLOW``; a symbolic link where an entry or a shard folder
  should be is refused and logged, never read, written through or deleted.
  :meth:`DocumentStateCache.clear` deletes only files whose header says they are our
  entries under their own name (format, and a key equal to the file name).
* **Bad files are never trusted.** Every row carries a SHA-256; the row digests, the
  layout and the metadata (format, key, model identity, version, spans) are covered by
  one entry digest. A bad file is logged, deleted and recomputed.

**The cache directory is a trust boundary.** The plain checksum catches damage, not
intent: anyone who can write to the folder can write an entry that matches its checksum
and says it belongs to any document, and that entry's states will be believed and
answered from. Keep the folder private to the user (the default: it is created with the
user's umask), or, where a folder must be shared, give every process the same secret
key (``hmac_key=`` or the ``OPRM_RAG_CACHE_KEY`` environment variable): entries then
carry an HMAC-SHA-256 and an entry written or relabelled without the key is rejected.
See ``docs/cache.md``.

Keys are hex digests, so a key can never climb out of the directory. Thread-safe: two
threads asking about the same new document compute it once (the second waits).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import InputError, StateFormatError
from ..state import RecurrentState
from .disk import ORPHAN_AGE_S, DiskTier
from .entries import CacheStats, Claim, DiskEntry, DocStates, cache_key, check_key
from .memory import MemoryTier
from .writer import EntryWriter

__all__ = ["DocumentStateCache", "DocumentSession", "DocStates", "DiskEntry", "EntryWriter", "CacheStats", "Claim",
           "cache_key", "ORPHAN_AGE_S", "CACHE_KEY_ENV"]

logger = logging.getLogger("oprm_rag")

#: The environment variable holding the secret key for keyed checksums.
CACHE_KEY_ENV = "OPRM_RAG_CACHE_KEY"
_ROWS_PER_WRITE = 64  # put(): rows per write call when an entry is already in memory


class DocumentStateCache:
    """Per-document chunk states: a memory tier bounded in bytes and an optional disk tier,
    with claims so that one new document is computed once however many threads ask.

    ``directory``: the disk tier's folder (created if missing; a file there raises
    :class:`~oprm_rag.errors.InputError`). ``hmac_key``: a secret for keyed checksums
    where the folder is shared (default: the ``OPRM_RAG_CACHE_KEY`` environment
    variable; none: plain SHA-256). See the module docstring for the disk tier's rules.
    """

    def __init__(self, max_bytes: int = 512 * 2**20, directory: str | Path | None = None, *,
                 hmac_key: bytes | str | None = None) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0:
            raise InputError(f"max_bytes must be a whole number of bytes >= 0, got {max_bytes!r}")
        self.max_bytes = int(max_bytes)
        if hmac_key is None:
            hmac_key = os.environ.get(CACHE_KEY_ENV) or None
        if isinstance(hmac_key, str):
            hmac_key = hmac_key.encode("utf-8")
        if hmac_key is not None and not hmac_key:
            raise InputError("hmac_key must not be empty")
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self._stats = CacheStats(max_bytes=self.max_bytes)
        self.memory = MemoryTier(self.max_bytes)
        self.disk = DiskTier(directory, hmac_key, self._count) if directory is not None else None
        if self.disk is not None:
            self.disk.remove_orphans()

    @property
    def directory(self) -> Path | None:
        return self.disk.directory if self.disk is not None else None

    @property
    def keyed(self) -> bool:
        """Whether disk entries carry an HMAC under a secret key."""
        return self.disk is not None and self.disk.hmac_key is not None

    # ------------------------------------------------------------------ public
    def fits(self, nbytes: int) -> bool:
        """Whether an entry of this size can be kept (in memory or on disk)."""
        return nbytes <= self.max_bytes or self.disk is not None

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._stats.entries = len(self.memory)
            self._stats.bytes = self.memory.nbytes
            self._stats.evictions = self.memory.evictions
            return self._stats.as_dict()

    def clear(self, disk: bool = False) -> int:
        """Empty the memory tier; with ``disk=True`` also delete this cache's entry files.

        Only regular files named ``<key>.safetensors`` in two-hex-digit shard folders whose
        header says they are our entries under that key are deleted, and temp files of
        ours older than :data:`ORPHAN_AGE_S`; links are never followed, anything else in
        the folder is left alone. Returns the number of files deleted.
        """
        self.memory.clear()
        if not disk or self.disk is None:
            return 0
        return self.disk.clear()

    def remove_orphans(self, max_age_s: float = ORPHAN_AGE_S) -> int:
        """Delete temp files of killed writers (ours by name, regular, older than ``max_age_s``)."""
        return self.disk.remove_orphans(max_age_s) if self.disk is not None else 0

    def __len__(self) -> int:
        return len(self.memory)

    def session(self, key: str, model_identity: str, spans: Sequence[tuple[int, int]],
                meta: dict[str, str] | None = None) -> "DocumentSession":
        """One document's chunk states for one scoring pass: its rows where cached, else the
        job of storing them (or, while another thread computes them, a wait)."""
        return DocumentSession(self, key, model_identity, spans, meta or {})

    def claim(self, key: str, model_identity: str) -> Claim:
        """Look ``key`` up; if absent, either take the job of computing it or get told to wait."""
        check_key(key)
        with self._lock:  # (lock order: the cache's, then the memory tier's; writers never hold both)
            entry = self.memory.get(key)
            if entry is not None:
                self._stats.hits += 1
                return Claim("hit", key, entry)
            event = self._inflight.get(key)
            if event is not None:
                return Claim("wait", key, event=event)
            self._inflight[key] = threading.Event()
        try:
            loaded = self.disk.load(key, model_identity, self.max_bytes) if self.disk is not None else None
        except BaseException:  # never leave waiters hanging
            self._finish(key)
            raise
        if loaded is not None:
            with self._lock:
                self._stats.hits += 1
                self._stats.disk_hits += 1
            if isinstance(loaded, DocStates):
                self.memory.insert(key, loaded)
            self._finish(key)
            return Claim("hit", key, loaded)
        with self._lock:
            self._stats.misses += 1
        return Claim("own", key)

    def open_writer(self, key: str, model_identity: str, spans: Sequence[tuple[int, int]],
                    meta: dict[str, str] | None = None) -> EntryWriter:
        """Stream the entry for ``key`` (claimed with status ``own``) batch by batch.

        ``spans``: the chunks' token spans (their count is the entry's row count).
        ``meta``: extra strings for the file header. ``commit()`` or ``abort()`` releases
        threads waiting on the claim. Usage::

            claim = cache.claim(key, lm.identity)
            if claim.status == "own":
                with cache.open_writer(key, lm.identity, spans, {"chunking": "..."}) as w:
                    for first, states, logits in batches:   # any order, any batch size
                        w.add(first, states, logits)        # or w.add([3, 7, 8], ...)
                    w.commit()
        """
        check_key(key)
        if not spans:
            raise ValueError("an entry needs at least one chunk")
        return EntryWriter(key, model_identity, spans, meta or {}, memory=self.memory, disk=self.disk,
                           count=self._count, done=self._finish)

    def put(self, key: str, entry: DocStates, model_identity: str, extra_meta: dict[str, str] | None = None) -> None:
        """Store a computed entry (memory, and disk if configured) and release waiters.

        The entry is already in memory here; the disk copy is written in row slices, so
        no second copy of the whole entry is made. Never raises for a storage problem.
        """
        try:
            check_key(key)
            entry = DocStates(entry.states.to("cpu"), entry.chunk_end_logits.cpu(), list(entry.spans))
            self.memory.insert(key, entry)
            if self.disk is not None and entry.n_chunks:
                # the disk tier only: the entry is in memory already; waiters are released below, once
                writer = EntryWriter(key, model_identity, entry.spans, extra_meta or {}, memory=None, disk=self.disk,
                                     count=self._count, done=lambda _key: None)
                logits = entry.chunk_end_logits if entry.chunk_end_logits.numel() else None
                for first in range(0, entry.n_chunks, _ROWS_PER_WRITE):
                    idx = list(range(first, min(entry.n_chunks, first + _ROWS_PER_WRITE)))
                    writer.add(idx, entry.states.select(idx), logits[idx] if logits is not None else None)
                writer.commit()
        finally:
            self._finish(key)

    def abandon(self, key: str) -> None:
        """Give up a claimed job (e.g. on error): waiters will compute it themselves."""
        self._finish(key)

    def wait(self, claim: Claim, model_identity: str, timeout: float | None = None) -> Claim:
        """Block until another thread's computation of ``claim.key`` ends, then claim again."""
        if claim.event is not None:
            claim.event.wait(timeout)
        return self.claim(claim.key, model_identity)

    # ------------------------------------------------------------------ internals
    def _path(self, key: str) -> Path:
        assert self.disk is not None
        return self.disk.path(key)

    def _finish(self, key: str) -> None:
        with self._lock:
            event = self._inflight.pop(key, None)
        if event is not None:
            event.set()

    def _count(self, stat_name: str) -> None:
        with self._lock:
            setattr(self._stats, stat_name, getattr(self._stats, stat_name) + 1)


class DocumentSession:
    """One document's chunk states for one scoring pass: the source the pass reads cached
    rows from and streams computed rows into (the cache's claim protocol, kept here).

    After construction the session is ``ready`` (its rows are cached: ``rows()``),
    ``writing`` (this pass computes them: ``store()`` each batch, committed when the last
    chunk arrives) or ``waiting`` (another thread computes them: ``wait()`` blocks, then
    the session is ready or writing). ``abort()`` gives everything up on an error.
    """

    def __init__(self, cache: DocumentStateCache, key: str, model_identity: str,
                 spans: Sequence[tuple[int, int]], meta: dict[str, str]) -> None:
        self.cache = cache
        self.key = key
        self.model_identity = model_identity
        self.spans = [(int(a), int(b)) for a, b in spans]
        self.meta = meta
        self._entry: DocStates | DiskEntry | None = None
        self._writer: EntryWriter | None = None
        self._stored = 0
        self._take(cache.claim(key, model_identity))

    @property
    def ready(self) -> bool:
        """The rows are cached."""
        return self._entry is not None

    @property
    def waiting(self) -> bool:
        return self._claim.status == "wait"

    def _take(self, claim: Claim) -> None:
        """Use a hit, or open a writer for the rows this pass computes."""
        self._claim = claim
        if claim.status == "hit":
            assert claim.entry is not None
            if [tuple(s) for s in claim.entry.spans] == self.spans:
                self._entry = claim.entry
                return
            logger.warning("cached chunk spans differ from this chunking; recomputing")
            self._claim = Claim("own", self.key)
        if self._claim.status == "own":
            self._writer = self.cache.open_writer(self.key, self.model_identity, self.spans, self.meta)

    def wait(self) -> None:
        """Another thread was computing these rows: take its result, or the job."""
        if self.waiting:
            self._take(self.cache.wait(self._claim, self.model_identity))

    def rows(self, indices: Sequence[int]) -> tuple[RecurrentState, torch.Tensor | None]:
        """The cached states (and chunk-end logits, None if not kept) of chunks ``indices``.

        A file that changed under us raises ``StateFormatError``; the session then holds no
        rows, and the pass computes those chunks.
        """
        assert self._entry is not None, "rows() needs a ready session"
        try:
            return self._entry.rows(list(indices))
        except StateFormatError:
            self._entry = None
            raise

    def store(self, indices: Sequence[int], states: Any, chunk_end_logits: Any) -> None:
        """Stream computed rows into the cache; the entry is committed with its last chunk."""
        if self._writer is None:
            return
        self._writer.add(list(indices), states, chunk_end_logits)
        self._stored += len(indices)
        if self._stored == len(self.spans):
            self._writer.commit()
            self._writer = None
            self._claim = Claim("hit", self.key)

    def abort(self) -> None:
        """Give up (an error part-way): nothing half-written is kept; waiters compute it themselves."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        elif self._claim.status == "own":
            self.cache.abandon(self.key)
