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

import hashlib
import json
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError, StateFormatError
from .io_utils import RowFile, RowFileWriter, SafeDir, SymlinkRefused, read_safetensors_metadata
from .state import RecurrentState

__all__ = ["DocumentStateCache", "DocStates", "DiskEntry", "EntryWriter", "CacheStats", "Claim", "cache_key",
           "ORPHAN_AGE_S", "CACHE_KEY_ENV"]

logger = logging.getLogger("oprm_rag")

_FORMAT = "oprm-doc-states/2"
#: Formats this package has written (clear() deletes entries of any of them).
_OUR_FORMATS = frozenset({"oprm-doc-states/1", _FORMAT})
#: Temp files older than this (seconds) are taken for orphans of a killed writer.
ORPHAN_AGE_S = 3600.0
#: The environment variable holding the secret key for keyed checksums.
CACHE_KEY_ENV = "OPRM_RAG_CACHE_KEY"

_SHARD = re.compile(r"^[0-9a-f]{2}$")
_ENTRY = re.compile(r"^([0-9a-f]{64})\.safetensors$")
_TEMP = re.compile(r"^\.[0-9a-f]{64}\.safetensors\.[0-9A-Za-z_]+\.tmp$")
_ROWS_PER_WRITE = 64  # put(): rows per write call when an entry is already in memory


