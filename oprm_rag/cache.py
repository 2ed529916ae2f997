"""Document state cache: follow-up questions at the cost of the question alone.

For a recurrent model the state after ``[P, C_i]`` does not depend on the question and
has a fixed size. Keeping those states turns every later question about the same
document into N short prefills of ``Q``. Entries are keyed by a hash of the model
identity and dtype, the prompt prefix, the chunking settings and the document's token
ids; one entry holds all chunk states of one document under one chunking.

Tiers: an in-memory LRU bounded in bytes, and optionally a directory with one
safetensors file per entry (atomic writes, checksummed, header-checked; a bad file is
logged, deleted and recomputed, never trusted). Keys are hex digests, so a key can
never climb out of the directory. Thread-safe: two threads asking about the same new
document compute it once (the second waits for the first).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .state import RecurrentState, StateFormatError

__all__ = ["DocumentStateCache", "DocStates", "CacheStats", "cache_key"]

logger = logging.getLogger("oprm_rag")

_FORMAT = "oprm-doc-states/1"


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


@dataclass
class DocStates:
    """All chunk states of one document (one row per chunk, document order)."""

    states: RecurrentState
    chunk_end_logits: torch.Tensor  # [n, v] float32: next-token logits after each [P, C_i]
    spans: list[tuple[int, int]]  # token spans of the chunks

    @property
    def nbytes(self) -> int:
        return self.states.nbytes + self.chunk_end_logits.numel() * self.chunk_end_logits.element_size()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    disk_hits: int = 0
    evictions: int = 0
    bad_files: int = 0
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
    entry: DocStates | None = None
    event: threading.Event | None = field(default=None, repr=False)


class DocumentStateCache:
    """LRU of per-document chunk states with a byte budget, and an optional disk tier."""

    def __init__(self, max_bytes: int = 512 * 2**20, directory: str | Path | None = None) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._mem: "OrderedDict[str, DocStates]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self._stats = CacheStats(max_bytes=self.max_bytes)

    # ------------------------------------------------------------------ public
    def fits(self, nbytes: int) -> bool:
        """Whether an entry of this size can be kept (in memory or on disk)."""
        return nbytes <= self.max_bytes or self.directory is not None

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._stats.entries = len(self._mem)
            self._stats.bytes = self._bytes
            return self._stats.as_dict()

    def clear(self, disk: bool = False) -> None:
        with self._lock:
            self._mem.clear()
            self._bytes = 0
        if disk and self.directory is not None:
            for f in self.directory.glob("*/*.safetensors"):
                f.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._mem)

    def claim(self, key: str, model_identity: str) -> Claim:
        """Look ``key`` up; if absent, either take the job of computing it or get told to wait."""
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
            entry = self._load(key, model_identity)
        except BaseException:  # an unreadable file (gone, no permission): never leave waiters hanging
            self._finish(key)
            raise
        if entry is not None:
            with self._lock:
                self._stats.hits += 1
                self._stats.disk_hits += 1
                self._insert(key, entry)
            self._finish(key)
            return Claim("hit", key, entry)
        with self._lock:
            self._stats.misses += 1
        return Claim("own", key)

    def put(self, key: str, entry: DocStates, model_identity: str, extra_meta: dict[str, str] | None = None) -> None:
        """Store a computed entry (memory, and disk if configured) and release waiters."""
        try:
            entry = DocStates(entry.states.to("cpu"), entry.chunk_end_logits.cpu(), list(entry.spans))
            with self._lock:
                self._insert(key, entry)
            if self.directory is not None:
                self._save(key, entry, model_identity, extra_meta or {})
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
    def _finish(self, key: str) -> None:
        with self._lock:
            event = self._inflight.pop(key, None)
        if event is not None:
            event.set()

    def _insert(self, key: str, entry: DocStates) -> None:
        if entry.nbytes > self.max_bytes:
            return  # too big for memory; the disk tier may still hold it
        if key in self._mem:
            self._bytes -= self._mem.pop(key).nbytes
        self._mem[key] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes and self._mem:
            _, old = self._mem.popitem(last=False)
            self._bytes -= old.nbytes
            self._stats.evictions += 1

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError("cache keys are SHA-256 hex digests")
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def _save(self, key: str, entry: DocStates, model_identity: str, extra: dict[str, str]) -> None:
        from . import __version__

        tensors = {f"state.{k}": v for k, v in entry.states.to_safetensors_dict().items()}
        tensors["chunk_end_logits"] = entry.chunk_end_logits.contiguous()
        meta = {
            "format": _FORMAT,
            "key": key,
            "model_identity": model_identity,
            "oprm_rag_version": __version__,
            "family": entry.states.family,
            "spans": json.dumps(entry.spans),
            **extra,
        }
        from .io_utils import atomic_write_safetensors

        try:
            atomic_write_safetensors(self._path(key), tensors, meta)
        except OSError as exc:
            logger.warning("could not write cache file for %s: %s", key[:12], exc)

    def _load(self, key: str, model_identity: str) -> DocStates | None:
        if self.directory is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        from . import __version__
        from .io_utils import read_safetensors

        try:
            tensors, meta = read_safetensors(path)
            expected = {"format": _FORMAT, "key": key, "model_identity": model_identity,
                        "oprm_rag_version": __version__}
            for k, v in expected.items():
                if meta.get(k) != v:
                    raise StateFormatError(f"{k} is {meta.get(k)!r}, expected {v!r}")
            spans = [tuple(s) for s in json.loads(meta["spans"])]
            states = RecurrentState(meta["family"], {k[6:]: v for k, v in tensors.items() if k.startswith("state.")})
            logits = tensors["chunk_end_logits"]
            if "position" not in states.tensors or states.batch_size != len(spans) or logits.shape[0] != len(spans):
                raise StateFormatError("entry shapes do not match its chunk spans")
        except (StateFormatError, KeyError, ValueError, json.JSONDecodeError, OSError) as exc:
            logger.warning("dropping bad cache file %s (%s); recomputing", path.name, exc)
            with self._lock:
                self._stats.bad_files += 1
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        return DocStates(states, logits, [(int(a), int(b)) for a, b in spans])
