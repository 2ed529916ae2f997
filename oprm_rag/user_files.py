"""The files a command writes for the user: checked before the work starts, never an input.

Why this module exists: ``oprm-rag eval`` and ``oprm-rag export-gguf`` run for minutes
(a model load, a sweep) before they write anything, so an output that cannot be written
(a read-only folder, ``--out`` that is a file, a parent that is a file) must fail at the
start, in one line, as the user's problem (:class:`~oprm_rag.errors.InputError`, exit 1),
never as an internal fault after the work is done. And an output must never be one of
the command's own inputs (results appended to the data file, a GGUF written over the
model's weights): paths are compared resolved, and by device and inode (hard links).

* :func:`check_output_file` / :func:`check_output_dir`: refuse what cannot be written;
* :func:`refuse_overwriting_inputs`: refuse an output that is an input file;
* :func:`replace_atomically`: write through a unique temp file in the output's own folder,
  renamed into place on success and removed on any failure or Ctrl-C;
* :func:`exclusive_output`: one writer per output at a time (a second run to the same
  file is refused, instead of one reporting success for a file the other then replaces);
* :func:`os_problem`: an ``OSError`` as the one-line ``InputError`` the user sees.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError

__all__ = ["check_output_file", "check_output_dir", "refuse_overwriting_inputs", "replace_atomically",
           "os_problem", "same_file", "exclusive_output"]


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    return exc.strerror or str(exc)


def os_problem(exc: OSError, what: str) -> InputError:
    """``exc`` as the user's problem: ``WHAT: cannot write/read it (reason)``."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in what else ""
    return InputError(f"{what}{where}: {_reason(exc)}")


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_dir(folder: Path, what: str) -> None:
    """Create and remove a temp file in ``folder``: the only sure test of "writable"
    (``os.access`` is wrong for root on a read-only mount, and for ACLs)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".oprm-probe-", dir=folder)
    except OSError as exc:
        raise InputError(f"{what}: cannot write in {folder} ({_reason(exc)})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


def check_output_dir(path: str | Path, what: str, *, create: bool = True) -> Path:
    """Check that files can be written in the folder ``path``; ``create`` makes it (and its
    parents), else the nearest folder that exists is checked and nothing is made yet."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} {p}: is a file, not a folder; give a folder for the results")
    above = _first_existing(p)
    if above.exists() and not above.is_dir():
        raise InputError(f"{what} {p}: {above} is a file, so no folder can be made under it")
    if not create:
        _probe_dir(above, f"{what} {p}")
        return p
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{what} {p}: cannot create the folder ({_reason(exc)})") from None
    _probe_dir(p, f"{what} {p}")
    return p


def check_output_file(path: str | Path, what: str, *, create_parent: bool = True) -> Path:
    """Check that the file ``path`` can be written; refuse a folder, a parent that is a
    file, a read-only place. Missing parent folders are created when ``create_parent``,
    else only the nearest folder that exists is checked (nothing is made yet)."""
    p = Path(path).expanduser()
    label = f"{what} {p}"
    if p.is_dir():
        raise InputError(f"{label}: is a folder; give a file name")
    parent = p.parent
    above = _first_existing(parent)
    if not above.is_dir():
        raise InputError(f"{label}: {above} is a file, not a folder")
    if not parent.is_dir():
        if not create_parent:
            _probe_dir(above, label)
            return p
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{label}: cannot create the folder {parent} ({_reason(exc)})") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{label}: the file is not writable (permission denied)")
    _probe_dir(parent, label)
    return p


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` name one file: the same resolved path, or the same
    device and inode (a hard link or a second mount)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    try:
        if pa.resolve() == pb.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop
        return False
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def refuse_overwriting_inputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path], what: str) -> None:
    """Raise when any output file is one of the input files."""
    ins = [Path(i) for i in inputs]
    for out in outputs:
        for inp in ins:
            if same_file(out, inp):
                raise InputError(f"{what}: it would write {out}, which is the input file {inp}; "
                                 "choose another output location")


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask would, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _new_file_mode(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777  # replacing a file keeps its mode
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def replace_atomically(path: str | Path, what: str) -> Iterator[Path]:
    """Yield a unique temp path beside ``path``; rename it onto ``path`` when the block
    ends, remove it when the block raises (Ctrl-C included). Two writers to one output
    never share a temp file, and a reader never sees a half-written one."""
    target = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise os_problem(exc, f"{what} {target}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, _new_file_mode(target))  # mkstemp makes 0600: give the mode a plain open() would
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise os_problem(exc, f"{what} {target}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def exclusive_output(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a hidden ``.NAME.lock`` beside it) for the block;
    another holder makes this raise at once, naming the output. The lock is the kernel's
    (``flock``): a crashed writer never leaves it held. Where ``flock`` does not exist
    (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    target = Path(path)
    lock = target.with_name(f".{target.name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise os_problem(exc, f"{what} {target}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{what} {target}: another process is writing this file right now; wait for it to "
                             "finish, or write to another file") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)
    finally:
        os.close(fd)
