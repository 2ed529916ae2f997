"""The disk tier: one row file per document entry under a private folder.

The rules (see :mod:`oprm_rag.storage.cache`): a cache never fails a question (every
disk problem is logged and counted, and the question goes through); it deletes and
follows nothing it does not own (files are opened relative to the folder's handle with
``O_NOFOLLOW``; ``clear`` deletes only files whose header says they are our entries under
their own name); bad files are never trusted (per-row SHA-256 and an entry digest,
optionally an HMAC under a secret key), but logged, deleted and recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from .._about import __version__
from ..errors import InputError, StateFormatError
from ..state import RecurrentState
from .entries import FORMAT, DiskEntry, DocStates, check_key, close_fd
from .rowfile import RowFile, RowFileWriter, read_safetensors_metadata
from .safedir import SafeDir, SymlinkRefused

__all__ = ["DiskTier", "ORPHAN_AGE_S"]

logger = logging.getLogger("oprm_rag")

#: Formats this package has written (clear() deletes entries of any of them).
_OUR_FORMATS = frozenset({"oprm-doc-states/1", FORMAT})
#: Temp files older than this (seconds) are taken for orphans of a killed writer.
ORPHAN_AGE_S = 3600.0

_SHARD = re.compile(r"^[0-9a-f]{2}$")
_ENTRY = re.compile(r"^([0-9a-f]{64})\.safetensors$")
_TEMP = re.compile(r"^\.[0-9a-f]{64}\.safetensors\.[0-9A-Za-z_]+\.tmp$")


class DiskTier:
    """Entries as row files in ``directory`` (two-hex-digit shard folders).

    ``count(name)`` is told of every bad file, refused link and write error (the cache's
    statistics); ``hmac_key`` keys the entry digests where the folder is shared.
    """

    def __init__(self, directory: str | Path, hmac_key: bytes | None, count: Callable[[str], None]) -> None:
        self.directory = self._prepare_directory(directory)
        self.hmac_key = hmac_key
        self.count = count

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

    def path(self, key: str) -> Path:
        """Where the entry for ``key`` lives."""
        check_key(key)
        return self.directory / key[:2] / f"{key}.safetensors"

    def _root(self) -> SafeDir:
        return SafeDir(self.directory)

    # ------------------------------------------------------------------ writing
    def create(self, key: str, n_rows: int, family: str, model_identity: str, spans: list[tuple[int, int]],
               meta: dict[str, str]) -> tuple[SafeDir, RowFileWriter]:
        """A row file being written for ``key`` (in its shard folder, which is returned too:
        the writer's names are relative to it). Raises on any storage problem."""
        root = self._root()
        try:
            shard = root.subdir(key[:2], create=True)
        finally:
            root.close()
        header = {"format": FORMAT, "key": key, "model_identity": model_identity, "oprm_rag_version": __version__,
                  "family": family, "spans": json.dumps(spans),
                  **{k: str(v) for k, v in meta.items() if k not in ("format", "key", "model_identity")}}
        try:
            return shard, RowFileWriter(shard, f"{key}.safetensors", n_rows, header, self.hmac_key)
        except BaseException:
            shard.close()
            raise

    # ------------------------------------------------------------------ housekeeping
    def clear(self) -> int:
        """Delete this cache's entry files (and our old temp files); returns how many."""
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

    def _walk(self) -> Iterator[tuple[SafeDir, os.DirEntry]]:
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
            close_fd(fd)
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
        self.count("bad_files")
        try:
            shard.unlink(name)
        except OSError:
            pass

    def load(self, key: str, model_identity: str, memory_budget: int) -> "DocStates | DiskEntry | None":
        """The entry for ``key`` if a good one is on disk: in memory when it fits
        ``memory_budget``, else read row by row (:class:`DiskEntry`); None otherwise."""
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
            self.count("refused_links")
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
                self.count("refused_links")
                logger.warning("ignoring cache entry %s: %s", name[:12], exc)
                return None
            except OSError as exc:
                logger.warning("cannot read cache file %s: %s", name, exc)
                return None
            keep_fd = False
            try:
                rowfile = RowFile(fd, name)
                meta = rowfile.meta
                expected = {"format": FORMAT, "key": key, "model_identity": model_identity,
                            "oprm_rag_version": __version__}
                for k, v in expected.items():
                    if meta.get(k) != v:
                        raise StateFormatError(f"{k} is {meta.get(k)!r}, expected {v!r}")
                rowfile.verify(self.hmac_key)
                spans = [(int(a), int(b)) for a, b in json.loads(meta["spans"])]
                family = meta["family"]
                if len(spans) != rowfile.n_rows or "state.position" not in rowfile.specs:
                    raise StateFormatError("entry shapes do not match its chunk spans")
                if any(k != "chunk_end_logits" and not k.startswith("state.") for k in rowfile.specs):
                    raise StateFormatError("entry holds unknown tensors")
                if rowfile.row_nbytes * rowfile.n_rows > memory_budget:
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
                    close_fd(fd)
