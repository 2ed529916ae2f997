"""``SafeDir``: a directory opened once, inside which names are opened, created, renamed
and deleted relative to that handle and never through a symbolic link (``O_NOFOLLOW``,
``O_EXCL``, ``dir_fd``), so a planted link cannot send a write, a read or a delete
outside it.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Iterator

__all__ = ["SafeDir", "SymlinkRefused", "DIR_FD"]


class SymlinkRefused(OSError):
    """A name that should be a plain file or folder is a symbolic link (or another kind)."""


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)
#: Whether names can be handled relative to a directory handle (Linux, BSD, macOS).
DIR_FD = bool(_NOFOLLOW and _DIRECTORY) and {os.open, os.rename, os.unlink, os.stat, os.rmdir, os.mkdir} \
    <= os.supports_dir_fd and os.scandir in os.supports_fd


class SafeDir:
    """A directory held open; names inside it are never followed through symbolic links.

    With ``dir_fd`` support (POSIX) every operation is relative to the open handle, so even
    a link planted between a check and a use cannot redirect it. Elsewhere, each name is
    checked with ``lstat`` first (a narrower, but not closed, window).
    """

    def __init__(self, path: str | Path, *, _fd: int | None = None) -> None:
        self.path = Path(path)
        self.fd: int | None = _fd
        if DIR_FD and _fd is None:
            self.fd = os.open(str(self.path), os.O_RDONLY | _DIRECTORY | _CLOEXEC)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "SafeDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- names
    def _p(self, name: str) -> str:
        if "/" in name or name in ("", ".", "..") or os.sep in name:
            raise ValueError(f"not a plain name: {name!r}")
        return str(self.path / name)

    def lstat(self, name: str) -> os.stat_result:
        if DIR_FD:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        return os.lstat(self._p(name))

    def subdir(self, name: str, create: bool = False) -> "SafeDir":
        """The folder ``name`` in here; raises ``SymlinkRefused`` if it is a link or not a folder."""
        self._p(name)
        if create:
            try:
                if DIR_FD:
                    os.mkdir(name, 0o777, dir_fd=self.fd)
                else:
                    os.mkdir(self._p(name), 0o777)
            except FileExistsError:
                pass
        if DIR_FD:
            try:
                fd = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, getattr(errno, "EMLINK", -1)):
                    raise SymlinkRefused(errno.ELOOP, f"{self.path / name} is a symbolic link or not a folder; "
                                                      "not following it") from exc
                raise
            return SafeDir(self.path / name, _fd=fd)
        st = os.lstat(self._p(name))
        if not stat.S_ISDIR(st.st_mode):
            raise SymlinkRefused(errno.ELOOP, f"{self.path / name} is a symbolic link or not a folder; "
                                              "not following it")
        return SafeDir(self.path / name)

    def open_file(self, name: str) -> int:
        """A read-only descriptor of the regular file ``name`` (never through a link)."""
        flags = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _BINARY
        try:
            fd = os.open(name, flags, dir_fd=self.fd) if DIR_FD else os.open(self._p(name), flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SymlinkRefused(errno.ELOOP, f"{self.path / name} is a symbolic link; not following it") \
                    from exc
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SymlinkRefused(errno.EINVAL, f"{self.path / name} is not a regular file")
        return fd

    def create_temp(self, prefix: str, suffix: str = ".tmp") -> tuple[str, int]:
        """A new, empty file ``prefix<random>suffix`` opened for writing (never an existing one)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY
        for _ in range(16):
            name = f"{prefix}{secrets.token_hex(6)}{suffix}"
            try:
                fd = os.open(name, flags, 0o644, dir_fd=self.fd) if DIR_FD else os.open(self._p(name), flags, 0o644)
            except FileExistsError:
                continue
            return name, fd
        raise FileExistsError(errno.EEXIST, f"no free temporary name in {self.path}")

    def rename(self, src: str, dst: str) -> None:
        """Atomically move ``src`` over ``dst`` (a link at ``dst`` is replaced, never followed)."""
        if DIR_FD:
            os.rename(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        else:
            os.replace(self._p(src), self._p(dst))

    def unlink(self, name: str) -> None:
        if DIR_FD:
            os.unlink(name, dir_fd=self.fd)
        else:
            os.unlink(self._p(name))

    def rmdir(self, name: str) -> None:
        if DIR_FD:
            os.rmdir(name, dir_fd=self.fd)
        else:
            os.rmdir(self._p(name))

    def entries(self) -> Iterator[os.DirEntry]:
        with os.scandir(self.fd if DIR_FD else str(self.path)) as it:  # type: ignore[arg-type]
            yield from it

    def fsync(self) -> None:
        if self.fd is not None:
            try:
                os.fsync(self.fd)
            except OSError:  # some filesystems do not sync folders; the rename is still atomic
                pass


# ---------------------------------------------------------------------------- row files