def cache_key(model_identity: str, prefix_ids: Sequence[int], chunking: dict[str, Any],
              doc_ids: Sequence[int]) -> str:
    """SHA-256 over everything a chunk state depends on."""
    h = hashlib.sha256()
    h.update(_FORMAT.encode())
    h.update(model_identity.encode())
    h.update(json.dumps(list(map(int, prefix_ids))).encode())
    h.update(json.dumps(chunking, sort_keys=True).encode())
    h.update(len(doc_ids).to_bytes(8, "little"))
    h.update(np.asarray(doc_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def _check_key(key: str) -> str:
    if not isinstance(key, str) or len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError("cache keys are SHA-256 hex digests")
    return key


def _rows(indices: "int | Sequence[int] | range", count: int | None = None) -> list[int]:
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
        idx = _rows(indices)
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
        self._finalizer = weakref.finalize(self, _close_fd, rowfile.fd)

    @property
    def n_chunks(self) -> int:
        return len(self.spans)

    @property
    def nbytes(self) -> int:
        """Bytes all rows would take in memory (what this entry avoids holding)."""
        return self._file.row_nbytes * self._file.n_rows

    def rows(self, indices: "int | Sequence[int]") -> tuple[RecurrentState, torch.Tensor | None]:
        tensors = self._file.read_rows(_rows(indices))
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


def _close_fd(fd: int) -> None:
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


class EntryWriter:
    """Streams one entry into the cache, batch by batch; see :meth:`DocumentStateCache.open_writer`.

    Memory: rows go straight to their offsets in a temp file; they are also kept in RAM
    only when the whole entry fits the memory budget (then the budget is reserved up
    front, so the memory tier never passes ``max_bytes``). Every failure is logged and
    turns the writer into a no-op: ``add``/``commit``/``abort`` never raise for a storage
    problem, and ``commit`` reports whether the entry was kept anywhere.
    """

    def __init__(self, cache: "DocumentStateCache", key: str, model_identity: str,
                 spans: Sequence[tuple[int, int]], meta: dict[str, str]) -> None:
        self.cache = cache
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
        if total <= self.cache.max_bytes and self.cache._reserve(total):
            self._reserved = total
            self._mem_states = {k: torch.empty((self.n_chunks, *t.shape[1:]), dtype=t.dtype)
                                for k, t in states.tensors.items()}
            if logits is not None:
                self._mem_logits = torch.empty((self.n_chunks, *logits.shape[1:]), dtype=torch.float32)
        if self.cache.directory is not None:
            try:
                self._open_file()
            except Exception as exc:  # noqa: BLE001 - the disk tier is best effort
                self._disk_failed("could not start the cache file", exc)

    def _open_file(self) -> None:
        from . import __version__

        root = self.cache._root()
        try:
            self._dir = root.subdir(self.key[:2], create=True)
        finally:
            root.close()
        meta = {"format": _FORMAT, "key": self.key, "model_identity": self.model_identity,
                "oprm_rag_version": __version__, "family": str(self._family), "spans": json.dumps(self.spans),
                **{k: str(v) for k, v in self.meta.items() if k not in ("format", "key", "model_identity")}}
        self._file = RowFileWriter(self._dir, f"{self.key}.safetensors", self.n_chunks, meta, self.cache._hmac_key)

    def _disk_failed(self, what: str, exc: BaseException) -> None:
        if isinstance(exc, SymlinkRefused):
            self.cache._count("refused_links")
            logger.warning("%s for %s: %s", what, self.key[:12], exc)
        else:
            self.cache._count("write_errors")
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
            self.cache._unreserve(self._reserved)
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
            idx = _rows(indices, states.batch_size)
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
            self.cache._count("write_errors")
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
                self.cache._insert_reserved(self.key, entry, self._reserved)
                self._reserved = 0
                self.in_memory = True
            self._mem_states = None
            self._mem_logits = None
        finally:
            self._closed = True
            self._release_memory()
            self._close_file()
            self.cache._finish(self.key)
        return self.on_disk or self.in_memory

    def abort(self) -> None:
        """Drop everything written so far and release waiting threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.failed = True
        self._close_file()
        self._release_memory()
        self.cache._finish(self.key)

    def __enter__(self) -> "EntryWriter":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None or not self._closed:
            self.abort()


class DocumentStateCache:
    """LRU of per-document chunk states with a byte budget, and an optional disk tier.

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
        self.directory = self._prepare_directory(directory) if directory is not None else None
        if hmac_key is None:
            hmac_key = os.environ.get(CACHE_KEY_ENV) or None
        if isinstance(hmac_key, str):
            hmac_key = hmac_key.encode("utf-8")
        if hmac_key is not None and not hmac_key:
            raise InputError("hmac_key must not be empty")
        self._hmac_key: bytes | None = hmac_key
        self._mem: "OrderedDict[str, DocStates]" = OrderedDict()
        self._bytes = 0
        self._reserved = 0
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self._stats = CacheStats(max_bytes=self.max_bytes)
        if self.directory is not None:
            self.remove_orphans()

    @staticmethod
    def _prepare_directory(directory: str | Path) -> Path:
        path = Path(directory).expanduser()
        if path.exists() and not path.is_dir():
            raise InputError(f"cache directory {str(path)!r} is a file, not a folder; pass a folder "
                             "(it is created if missing), or leave the option out to cache in memory only")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise InputError(f"cannot use {str(path)!r} as the cache directory: a part of that path is a file "
                             "or a broken link; choose another folder") from exc
        except PermissionError as exc:
            raise InputError(f"cannot create the cache directory {str(path)!r} (permission denied); choose a "
                             "folder you can write") from exc
        except OSError as exc:
            raise InputError(f"cannot create the cache directory {str(path)!r} ({exc.strerror or exc}); "
                             "choose another folder") from exc
        if not os.access(path, os.W_OK | os.X_OK):
            logger.warning("cache directory %s is not writable: entries will be read but not stored", path)
        return path

    @property
    def keyed(self) -> bool:
        """Whether disk entries carry an HMAC under a secret key."""
        return self._hmac_key is not None

    # ------------------------------------------------------------------ public
    def fits(self, nbytes: int) -> bool:
        """Whether an entry of this size can be kept (in memory or on disk)."""
        return nbytes <= self.max_bytes or self.directory is not None

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._stats.entries = len(self._mem)
            self._stats.bytes = self._bytes
            return self._stats.as_dict()

    def clear(self, disk: bool = False) -> int:
        """Empty the memory tier; with ``disk=True`` also delete this cache's entry files.

        Only regular files named ``<key>.safetensors`` in two-hex-digit shard folders whose
        header says they are our entries under that key are deleted, and temp files of
        ours older than :data:`ORPHAN_AGE_S`; links are never followed, anything else in
        the folder is left alone. Returns the number of files deleted.
        """
        with self._lock:
            self._mem.clear()
            self._bytes = 0
        if not disk or self.directory is None:
            return 0
        removed = 0
        for shard, entry in self._walk():
            name = entry.name
            if _ENTRY.match(name):
                if self._is_our_entry(shard, name):
                    try:
                        shard.unlink(name)
                        removed += 1
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        logger.warning("could not delete cache file %s: %s", shard.path / name, exc)
                else:
                    logger.info("clear(): leaving %s alone (not an entry this cache wrote)", shard.path / name)
            elif _TEMP.match(name) and self._old_regular(shard, name, ORPHAN_AGE_S):
                removed += self._remove(shard, name)
        self._remove_empty_shards()
        return removed

    def remove_orphans(self, max_age_s: float = ORPHAN_AGE_S) -> int:
        """Delete temp files of killed writers (ours by name, regular, older than ``max_age_s``)."""
        removed = 0
        try:
            for shard, entry in self._walk():
                if _TEMP.match(entry.name) and self._old_regular(shard, entry.name, max_age_s):
                    removed += self._remove(shard, entry.name)
        except OSError as exc:  # an unreadable folder: nothing to clean, nothing to fail
            logger.warning("could not scan the cache directory %s for orphaned temp files: %s", self.directory, exc)
        if removed:
            logger.info("removed %d orphaned temp file(s) from %s", removed, self.directory)
        return removed

    def __len__(self) -> int:
        return len(self._mem)

    def claim(self, key: str, model_identity: str) -> Claim:
        """Look ``key`` up; if absent, either take the job of computing it or get told to wait."""
        _check_key(key)
        with self._lock:
            entry = self._mem.get(key)
            if entry is not None:
                self._mem.move_to_end(key)
                self._stats.hits += 1
                return Claim("hit", key, entry)
            event = self._inflight.get(key)
            if event is not None:
                return Claim("wait", key, event=event)
            self._inflight[key] = threading.Event()
        try:
            loaded = self._load(key, model_identity)
        except BaseException:  # never leave waiters hanging
            self._finish(key)
            raise
        if loaded is not None:
            with self._lock:
                self._stats.hits += 1
                self._stats.disk_hits += 1
                if isinstance(loaded, DocStates):
                    self._insert(key, loaded)
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
        _check_key(key)
        if not spans:
            raise ValueError("an entry needs at least one chunk")
        return EntryWriter(self, key, model_identity, spans, meta or {})

    def put(self, key: str, entry: DocStates, model_identity: str, extra_meta: dict[str, str] | None = None) -> None:
        """Store a computed entry (memory, and disk if configured) and release waiters.

        The entry is already in memory here; the disk copy is written in row slices, so
        no second copy of the whole entry is made. Never raises for a storage problem.
        """
        try:
            _check_key(key)
            entry = DocStates(entry.states.to("cpu"), entry.chunk_end_logits.cpu(), list(entry.spans))
            with self._lock:
                self._insert(key, entry)
            if self.directory is not None and entry.n_chunks:
                writer = EntryWriter(_DiskOnly(self), key, model_identity, entry.spans,  # type: ignore[arg-type]
                                     extra_meta or {})
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

    # ------------------------------------------------------------------ memory tier
    def _finish(self, key: str) -> None:
        with self._lock:
            event = self._inflight.pop(key, None)
        if event is not None:
            event.set()

    def _count(self, stat_name: str) -> None:
        with self._lock:
            setattr(self._stats, stat_name, getattr(self._stats, stat_name) + 1)

    def _evict_until(self, free: int) -> None:
        while self._mem and self._bytes + self._reserved + free > self.max_bytes:
            _, old = self._mem.popitem(last=False)
            self._bytes -= old.nbytes
            self._stats.evictions += 1

    def _insert(self, key: str, entry: DocStates) -> None:
        if entry.nbytes > self.max_bytes:
            return  # too big for memory; the disk tier may still hold it
        if key in self._mem:
            self._bytes -= self._mem.pop(key).nbytes
        self._evict_until(entry.nbytes)
        self._mem[key] = entry
        self._bytes += entry.nbytes

    def _reserve(self, nbytes: int) -> bool:
        """Set memory aside for an entry being written (evicting older entries)."""
        with self._lock:
            if nbytes > self.max_bytes - self._reserved:
                return False
            self._evict_until(nbytes)
            self._reserved += nbytes
            return True

    def _unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def _insert_reserved(self, key: str, entry: DocStates, reserved: int) -> None:
        with self._lock:
            self._reserved -= reserved
            self._insert(key, entry)

    # ------------------------------------------------------------------ disk tier
    def _path(self, key: str) -> Path:
        _check_key(key)
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def _root(self) -> SafeDir:
        assert self.directory is not None
        return SafeDir(self.directory)

    def _walk(self):
        """(shard folder, entry) for every entry of every real shard folder (links skipped)."""
        root = self._root()
        try:
            for d in list(root.entries()):
                if not _SHARD.match(d.name):
                    continue
                try:
                    shard = root.subdir(d.name)
                except SymlinkRefused:
                    logger.info("not following %s (a link or not a folder)", root.path / d.name)
                    continue
                except OSError:
                    continue
                try:
                    for entry in list(shard.entries()):
                        yield shard, entry
                finally:
                    shard.close()
        finally:
            root.close()

    @staticmethod
    def _old_regular(shard: SafeDir, name: str, max_age_s: float) -> bool:
        import stat as _stat

        try:
            st = shard.lstat(name)
        except OSError:
            return False
        return _stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime > max_age_s

    @staticmethod
    def _remove(shard: SafeDir, name: str) -> int:
        try:
            shard.unlink(name)
            return 1
        except OSError:
            return 0

    def _is_our_entry(self, shard: SafeDir, name: str) -> bool:
        m = _ENTRY.match(name)
        if m is None or m.group(1)[:2] != Path(shard.path).name:
            return False
        try:
            fd = shard.open_file(name)
        except OSError:  # a link, not a regular file, gone, unreadable
            return False
        try:
            meta = read_safetensors_metadata(fd)
        except (StateFormatError, OSError, ValueError):
            return False
        finally:
            _close_fd(fd)
        return meta.get("format") in _OUR_FORMATS and meta.get("key") == m.group(1)

    def _remove_empty_shards(self) -> None:
        root = self._root()
        try:
            for d in list(root.entries()):
                if _SHARD.match(d.name) and d.is_dir(follow_symlinks=False):
                    try:
                        root.rmdir(d.name)
                    except OSError:
                        pass  # not empty (or not ours to remove)
        finally:
            root.close()

    def _drop_bad(self, shard: SafeDir, name: str, why: BaseException) -> None:
        logger.warning("dropping bad cache file %s (%s); recomputing", name, why)
        self._count("bad_files")
        try:
            shard.unlink(name)
        except OSError:
            pass

    def _load(self, key: str, model_identity: str) -> "DocStates | DiskEntry | None":
        if self.directory is None:
            return None
        from . import __version__

        name = f"{key}.safetensors"
        try:
            root = self._root()
        except OSError as exc:
            logger.warning("cannot open the cache directory %s: %s", self.directory, exc)
            return None
        try:
            shard = root.subdir(key[:2])
        except FileNotFoundError:
            return None
        except SymlinkRefused as exc:
            self._count("refused_links")
            logger.warning("%s", exc)
            return None
        except OSError as exc:
            logger.warning("cannot open cache folder %s: %s", self.directory / key[:2], exc)
            return None
        finally:
            root.close()
        with shard:
            try:
                fd = shard.open_file(name)
            except FileNotFoundError:
                return None
            except SymlinkRefused as exc:
                self._count("refused_links")
                logger.warning("ignoring cache entry %s: %s", name[:12], exc)
                return None
            except OSError as exc:
                logger.warning("cannot read cache file %s: %s", name, exc)
                return None
            keep_fd = False
            try:
                rowfile = RowFile(fd, name)
                meta = rowfile.meta
                expected = {"format": _FORMAT, "key": key, "model_identity": model_identity,
                            "oprm_rag_version": __version__}
                for k, v in expected.items():
                    if meta.get(k) != v:
                        raise StateFormatError(f"{k} is {meta.get(k)!r}, expected {v!r}")
                rowfile.verify(self._hmac_key)
                spans = [(int(a), int(b)) for a, b in json.loads(meta["spans"])]
                family = meta["family"]
                if len(spans) != rowfile.n_rows or "state.position" not in rowfile.specs:
                    raise StateFormatError("entry shapes do not match its chunk spans")
                if any(k != "chunk_end_logits" and not k.startswith("state.") for k in rowfile.specs):
                    raise StateFormatError("entry holds unknown tensors")
                if rowfile.row_nbytes * rowfile.n_rows > self.max_bytes:
                    keep_fd = True
                    return DiskEntry(rowfile, family, spans)
                tensors = rowfile.read_rows(range(rowfile.n_rows))
                states = RecurrentState(family, {k[6:]: v for k, v in tensors.items() if k.startswith("state.")})
                return DocStates(states, tensors.get("chunk_end_logits", torch.zeros(0)), spans)
            except (StateFormatError, KeyError, ValueError, TypeError, IndexError) as exc:
                self._drop_bad(shard, name, exc)
                return None
            except OSError as exc:
                logger.warning("cannot read cache file %s (%s); recomputing", name, exc)
                return None
            finally:
                if not keep_fd:
                    _close_fd(fd)


class _DiskOnly:
    """The cache seen by ``put()``'s writer: the disk tier only (memory was handled by put)."""

    def __init__(self, cache: DocumentStateCache) -> None:
        self._cache = cache
        self.max_bytes = -1  # nothing fits: the writer keeps no rows in memory

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def _finish(self, key: str) -> None:  # put() releases waiters itself, once
        pass
