"""Mamba-2 state-space duality (SSD) scan from a given state, in plain torch.

The chunked form computes each chunk's outputs with a masked, attention-like product
and carries the state across chunks with one decay per head, so it is matrix work,
not a Python loop over time. It takes an initial state and returns the final one, so
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

import torch
import torch.nn.functional as F

__all__ = ["SSDParams", "ssd_scan", "ssd_step", "ssd_reference", "ssd_window_scan", "discretise_dt"]


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


def discretise_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    dt = F.softplus(dt.float() + dt_bias.float())
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., l] -> [..., l, l] with out[i, j] = sum(a[j+1..i]) for j <= i, else -inf."""
    l = a.shape[-1]
    x = a[..., None].expand(*a.shape, l)  # x[..., i, j] = a[i]
    strict = torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device), -1)
    x = x.masked_fill(~strict, 0.0)
    out = torch.cumsum(x, dim=-2)
    causal = torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device), 0)
    return out.masked_fill(~causal, -math.inf)


def _expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    groups = t.shape[2]
    return t if groups == heads else t.repeat_interleave(heads // groups, dim=2)


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
    """
    if params.normalize_state:
        return _ssd_recurrent(x, dt, A, B, C, h0, params)
    b, t, h, p = x.shape
    xf = x.float()
    Bf = _expand_groups(B.float(), h) * params.b_scale
    Cf = _expand_groups(C.float(), h)
    dA = dt * A.float()[None, None, :]  # [b, t, h] log-decay per step
    if params.alpha_scale != 1.0:  # not on padded steps (dt == 0), which must stay no-ops
        dA = dA + math.log(params.alpha_scale) * (dt > 0)
    xdt = xf * dt[..., None]

    pad = (-t) % chunk_size
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        dA = F.pad(dA, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    c = (t + pad) // chunk_size
    xdt = xdt.view(b, c, chunk_size, h, p)
    Bc = Bf.view(b, c, chunk_size, h, -1)
    Cc = Cf.view(b, c, chunk_size, h, -1)
    a = dA.view(b, c, chunk_size, h).permute(0, 3, 1, 2)  # [b, h, c, l]
    a_cum = torch.cumsum(a, dim=-1)

    # Within each chunk: y_l = sum_s C_l.B_s * exp(a_{s+1..l}) * x_s dt_s
    decay = torch.exp(_segsum(a))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # Each chunk's own contribution to the state at its end.
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, h, c, l]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, to_end, xdt)

    # Carry states across chunks: s_k = exp(sum a of chunk k) s_{k-1} + chunk_states_k.
    chunk_decay = torch.exp(a_cum[..., -1])  # [b, h, c]
    starts = []
    s = h0.float()
    for k in range(c):
        starts.append(s)
        s = chunk_decay[:, :, k, None, None] * s + chunk_states[:, k]
    start_states = torch.stack(starts, dim=1)  # [b, c, h, p, n]

    # The start state's contribution inside each chunk.
    y = y + torch.einsum("bclhn,bchpn->bclhp", Cc, start_states) * torch.exp(a_cum).permute(0, 2, 3, 1)[..., None]
    y = y.reshape(b, c * chunk_size, h, p)[:, :t]
    return y, s


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
