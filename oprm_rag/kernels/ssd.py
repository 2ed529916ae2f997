"""Mamba-2 state-space duality (SSD) scan from a given state, in plain torch.

The chunked form computes each chunk's outputs with a masked, attention-like product
and carries the state across chunks with one decay per head, so it is matrix work,
not a Python loop over time. Short inputs are never padded to the chunk length: a
31-token question is one 31-token chunk (:func:`chunk_length`), and one token takes
:func:`ssd_step`. It takes an initial state and returns the final one, so
OPRM can continue every chunk from the shared-prefix state exactly.

The scan also hosts the training-free state-collapse mitigations of Stuffed Mamba
(Chen et al. 2024), all off by default and exact no-ops at their neutral settings:

* ``alpha_scale`` (c_alpha) and ``b_scale`` (c_B): alpha_t <- c_alpha * alpha_t, B_t <- c_B * B_t;
* ``normalize_state``: h_t <- h_t / ||h_t|| after every update (per head, recurrent form);
* ``window`` (see :func:`ssd_window_scan`): sliding window by state difference,
  h_t^(r) = h_t - alpha_{t-r+1:t} h_{t-r}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["CPU_CHUNK", "SSDParams", "ssd_scan", "ssd_step", "ssd_reference", "ssd_window_scan", "discretise_dt",
           "chunk_length"]


@dataclass(frozen=True)
class SSDParams:
    """Mitigation settings applied inside the scan (neutral values change nothing)."""

    alpha_scale: float = 1.0
    b_scale: float = 1.0
    normalize_state: bool = False

    @property
    def neutral(self) -> bool:
        return self.alpha_scale == 1.0 and self.b_scale == 1.0 and not self.normalize_state


NEUTRAL = SSDParams()

#: The longest chunk the torch scan uses on a CPU, whatever the model's config says
#: (Mamba-2 configs say 256, a GPU kernel's tile). Work inside a chunk grows with its
#: length while carrying states does not: on a 130M-shaped layer (24 heads, p 64, n 128)
#: chunks of 32-64 run 3-4x faster than 256 (measured, one thread). Any length is exact.
CPU_CHUNK = 64


def discretise_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    dt = F.softplus(dt.float() + dt_bias.float())
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    groups = t.shape[2]
    return t if groups == heads else t.repeat_interleave(heads // groups, dim=2)


def chunk_length(t: int, chunk_size: int) -> int:
    """The chunk length for ``t`` tokens: ``t`` itself up to ``chunk_size``, else chunks of
    equal length (at most ``chunk_size``) that cover ``t`` with the least padding.

    The chunked scan's cost per chunk is quadratic in its length and it pads the last
    chunk, so a 31-token question (the OPRM question pass) must not pay for 64 tokens:
    one chunk of 31 is exact and costs a quarter as much.
    """
    if t <= chunk_size:
        return max(1, t)
    chunks = -(-t // chunk_size)
    return -(-t // chunks)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    h0: torch.Tensor,
    chunk_size: int = 64,
    params: SSDParams = NEUTRAL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan.

    Shapes: ``x`` [b, t, h, p]; ``dt`` [b, t, h] already discretised (softplus, clamp);
    ``A`` [h] (negative); ``B, C`` [b, t, g, n]; ``h0`` [b, h, p, n]. Returns
    ``y`` [b, t, h, p] float32 (no D skip, no gate) and the final state (float32).
    ``chunk_size`` is the longest chunk; the length used is :func:`chunk_length`. B and
    C stay per group (heads of a group share them): the C.B products are computed once
    per group, not once per head.

    Where the time goes, and why it is written this way: per token, the work inside a
    chunk of length L is O(h L p) (the masked product) plus O(h L) elementwise work on
    the L x L decays; carrying states is O(h p n) whatever L is. So a long chunk only
    adds work on a CPU (callers cap it, see :data:`CPU_CHUNK`). The decays are
    ``exp(cum_l - cum_s)`` of one cumulative sum per chunk (as the fused CUDA kernels
    compute them), built in place in one [.., L, L] buffer: no L x L cumulative sum, no
    second masked copy. The chunk's contribution to its end state reuses the decays'
    last row.
    """
    if params.normalize_state:
        return _ssd_recurrent(x, dt, A, B, C, h0, params)
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    L = chunk_length(t, chunk_size)
    Bf = B.float() if params.b_scale == 1.0 else B.float() * params.b_scale
    Cf = C.float()
    dA = dt * A.float()[None, None, :]  # [b, t, h] log-decay per step
    if params.alpha_scale != 1.0:  # not on padded steps (dt == 0), which must stay no-ops
        dA = dA + math.log(params.alpha_scale) * (dt > 0)
    xdt = x.float() * dt[..., None]

    pad = (-t) % L
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        dA = F.pad(dA, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    c = (t + pad) // L
    # Time-major per chunk: x*dt [b, c, L, h, p]; log-decays summed within each chunk.
    xt = xdt.view(b, c, L, h, p)
    a_cum = torch.cumsum(dA.view(b, c, L, h).transpose(-1, -2), dim=-1)  # [b, c, h, L]
    Bg = Bf.reshape(b, c, L, g, n).permute(0, 1, 3, 2, 4)  # [b, c, g, L, n]
    Cg = Cf.reshape(b, c, L, g, n).permute(0, 1, 3, 2, 4)

    # Within each chunk: y_l = sum_{s<=l} C_l.B_s * exp(cum_l - cum_s) * x_s dt_s (heads-major).
    decay = a_cum[..., :, None] - a_cum[..., None, :]  # [b, c, h, L, S]
    decay.masked_fill_(_upper(L, a_cum.device), -math.inf).exp_()
    to_end = decay[..., -1, :].transpose(-1, -2)  # [b, c, L, h]: exp(cum_end - cum_s)
    # Each chunk's own contribution to the state at its end, sum_s exp(cum_end - cum_s) x_s dt_s B_s,
    # as one product per chunk and group: [h/g * p, L] @ [L, n], straight into the state layout.
    weighted = (xt * to_end[..., None]).view(b, c, L, g, hg * p).permute(0, 1, 3, 4, 2)
    chunk_states = torch.matmul(weighted, Bg).view(b, c, h, p, n)
    cb = torch.matmul(Cg, Bg.transpose(-1, -2))  # [b, c, g, L, S], once per group
    scores = decay.view(b, c, g, hg, L, L).mul_(cb[:, :, :, None]).view(b, c, h, L, L)
    y_in = torch.matmul(scores, xt.permute(0, 1, 3, 2, 4))  # [b, c, h, L, p]

    # Carry states across chunks: s_k = exp(sum a of chunk k) s_{k-1} + chunk_states_k, written in place.
    chunk_decay = torch.exp(a_cum[..., -1])[..., None, None]  # [b, c, h, 1, 1]
    starts = torch.empty(b, c + 1, h, p, n, dtype=torch.float32, device=x.device)
    starts[:, 0] = h0
    for k in range(c):
        torch.addcmul(chunk_states[:, k], chunk_decay[:, k], starts[:, k], out=starts[:, k + 1])

    # The start state's contribution inside each chunk, exp(cum_l) C_l . s_start: one product per chunk
    # and group, [L, n] @ [n, h/g * p], time-major; then the intra-chunk term is added in place.
    off = torch.matmul(Cg, starts[:, :c].view(b, c, g, hg * p, n).transpose(-1, -2))  # [b, c, g, L, hg p]
    y = torch.empty(b, c, L, g, hg, p, dtype=torch.float32, device=x.device)
    torch.mul(off.permute(0, 1, 3, 2, 4).unflatten(-1, (hg, p)),
              torch.exp(a_cum).transpose(-1, -2).reshape(b, c, L, g, hg, 1), out=y)
    y = y.add_(y_in.permute(0, 1, 3, 2, 4).view(b, c, L, g, hg, p)).view(b, c * L, h, p)
    return (y[:, :t] if pad else y), starts[:, c]


@lru_cache(maxsize=16)
def _upper_cached(L: int, device: str) -> torch.Tensor:
    return torch.triu(torch.ones(L, L, dtype=torch.bool, device=device), 1)


def _upper(L: int, device: torch.device) -> torch.Tensor:
    """[L, L] bool, True strictly above the diagonal (s > l: no contribution)."""
    return _upper_cached(L, str(device))


def ssd_step(x, dt, A, B, C, h, params: SSDParams = NEUTRAL):
    """One recurrent step. ``x`` [b, h, p]; ``dt`` [b, h] discretised; ``B, C`` [b, g, n]."""
    heads = x.shape[1]
    Bf = B.float().repeat_interleave(heads // B.shape[1], dim=1) * params.b_scale
    Cf = C.float().repeat_interleave(heads // C.shape[1], dim=1)
    decay = torch.exp(dt * A.float()[None, :])
    if params.alpha_scale != 1.0:
        decay = decay * torch.where(dt > 0, params.alpha_scale, 1.0)
    h = decay[..., None, None] * h + (dt[..., None] * x.float())[..., None] * Bf[:, :, None, :]
    if params.normalize_state:
        h = h / h.flatten(2).norm(dim=-1).clamp_min(1e-12)[..., None, None]
    y = torch.einsum("bhpn,bhn->bhp", h, Cf)
    return y, h


def _ssd_recurrent(x, dt, A, B, C, h0, params):
    h = h0.float()
    ys = []
    for i in range(x.shape[1]):
        y, h = ssd_step(x[:, i], dt[:, i], A, B[:, i], C[:, i], h, params)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def ssd_reference(x, dt, A, B, C, h0, params: SSDParams = NEUTRAL):
    """The step-by-step recurrence, for tests."""
    return _ssd_recurrent(x, dt, A, B, C, h0, params)


def ssd_window_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    window: int,
    history: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    params: SSDParams = NEUTRAL,
    block: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Sliding-window SSM output: only the last ``window`` tokens reach each position.

    Stuffed Mamba's state difference h_t - alpha_{t-r+1:t} h_{t-r} equals the windowed sum
    sum_{s=t-r+1..t} alpha_{s+1:t} B_s x_s dt_s; we compute that sum directly (a banded,
    attention-like product per query block) because subtracting two exploding states
    is exactly where float precision fails. The decays come from a cumulative sum of
    dt*A taken locally over each block's window (the running sum over the window).

    ``history`` carries the previous ``window - 1`` tokens' (x*dt [b, w, h, p],
    B [b, w, h, n] (groups expanded, scaled), dA [b, w, h]) with zeros where nothing was
    seen yet: a fixed-size state. Returns y [b, t, h, p] and the new history.
    """
    b, t, h, p = x.shape
    w = window - 1
    xdt = x.float() * dt[..., None]
    Bf = _expand_groups(B.float(), h) * params.b_scale
    Cf = _expand_groups(C.float(), h)
    dA = dt * A.float()[None, None, :]
    if params.alpha_scale != 1.0:
        dA = dA + math.log(params.alpha_scale) * (dt > 0)
    if history is None:
        history = (xdt.new_zeros(b, w, h, p), Bf.new_zeros(b, w, h, Bf.shape[-1]), dA.new_zeros(b, w, h))
    hx, hB, hA = history
    ext_x, ext_B, ext_A = torch.cat([hx, xdt], 1), torch.cat([hB, Bf], 1), torch.cat([hA, dA], 1)
    ys = []
    for q0 in range(0, t, block):
        q1 = min(t, q0 + block)
        k0, k1 = q0, q1 + w  # in extended coordinates: keys [q0 - w, q1) of the input
        a = ext_A[:, k0:k1]  # [b, K, h]
        cum = torch.cumsum(a, dim=1)  # local running sum over this block's window
        cq = cum[:, w:]  # queries sit at the last (q1 - q0) key positions
        diff = cq[:, :, None, :] - cum[:, None, :, :]  # [b, Q, K, h]: sum of a over (k, q]
        qi = torch.arange(q1 - q0, device=x.device)[:, None] + w
        ki = torch.arange(k1 - k0, device=x.device)[None, :]
        band = (ki <= qi) & (qi - ki < window)
        decay = torch.exp(diff.masked_fill(~band[None, :, :, None], -math.inf))
        scores = torch.einsum("bqhn,bkhn->bqkh", Cf[:, q0:q1], ext_B[:, k0:k1]) * decay
        ys.append(torch.einsum("bqkh,bkhp->bqhp", scores, ext_x[:, k0:k1]))
    y = torch.cat(ys, 1) if ys else xdt.new_zeros(b, 0, h, p)
    new_history = (ext_x[:, -w:] if w else hx, ext_B[:, -w:] if w else hB, ext_A[:, -w:] if w else hA)
    return y, tuple(t_.contiguous() for t_ in new_history)  # type: ignore[return-value]
