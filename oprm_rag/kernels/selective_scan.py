"""Mamba-1 selective scan that starts from a given state, in plain torch.

transformers' CPU path for Mamba-1 loops over time in Python with strided slices
and, when continuing from a cache over several tokens, drops the initial SSM state.
This scan fixes both:

* it takes ``h0`` and returns the final state, so a chunk can be continued from the
  shared-prefix state exactly;
* it lays the discretised inputs out time-major and updates the state with one fused
  ``addcmul`` per step into a preallocated buffer, in time blocks that bound memory
  (block x batch x d_inner x d_state floats at a time).

On CPU, :func:`selective_scan_time_major` (what the Mamba backend calls) runs the whole
scan in one pass of the native C kernel (``kernels/native.py``: discretisation, the
recurrence with each channel's state in L1, the D skip and the gate, split over the
intra-op threads), on the time-major layout the projections produce, so nothing of
size [t, d, n] is ever written; the torch scan above is its fallback and reference.

On CUDA with ``mamba-ssm`` installed, ``selective_scan_fn`` runs from a zero state and
the initial state's contribution is added in closed form: the recurrence is linear in
``h``, so ``h_t = exp(A * cumsum(dt))_t * h0 + h_t|zero-start``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan", "selective_scan_time_major", "selective_scan_reference"]

# Target floats per time block of the [block, batch, d_inner, d_state] buffers (~1 MiB).
_BLOCK_FLOATS = 1 << 18


def _discretise(x, dt, A, B, dt_bias):
    dt = F.softplus(dt.float() + dt_bias.float()[None, :, None])  # [b, d, t]
    return dt, A.float()


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    dt_bias: torch.Tensor,
    h0: torch.Tensor,
    use_kernel: bool = False,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the selective SSM over ``t`` steps from ``h0``.

    Shapes: ``x, dt, z`` [b, d, t]; ``A`` [d, n]; ``B, C`` [b, t, n]; ``D, dt_bias`` [d];
    ``h0`` [b, d, n] (float32). Returns ``y`` [b, d, t] (gated by ``silu(z)``, in x's
    dtype) and the final state [b, d, n] (float32).
    """
    if use_kernel:
        return _selective_scan_cuda(x, dt, A, B, C, D, z, dt_bias, h0)
    b, d, t = x.shape
    n = A.shape[-1]
    dt, A = _discretise(x, dt, A, B, dt_bias)
    if mask is not None:
        dt = dt * mask[:, None, :].to(dt.dtype)
    dt_tm = dt.permute(2, 0, 1)  # [t, b, d] time-major
    dtx = dt_tm * x.float().permute(2, 0, 1)
    B_tm = B.float().transpose(0, 1)  # [t, b, n]
    Cf = C.float()
    h = h0.float()
    ys = []
    # Small time blocks keep the [block, b, d, n] buffers in cache; the per-step update is
    # a single fused addcmul into the block's state buffer.
    block = max(4, min(64, _BLOCK_FLOATS // max(1, b * d * n)))
    for start in range(0, t, block):
        stop = min(t, start + block)
        dA = torch.exp(dt_tm[start:stop, ..., None] * A)  # [T, b, d, n]
        dBu = dtx[start:stop, ..., None] * B_tm[start:stop, :, None, :]
        states = torch.empty_like(dA)
        for i in range(stop - start):
            h = torch.addcmul(dBu[i], dA[i], h, out=states[i])
        ys.append(torch.einsum("tbdn,btn->bdt", states, Cf[:, start:stop]))
    y = torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
    y = y + x.float() * D.float()[None, :, None]
    y = y * F.silu(z.float())
    return y.to(x.dtype), h.clone() if t else h


def selective_scan_time_major(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    dt_bias: torch.Tensor,
    h0: torch.Tensor,
    pad_left: torch.Tensor | None = None,
    native: bool = True,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_scan` on time-major inputs, the layout the projections produce.

    ``x, dt, z`` [b, t, d] (views with a unit channel stride are taken as they are; ``dt``
    before softplus and bias, ``x`` zero on pads); ``B, C`` [b, t, n]; ``pad_left`` [b]
    (or None): each row's first pads keep the state. Returns ``y`` [b, t, d] (in x's
    dtype; 0 on pads) and the final state. On CPU with the native kernels
    (``kernels/native.py``) discretisation, scan, skip and gate are one C pass that never
    materialises the [t, d, n] discretised tensors; otherwise this is the torch scan.
    ``in_place`` updates ``h0`` itself (a contiguous float32 tensor the caller owns, as a
    decode session does).
    """
    if native and x.device.type == "cpu":
        from . import native as _native

        if _native.library() is not None and A.shape[-1] <= _native.MAX_STATE_TM:
            ok = h0.dtype == torch.float32 and h0.is_contiguous()
            h = h0 if (in_place and ok) else h0.float().clone(memory_format=torch.contiguous_format)
            y = _native.mamba1_scan_tm(_unit(x.float()), _unit(dt.float()), A.float().t(), _unit(B.float()),
                                       _unit(C.float()), D, _unit(z.float()), h, dt_bias=dt_bias, pad_left=pad_left)
            if y is not None:
                if in_place and not ok:
                    h0.copy_(h)
                return y.to(x.dtype), h
    mask = None
    if pad_left is not None:
        mask = torch.arange(x.shape[1], device=x.device)[None, :] >= pad_left.to(x.device)[:, None]
    y, h = selective_scan(x.transpose(1, 2), dt.transpose(1, 2), A, B, C, D, z.transpose(1, 2), dt_bias, h0,
                          mask=mask)
    y = y.transpose(1, 2)
    if mask is not None:
        y = y * mask[..., None].to(y.dtype)
    if in_place:
        h0.copy_(h)
    return y, h


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def selective_scan_reference(x, dt, A, B, C, D, z, dt_bias, h0):
    """The textbook step-by-step recurrence, for tests."""
    dt, A = _discretise(x, dt, A, B, dt_bias)
    h = h0.float().clone()
    ys = []
    for i in range(x.shape[-1]):
        dA = torch.exp(dt[:, :, i, None] * A)
        h = dA * h + (dt[:, :, i] * x[:, :, i].float())[..., None] * B[:, i, None, :].float()
        ys.append((h * C[:, i, None, :].float()).sum(-1))
    y = torch.stack(ys, -1) + x.float() * D.float()[None, :, None]
    return (y * F.silu(z.float())).to(x.dtype), h


def _selective_scan_cuda(x, dt, A, B, C, D, z, dt_bias, h0):
    """mamba-ssm's fused kernel from a zero state, plus h0's closed-form contribution."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as exc:  # pragma: no cover - needs CUDA
        raise ImportError(
            "The CUDA selective scan needs mamba-ssm: pip install 'oprm-rag[cuda]' "
            "(or pass kernels='torch' to use the portable scan)."
        ) from exc
    y0, h_zero = selective_scan_fn(  # pragma: no cover - needs CUDA
        x, dt, A.float(), B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float(),
        z=None, delta_bias=dt_bias.float(), delta_softplus=True, return_last_state=True,
    )
    dtf = F.softplus(dt.float() + dt_bias.float()[None, :, None])  # pragma: no cover
    cum = torch.cumsum(dtf, dim=-1)  # [b, d, t]
    # h0's decayed contribution, in time blocks: a whole [b, d, t, n] temporary would be GBs at 7B.
    Af, Cf, t = A.float(), C.float(), x.shape[-1]
    block = max(1, _BLOCK_FLOATS * 16 // max(1, h0.numel()))
    corr = torch.cat([torch.einsum("bdtn,btn->bdt", torch.exp(cum[:, :, s:s + block, None] * Af[:, None, :])
                                   * h0[:, :, None, :], Cf[:, s:s + block]) for s in range(0, t, block)], dim=-1)
    y = (y0.float() + corr) * F.silu(z.float())
    h_final = h_zero.float() + torch.exp(cum[:, :, -1, None] * A.float()) * h0
    return y.to(x.dtype), h_final
