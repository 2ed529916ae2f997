"""Intra-op threads for small calls (decode steps, short continuations), set per thread.

A decode step at batch 1 is a few dozen tiny ops; so is OPRM's question pass. With torch's default of one intra-op
thread per core, any op large enough to be split (the LM head's matmul, the state update
at batch 8) enters an OpenMP parallel region and waits at its barrier for every thread;
when another process holds a core, that wait is a scheduler time slice per op, and
decoding collapses from thousands of tokens/s to tens. One thread per step avoids it.

``torch.set_num_threads`` cannot be used around each step: besides the calling thread's
settings it sets the default that every thread *not yet initialised* by torch reads
once and keeps, so a server thread that starts its first prefill while another thread
decodes would stay single-threaded for good. What torch's parallel loops and MKL use is
per thread: the thread's OpenMP ``nthreads`` setting, and MKL's thread-local count once
``torch.set_num_threads`` has been called in that thread. :func:`intra_op_threads` sets
exactly those two, through the OpenMP runtime and the MKL that torch loaded, and restores
them on exit; other threads (a concurrent prefill) and threads created meanwhile are
untouched. Where that is not possible (another parallel backend, the symbols not
visible, as on Windows), it changes nothing: decoding stays correct, only slower on a
busy machine. ``OPRM_SMALL_CALL_THREADS`` overrides the choice (0: never change threads).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["intra_op_threads", "step_threads", "per_thread_control", "SMALL_WORK"]

logger = logging.getLogger("oprm_rag")

#: Multiply-adds per call (parameters x tokens) up to which a call runs on one thread:
#: decode steps, and short continuations such as OPRM's question pass (N rows of |Q|
#: tokens; ~1,700 tokens on the shipped model, 8 on a 130M one). Every op of such a call
#: is small: a second thread saves little on a quiet machine, and on a busy one turns
#: each op's barrier into a wait for a scheduler time slice (the shipped model's
#: 9 x 13-token question pass: 4 ms on one thread, 0.4-0.7 s on two next to busy processes).
SMALL_WORK = 1 << 30

_ENV = "OPRM_SMALL_CALL_THREADS"
_probe_lock = threading.Lock()
_omp: Any = False  # False: not probed yet; None: unavailable; else _Controls


def _runtime() -> "_Controls | None":
    """The per-thread setters of the runtimes torch uses, or None (probed once)."""
    global _omp
    if _omp is not False:
        return _omp  # type: ignore[return-value]
    with _probe_lock:
        if _omp is False:
            _omp = _probe()
    return _omp  # type: ignore[return-value]


class _Controls:
    """``set(n) -> previous`` for this thread's OpenMP and (if linked) MKL thread counts."""

    def __init__(self, omp_set: Any, omp_get: Any, mkl_local: Any) -> None:
        self.omp_set, self.omp_get, self.mkl_local = omp_set, omp_get, mkl_local

    def set(self, n: int) -> tuple[int, int | None]:
        before = (int(self.omp_get()), None)
        self.omp_set(n)
        if self.mkl_local is not None:
            before = (before[0], int(self.mkl_local(n)))  # returns this thread's previous local count
        return before

    def restore(self, before: tuple[int, int | None]) -> None:
        self.omp_set(before[0])
        if self.mkl_local is not None and before[1] is not None:
            self.mkl_local(before[1])


def _symbol(lib: Any, name: str, argtypes: list[Any], restype: Any) -> Any:
    try:
        fn = getattr(lib, name)
    except AttributeError:
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def _probe() -> _Controls | None:
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        process = ctypes.CDLL(None)
    except (OSError, TypeError):  # no global namespace (Windows)
        return None
    omp_set = _symbol(process, "omp_set_num_threads", [ctypes.c_int], None)
    omp_get = _symbol(process, "omp_get_max_threads", [], ctypes.c_int)
    if omp_set is None or omp_get is None:
        return None
    mkl_local = mkl_get = None
    if torch.backends.mkl.is_available():  # MKL is linked into libtorch_cpu, its C API by value
        lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
        for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
            path = os.path.join(lib_dir, name)
            if os.path.isfile(path):
                try:
                    lib = ctypes.CDLL(path)  # already loaded: the same handle
                except OSError:
                    break
                mkl_local = _symbol(lib, "MKL_Set_Num_Threads_Local", [ctypes.c_int], ctypes.c_int)
                mkl_get = _symbol(lib, "MKL_Get_Max_Threads", [], ctypes.c_int)
                break
    controls = _Controls(omp_set, omp_get, mkl_local if mkl_get is not None else None)
    # Check these are the runtimes torch reads: a change through them must show.
    before_torch = torch.get_num_threads()  # also initialises this thread's setting
    target = before_torch + 1
    saved = controls.set(target)
    try:
        same = torch.get_num_threads() == target
        mkl_same = controls.mkl_local is not None and int(mkl_get()) == target
    finally:
        controls.restore(saved)
    if not mkl_same:
        controls.mkl_local = None  # no MKL, or not the one torch calls: OpenMP only
    if not same or torch.get_num_threads() != before_torch:
        logger.debug("oprm_rag.threads: the OpenMP runtime found is not torch's; threads left as they are")
        return None
    return controls


def per_thread_control() -> bool:
    """True when :func:`intra_op_threads` can change this thread's intra-op threads alone."""
    return _runtime() is not None


def step_threads(work: int) -> int | None:
    """Threads for a call of ``work`` multiply-adds (parameters x tokens): 1 for small
    calls (decode steps, short continuations), else None (leave torch's setting).
    ``OPRM_SMALL_CALL_THREADS=n`` forces n for small calls (0: never change threads)."""
    if work > SMALL_WORK:
        return None
    forced = os.environ.get(_ENV, "").strip()
    if forced:
        try:
            n = int(forced)
        except ValueError:
            raise ValueError(f"{_ENV} must be a whole number of threads (0: leave torch's), got {forced!r}") from None
        return n if n > 0 else None
    return 1


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads in *this* thread only (None: unchanged).

    Safe with other threads running torch at the same time: their settings, and the
    default new threads start from, are never touched. Nests and restores on exit,
    exceptions included.
    """
    rt = _runtime() if n is not None else None
    if rt is None:
        yield
        return
    import torch

    if torch.get_num_threads() == n and rt.mkl_local is None:  # (initialises this thread first)
        yield
        return
    saved = rt.set(n)  # type: ignore[arg-type]
    try:
        yield
    finally:
        rt.restore(saved)
