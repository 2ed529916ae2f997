"""Optional native CPU kernels (``oprm_rag/csrc/oprm_kernels.c``), with a torch fallback.

The C file has no Python or torch headers, so it builds in about a second with the
system C compiler: ``make install`` builds it (``python -m oprm_rag.kernels.native build``),
and the first use builds it if that did not happen. The library is loaded with ctypes
and called on contiguous float32 tensors; long calls are split by rows over the calling
thread's intra-op thread count (ctypes releases the GIL, so the parts run in parallel).
A decode step's matrix-vector products are too short for a Python hand-off: they split
over the C file's own thread pool (``oprm_gemv_mt``), whose workers spin briefly between
products and then sleep.

Anything that goes wrong (no compiler, an unwritable folder, a failed build, a CPU the
binary refuses) makes :func:`library` return None once, with one log line, and every
caller falls back to the pure-torch code, which gives the same results. ``OPRM_NATIVE=0``
turns the native kernels off.

The library file carries a hash of the source and the build command in its name, so a
changed source is rebuilt; it lives in ``oprm_rag/csrc/build/`` when that is writable,
else in the user cache (``$XDG_CACHE_HOME/oprm-rag/native``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["library", "enabled", "build", "mamba1_scan_tm", "mamba2_scan_tm", "gated_norm_tm", "causal_conv_tm", "Mamba2Step",
           "StepLinear", "native_exp", "native_softplus", "parallel_rows", "BUILD_ERROR"]

logger = logging.getLogger("oprm_rag")

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "oprm_kernels.c"
_ENV = "OPRM_NATIVE"
_FLAGS = ["-O3", "-std=gnu11", "-pthread", "-ffp-contract=fast", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math",
          "-fopenmp-simd"]
_lock = threading.Lock()
_lib: Any = False  # False: not loaded yet; None: unavailable
BUILD_ERROR: str | None = None  # why the library is unavailable (None: it is, or it was not tried)
# Work (multiply-adds, roughly) below which a call is not split over threads: a part
# must take well over the cost of handing it to another thread (and, on a busy
# machine, of waiting for that thread to be scheduled).
_MIN_WORK_PER_THREAD = 1 << 20
_pool: ThreadPoolExecutor | None = None
# The decode step's products hand parts to the C pool's spinning workers (about a
# microsecond), so a part pays from ~256 KB of float32 weights (~15 us of reading).
_GEMV_MIN_WORK_PER_THREAD = 1 << 16


def enabled() -> bool:
    """False when ``OPRM_NATIVE=0`` (native kernels off)."""
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _tag() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join([*_FLAGS, sys.platform]).encode())
    return h.hexdigest()[:16]


def _candidate_dirs() -> list[Path]:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "oprm-rag" / "native"
    return [SOURCE.parent / "build", cache, Path(tempfile.gettempdir()) / f"oprm-rag-native-{os.getuid()}"
            if hasattr(os, "getuid") else Path(tempfile.gettempdir()) / "oprm-rag-native"]


def _lib_name(tag: str) -> str:
    return f"liboprm_kernels-{tag}{'.dylib' if sys.platform == 'darwin' else '.so'}"


def build(force: bool = False) -> Path:
    """Compile the kernels (unless a library of this source is already built) and return
    the library's path. Raises RuntimeError, saying why, when none can be built."""
    if not SOURCE.is_file():
        raise RuntimeError(f"the kernel source {SOURCE} is missing; using the torch kernels")
    name = _lib_name(_tag())
    if not force:
        for folder in _candidate_dirs():
            if (folder / name).is_file():
                return folder / name
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang); using the torch kernels")
    errors = []
    for folder in _candidate_dirs():
        target = folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # build aside, then move: atomic
            os.close(fd)
            proc = subprocess.run([cc, *_FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode != 0:
                os.unlink(tmp)
                raise RuntimeError(proc.stderr.strip()[-2000:] or f"{cc} exited with {proc.returncode}")
            os.replace(tmp, target)
            return target
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            errors.append(f"{folder}: {exc}")
    raise RuntimeError("could not build the native kernels:\n" + "\n".join(errors))


def _bind(lib: Any) -> Any:
    i64, fp = ctypes.c_int64, ctypes.c_void_p
    lib.oprm_exp.argtypes, lib.oprm_exp.restype = [i64, fp, fp], None
    lib.oprm_softplus_buf.argtypes, lib.oprm_softplus_buf.restype = [i64, fp, fp], None
    lib.oprm_mamba1_scan_tm.argtypes = [i64, i64, i64, i64, fp, i64, i64, fp, i64, i64, fp, fp, fp, fp, i64, i64,
                                        fp, i64, i64, fp, fp, i64, i64, fp, fp, i64, i64, i64, i64]
    lib.oprm_mamba1_scan_tm.restype = ctypes.c_int
    lib.oprm_conv_tm.argtypes = [i64, i64, i64, i64, fp, i64, i64, fp, fp, fp, fp, ctypes.c_int, fp, fp, i64, i64]
    lib.oprm_conv_tm.restype = ctypes.c_int
    f32 = ctypes.c_float
    lib.oprm_mamba2_step.argtypes = [i64, i64, i64, i64, i64, i64, fp, i64, fp, fp, fp, fp, f32, f32, fp, fp, fp, fp,
                                     i64, f32, f32, f32, ctypes.c_int, fp, fp, i64, i64]
    lib.oprm_mamba2_step.restype = ctypes.c_int
    lib.oprm_mamba2_scan_tm.argtypes = [i64, i64, i64, i64, i64, i64, fp, i64, i64, fp, i64, i64, fp, fp, i64, i64,
                                        fp, i64, i64, f32, f32, fp, fp, i64, i64, i64, i64, i64]
    lib.oprm_mamba2_scan_tm.restype = ctypes.c_int
    lib.oprm_gemv_mt.argtypes = [ctypes.c_int, i64, fp, i64, i64, fp, i64, fp, fp, i64, i64, ctypes.c_int]
    lib.oprm_gemv_mt.restype = ctypes.c_int
    lib.oprm_gated_norm_tm.argtypes = [i64, i64, i64, fp, i64, i64, fp, i64, i64, fp, i64, i64, fp, fp, i64, f32,
                                       i64, i64]
    lib.oprm_gated_norm_tm.restype = ctypes.c_int
    return lib


def library() -> Any:
    """The loaded kernels (a ctypes library), or None when unavailable or turned off."""
    global _lib, BUILD_ERROR
    if not enabled():
        return None
    if _lib is not False:
        return _lib
    with _lock:
        if _lib is False:
            try:
                _lib = _bind(ctypes.CDLL(str(build())))
            except (RuntimeError, OSError, AttributeError) as exc:
                BUILD_ERROR = str(exc)
                logger.info("oprm_rag: native CPU kernels unavailable, using torch (%s)", str(exc).splitlines()[0])
                _lib = None
    return _lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _parts(rows: int, work_per_row: int, threads: int | None, min_work: int) -> int:
    """How many parts to split ``rows`` into: at most ``threads`` (None: this thread's
    intra-op count) and ``rows``, each at least ``min_work`` of work."""
    threads = torch.get_num_threads() if threads is None else threads
    return max(1, min(threads, rows, rows * work_per_row // min_work))


def parallel_rows(rows: int, run: Callable[[int, int], None], threads: int | None = None,
                  work_per_row: int = 1) -> None:
    """Call ``run(start, stop)`` on disjoint row ranges covering ``rows``, on up to
    ``threads`` threads (default: the calling thread's torch intra-op thread count), each
    part at least ``_MIN_WORK_PER_THREAD`` of work (``work_per_row`` per row)."""
    global _pool
    parts = _parts(rows, work_per_row, threads, _MIN_WORK_PER_THREAD)
    if parts == 1:
        run(0, rows)
        return
    with _lock:
        if _pool is None or _pool._max_workers < parts - 1:  # type: ignore[attr-defined]
            _pool = ThreadPoolExecutor(max_workers=max(parts - 1, os.cpu_count() or 1),
                                       thread_name_prefix="oprm-native")
        pool = _pool
    bounds = [rows * i // parts for i in range(parts + 1)]
    futures = [pool.submit(run, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    run(bounds[0], bounds[1])  # this thread takes the first part
    for f in futures:
        f.result()


def _elementwise(symbol: str, x: torch.Tensor) -> torch.Tensor:
    lib = library()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {BUILD_ERROR}")
    x = x.float().contiguous()
    out = torch.empty_like(x)
    getattr(lib, symbol)(x.numel(), x.data_ptr(), out.data_ptr())
    return out


def native_exp(x: torch.Tensor) -> torch.Tensor:
    """The kernels' own exp, elementwise (for tests). Needs the library."""
    return _elementwise("oprm_exp", x)


def native_softplus(x: torch.Tensor) -> torch.Tensor:
    """The kernels' own softplus, elementwise (for tests). Needs the library."""
    return _elementwise("oprm_softplus_buf", x)


#: State rows (channels of a head) per unit of work in the Mamba-2 scan: a 130M-shaped
#: layer (24 heads of 64) gives 96 units, enough to balance 16 threads.
SCAN_ROWS_PER_UNIT = 16
LANES = 16  # channels per block in the time-major scan (OPRM_LANES in the C file)
MAX_STATE_TM = 256
CONV_T = 32  # tokens per unit of work in the causal conv (OPRM_CONV_T in the C file)


def _bt(t: torch.Tensor | None) -> tuple[int | None, int, int]:
    """Pointer, batch stride and time stride of a [b, t, c] float32 view with unit last stride."""
    if t is None:
        return None, 0, 0
    if t.dtype != torch.float32 or t.stride(-1) != 1 or t.device.type != "cpu":
        raise ValueError("native kernels take float32 CPU tensors with a unit last stride")
    return t.data_ptr(), t.stride(0), t.stride(1)


def _pads(pad_left: torch.Tensor | None, b: int) -> torch.Tensor | None:
    if pad_left is None:
        return None
    pads = pad_left.to(device="cpu", dtype=torch.int64).contiguous()
    if pads.shape != (b,):
        raise ValueError(f"pad_left must have shape [{b}]")
    return pads


def mamba1_scan_tm(x: torch.Tensor, dt: torch.Tensor, At: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None, z: torch.Tensor | None, h: torch.Tensor,
                   dt_bias: torch.Tensor | None = None, pad_left: torch.Tensor | None = None,
                   threads: int | None = None) -> torch.Tensor | None:
    """The Mamba-1 scan in C, time-major: ``x, dt, z`` [b, t, d] (any batch and time strides,
    unit channel stride: views of the projections are fine), ``At`` [n, d] (A transposed),
    ``B, C`` [b, t, n], ``D`` [d], ``h`` [b, d, n] contiguous float32, updated in place to
    the final state. ``dt`` is discretised unless ``dt_bias`` is given (then softplus(dt +
    bias) is taken here); ``pad_left`` [b]: each row's first pads keep the state and
    output 0. Returns ``y`` [b, t, d] float32 (gated by silu(z) when ``z`` is given), or
    None without the library (or with a state larger than it takes)."""
    lib = library()
    n = At.shape[0]
    if lib is None or n > MAX_STATE_TM:
        return None
    b, t, d = x.shape
    if not (h.dtype == torch.float32 and h.is_contiguous() and h.device.type == "cpu"):
        raise ValueError("mamba1_scan_tm updates h in place: it must be a contiguous float32 CPU tensor")
    At = At.float().contiguous()
    D = None if D is None else D.float().contiguous()
    bias = None if dt_bias is None else dt_bias.float().contiguous()
    pads = _pads(pad_left, b)
    y = torch.empty(b, t, d, dtype=torch.float32)
    args = [*_bt(x), *_bt(dt), _ptr(bias), _ptr(pads), At.data_ptr(), *_bt(B), *_bt(C), _ptr(D), *_bt(z),
            h.data_ptr(), *_bt(y)]
    blocks = b * ((d + LANES - 1) // LANES)

    def run(start: int, stop: int) -> None:
        lib.oprm_mamba1_scan_tm(b, d, t, n, *args, start, stop)

    with torch.profiler.record_function("oprm::mamba1_scan"):
        parallel_rows(blocks, run, threads, work_per_row=LANES * t * n * 8)
    return y


def causal_conv_tm(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   pad_left: torch.Tensor | None = None, silu: bool = True,
                   threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mamba's causal depthwise conv in C on time-major input: ``x`` [b, t, d] (unit channel
    stride), ``state`` [b, d, K-1] (the previous inputs), ``weight`` [d, K], ``bias`` [d].
    Left pads are moved in front of the state (as ``shifted_conv_input`` does) and output 0.
    Returns the conv output [b, t, d] float32 (SiLU applied when ``silu``) and the new
    state [b, d, K-1] float32, or None without the library."""
    lib = library()
    if lib is None:
        return None
    b, t, d = x.shape
    K = weight.shape[-1]
    if K > 16 or state.shape != (b, d, K - 1):
        return None
    state = state.float().contiguous()
    weight_t = weight.float().reshape(d, K).t().contiguous()  # [K, d]: a tap is a contiguous row
    bias = None if bias is None else bias.float().contiguous()
    pads = _pads(pad_left, b)
    out = torch.empty(b, t, d, dtype=torch.float32)
    new_state = torch.empty(b, d, K - 1, dtype=torch.float32)
    args = [*_bt(x), state.data_ptr(), weight_t.data_ptr(), _ptr(bias), _ptr(pads), 1 if silu else 0,
            out.data_ptr(), new_state.data_ptr()]
    units = b * ((t + CONV_T - 1) // CONV_T)  # (batch row, CONV_T tokens): whole rows, read contiguously

    def run(start: int, stop: int) -> None:
        lib.oprm_conv_tm(b, d, t, K, *args, start, stop)

    with torch.profiler.record_function("oprm::causal_conv"):
        parallel_rows(units, run, threads, work_per_row=CONV_T * d * K)
    return out, new_state


def mamba2_scan_tm(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   h: torch.Tensor, alpha_scale: float = 1.0, b_scale: float = 1.0,
                   threads: int | None = None) -> torch.Tensor | None:
    """The Mamba-2 (SSD) recurrence in C, time-major: ``x`` [b, t, heads*p], ``dt`` [b, t, heads]
    (discretised; 0 on pads), ``B, C`` [b, t, g*n] (any batch and time strides, unit last
    stride: views of the conv output are fine), ``A`` [heads], ``h`` [b, heads, p, n]
    contiguous float32, updated in place to the final state. Returns ``y`` [b, t, heads*p]
    float32 (no D skip, no gate), or None without the library."""
    lib = library()
    if lib is None:
        return None
    b, t, heads = dt.shape
    p, n = h.shape[2], h.shape[3]
    g = B.shape[-1] // n
    if not (h.dtype == torch.float32 and h.is_contiguous() and h.device.type == "cpu" and h.shape[:2] == (b, heads)):
        raise ValueError("mamba2_scan_tm updates h in place: it must be a contiguous float32 CPU tensor [b, heads, p, n]")
    if x.shape != (b, t, heads * p) or B.shape != (b, t, g * n) or C.shape != B.shape or g < 1 or heads % g:
        raise ValueError(f"mamba2_scan_tm: shapes x {tuple(x.shape)}, dt {tuple(dt.shape)}, B {tuple(B.shape)}, "
                         f"C {tuple(C.shape)}, h {tuple(h.shape)} do not fit together")
    A = A.float().contiguous()
    y = torch.empty(b, t, heads * p, dtype=torch.float32)
    args = [*_bt(x), *_bt(dt), A.data_ptr(), *_bt(B), *_bt(C), float(alpha_scale), float(b_scale), h.data_ptr(),
            *_bt(y)]

    rows = min(p, SCAN_ROWS_PER_UNIT)
    blocks = -(-p // rows)

    def run(start: int, stop: int) -> None:
        if lib.oprm_mamba2_scan_tm(b, t, heads, p, n, g, *args, rows, start, stop) != 0:
            raise ValueError("the native Mamba-2 scan does not take these shapes")

    with torch.profiler.record_function("oprm::mamba2_scan"):
        parallel_rows(b * heads * blocks, run, threads, work_per_row=2 * t * rows * n)
    return y


def gated_norm_tm(y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, D: torch.Tensor, weight: torch.Tensor,
                  norm_groups: int, eps: float, threads: int | None = None) -> torch.Tensor | None:
    """``y <- weight * rmsnorm_groups((y + D x) * silu(z))`` in place, in one pass per token
    (the D skip and transformers' ``MambaRMSNormGated`` after the Mamba-2 scan). ``y``
    [b, t, heads, p] float32 (unit last stride), ``x`` and ``z`` [b, t, heads*p] views with
    a unit last stride, ``D`` [heads], ``weight`` [heads*p]. Returns ``y``, or None
    without the library."""
    lib = library()
    if lib is None:
        return None
    b, t, heads, p = y.shape
    if y.stride(-1) != 1 or y.stride(-2) != p:
        raise ValueError("gated_norm_tm: y must have its heads and channels contiguous")
    Dc, wc = D.float().contiguous(), weight.float().contiguous()
    args = [t, heads, p, y.data_ptr(), y.stride(0), y.stride(1), *_bt(x), *_bt(z), Dc.data_ptr(), wc.data_ptr(),
            int(norm_groups), float(eps)]

    def run(start: int, stop: int) -> None:
        if lib.oprm_gated_norm_tm(*args, start, stop) != 0:
            raise ValueError("gated_norm_tm: the channels do not split into the norm's groups")

    with torch.profiler.record_function("oprm::gated_norm"):
        parallel_rows(b * t, run, threads, work_per_row=8 * heads * p)
    return y


#: The bf16 product's limits (OPRM_GEMV_PAIRS_MAX, OPRM_GEMV_BATCH_MAX in the C file).
_GEMV_BF16_MAX_K, _GEMV_MAX_BATCH = 16384, 16


class StepLinear:
    """``F.linear(x, weight, bias)`` for a decode step (x [b, k], b small) in C: each block of
    weight rows read from memory once for all b inputs, rows split over ``threads``
    threads on the native kernels' pool (waiting threads sleep, they do not spin at a
    barrier as torch's do).

    ``weight_dtype`` bfloat16 stores a bf16 copy of the weight (half the bytes a step
    reads) and accumulates in float32; float32 uses the weight as it is (no copy when it
    is contiguous float32). Output: float32 [b, rows]. ``threads``: None takes the calling
    thread's intra-op count at each call (a decode session passes its thread's own count,
    taken outside its one-thread block). Batches over 16 rows and shapes the bf16 kernel
    does not take run ``F.linear`` on the float32 weight (or the widened bf16 copy)."""

    def __init__(self, lib: Any, weight: torch.Tensor, bias: torch.Tensor | None,
                 weight_dtype: torch.dtype = torch.float32, threads: int | None = None) -> None:
        if weight.dim() != 2 or weight.device.type != "cpu":
            raise ValueError("StepLinear takes a 2-D CPU weight")
        if weight_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"StepLinear stores float32 or bfloat16 weights, not {weight_dtype}")
        rows, k = weight.shape
        if weight_dtype == torch.bfloat16 and (k % 2 or k > _GEMV_BF16_MAX_K):
            weight_dtype = torch.float32  # shapes the bf16 kernel does not take: stay exact
        self.lib = lib
        w = weight.detach()
        self.weight = w.to(weight_dtype).contiguous() if (w.dtype != weight_dtype or not w.is_contiguous()) else w
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.rows, self.k = rows, k
        self.bf16 = weight_dtype == torch.bfloat16
        self.nbytes = self.weight.numel() * self.weight.element_size()
        self.threads = threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.stride(-1) != 1:
            x = x.float().contiguous()
        b = x.shape[0]
        if b > _GEMV_MAX_BATCH:
            return F.linear(x, self.weight.float() if self.bf16 else self.weight, self.bias)
        y = torch.empty(b, self.rows, dtype=torch.float32)
        parts = _parts(self.rows, self.k * b, self.threads, _GEMV_MIN_WORK_PER_THREAD)
        with torch.profiler.record_function("oprm::step_linear"):
            # The C pool, not parallel_rows: a part here is ~100 us, what a Python hand-off costs.
            rc = self.lib.oprm_gemv_mt(1 if self.bf16 else 0, self.k, self.weight.data_ptr(), self.k, b, x.data_ptr(),
                                       x.stride(0), _ptr(self.bias), y.data_ptr(), self.rows, self.rows, parts)
        if rc != 0:
            raise ValueError("the native matrix-vector product does not take these shapes")
        return y


class Mamba2Step:
    """One layer's Mamba-2 mixer step in C, with its constants prepared once (a decode
    session makes one per layer). ``__call__`` takes in_proj's output [b, ld] and the
    session's own conv state [b, conv_dim, K-1] and SSM state [b, heads, p, n] (contiguous
    float32, updated in place) and returns the normed, gated output [b, heads*p]."""

    def __init__(self, lib: Any, *, heads: int, head_dim: int, d_state: int, groups: int, conv_w: torch.Tensor,
                 conv_b: torch.Tensor | None, dt_bias: torch.Tensor, dt_limit: tuple[float, float], A: torch.Tensor,
                 D: torch.Tensor, norm_w: torch.Tensor, norm_groups: int, eps: float, alpha_scale: float,
                 b_scale: float, normalize: bool) -> None:
        self.lib = lib
        self.dims = (heads, head_dim, d_state, groups, conv_w.shape[-1])
        keep = [t.detach().float().contiguous() if t is not None else None
                for t in (conv_w, conv_b, dt_bias, A, D, norm_w)]
        self._keep = keep  # the pointers below stay valid while the session lives
        self.conv_w, self.conv_b, self.dt_bias, self.A, self.D, self.norm_w = (_ptr(t) for t in keep)
        self.dt_lo, self.dt_hi = float(dt_limit[0]), float(min(dt_limit[1], 3.0e38))
        self.norm_groups, self.eps = int(norm_groups), float(eps)
        self.alpha, self.bscale, self.normalize = float(alpha_scale), float(b_scale), 1 if normalize else 0
        self.conv_dim = heads * head_dim + 2 * groups * d_state
        self._scratch: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def __call__(self, zxbcdt: torch.Tensor, conv_state: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        heads, p, n, g, K = self.dims
        b = zxbcdt.shape[0]
        if zxbcdt.stride(-1) != 1 or zxbcdt.dtype != torch.float32:
            zxbcdt = zxbcdt.float().contiguous()
        if self._y is None or self._y.shape[0] != b:
            self._scratch = torch.empty(b, self.conv_dim)
            self._y = torch.empty(b, heads * p)
        y = torch.empty_like(self._y)  # returned to the caller: a fresh tensor per step
        rc = self.lib.oprm_mamba2_step(b, heads, p, n, g, K, zxbcdt.data_ptr(), zxbcdt.stride(0), conv_state.data_ptr(),
                                       self.conv_w, self.conv_b, self.dt_bias, self.dt_lo, self.dt_hi, self.A, self.D,
                                       h.data_ptr(), self.norm_w, self.norm_groups, self.eps, self.alpha, self.bscale,
                                       self.normalize, self._scratch.data_ptr(), y.data_ptr(), 0, b)  # type: ignore[union-attr]
        if rc != 0:
            raise ValueError("the native Mamba-2 step does not take these shapes")
        return y


def _main(argv: list[str]) -> int:
    if argv[:1] != ["build"]:
        print("usage: python -m oprm_rag.kernels.native build", file=sys.stderr)
        return 2
    try:
        path = build(force="--force" in argv)
    except RuntimeError as exc:
        print(f"oprm-rag native kernels not built ({exc}); the torch kernels will be used.")
        return 0  # never fail an install: the torch path is complete
    print(f"oprm-rag native kernels: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
