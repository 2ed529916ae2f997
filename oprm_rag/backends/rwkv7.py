"""RWKV-7 ("Goose") from an explicit state.

Per head the state is a matrix ``S`` [value, key] (BlinkDL's layout). Each token updates
``S = S diag(w) + (S a) b^T + v k^T`` with ``a = -kk`` and ``b = kk * iclr`` (the
generalised delta rule) and reads ``S r``. Every projection, LoRA, norm and the output
correction run for all tokens at once. The state update runs in chunks of 32 tokens as
matrix products and one triangular solve per chunk (:func:`wkv7_chunked`); a single
token (decoding) takes the plain update (:func:`wkv7_scan`), as BlinkDL's reference does.

Layer 0's value is kept and mixed into every later layer's value (``v_first``); BlinkDL
ignores layer 0's ``v0/v1/v2``, and so do we (the loader drops them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .rwkv_native import NativeRwkvBackend, group_norm_heads

__all__ = ["Rwkv7Backend", "wkv7_scan", "wkv7_chunked"]

#: BlinkDL's constant for exp(-0.5) in the decay, as written in the reference (exactly).
_DECAY_SCALE = 0.606531
#: Tokens per chunk of :func:`wkv7_chunked` (its decay factors stay below e^(0.6065 * 32)).
_CHUNK = 32


def wkv7_scan(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
              b: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7's WKV over ``t`` tokens from ``state`` (float32): inputs [b, t, h, n], ``w``
    the decay in (0, 1] (1 and zero keys on pads: they leave the state alone), ``state``
    [b, h, n, n] as [value, key]. Returns the outputs [b, t, h, n] and the new state."""
    r, w, k, v, a, b = (z.float() for z in (r, w, k, v, a, b))
    s = state.float()
    out = torch.empty_like(r)
    w, b, k = w[:, :, :, None, :], b[:, :, :, None, :], k[:, :, :, None, :]
    a, v, r = a[..., None], v[..., None], r[..., None]
    for t in range(r.shape[1]):
        s = s * w[:, t] + (s @ a[:, t]) * b[:, t] + v[:, t] * k[:, t]
        out[:, t] = (s @ r[:, t])[..., 0]
    return out, s


def wkv7_chunked(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, state: torch.Tensor, chunk: int = _CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`wkv7_scan` in chunks of tokens (same arguments and results), as matrix products.

    With ``X = S^T`` [key, value] the update reads ``X_t = diag(w_t) X_{t-1} + b_t z_t +
    k_t v_t^T`` with ``z_t = a_t^T X_{t-1}``: a diagonal-decay recurrence driven by ``z``.
    Inside a chunk, with ``C_t`` the cumulative log-decay, the decay from token s to t is
    ``exp(C_t) * exp(-C_s)``; ``z`` solves one unit lower-triangular system
    ``(I - A_ab) Z = P X_0 + A_ak V`` (``A_xy = tril(x e^C_prev (y e^-C)^T)``), and outputs
    and the end state are matrix products over the chunk's tokens. Splitting the decay in
    two factors is safe here because RWKV-7's decay is at least exp(-0.6065) per token:
    over a chunk of 32 no factor exceeds e^19.4, far inside float32's range, and each
    product keeps float32's relative precision.
    """
    bsz, t, h, n = r.shape
    r, k, v, a, b = (z.float().transpose(1, 2) for z in (r, k, v, a, b))  # [b, h, t, n]
    log_w = torch.log(w.float()).transpose(1, 2)
    x = state.float().transpose(-1, -2)  # [b, h, key, value]
    outs = []
    for start in range(0, t, chunk):
        rc, kc, vc, ac, bc, lc = (z[:, :, start:start + chunk] for z in (r, k, v, a, b, log_w))
        size = rc.shape[2]
        cum = lc.cumsum(dim=2)  # C_t: log-decay over tokens 0..t
        a_dec = ac * torch.exp(cum - lc)  # a_t * decay over 0..t-1
        r_dec = rc * torch.exp(cum)
        inv = torch.exp(-cum)
        k_inv, b_inv = kc * inv, bc * inv
        eye = torch.eye(size, dtype=x.dtype, device=x.device)
        a_b = (a_dec @ b_inv.transpose(-1, -2)).tril(-1)
        a_k = (a_dec @ k_inv.transpose(-1, -2)).tril(-1)
        z = torch.linalg.solve_triangular(eye - a_b, a_dec @ x + a_k @ vc, upper=False, unitriangular=True)
        r_k = (r_dec @ k_inv.transpose(-1, -2)).tril()
        r_b = (r_dec @ b_inv.transpose(-1, -2)).tril()
        outs.append(r_dec @ x + r_k @ vc + r_b @ z)
        to_end = torch.exp(cum[:, :, -1:] - cum)  # decay of token s's input to the chunk's end
        x = (torch.exp(cum[:, :, -1])[..., None] * x + (kc * to_end).transpose(-1, -2) @ vc
             + (bc * to_end).transpose(-1, -2) @ z)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2), x.transpose(-1, -2)


class Rwkv7Backend(NativeRwkvBackend):
    """RWKV-7 (BlinkDL's x070 "Goose"), from BlinkDL ``.pth`` files or fla-style HF folders."""

    family = "rwkv7"
    version = 7

    def _time_mix(self, i: int, att: Any, x: torch.Tensor, prev: torch.Tensor, wkv: torch.Tensor,
                  valid: torch.Tensor | None, carry: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, t, c = x.shape
        h, n = self.heads, self.head_size
        xx = prev - x
        r = F.linear(x + xx * att.x_r, att.receptance.weight)
        w = torch.tanh((x + xx * att.x_w) @ att.w1) @ att.w2
        k = F.linear(x + xx * att.x_k, att.key.weight)
        xv = x + xx * att.x_v
        v = F.linear(xv, att.value.weight)
        iclr = torch.sigmoid(att.a0 + ((x + xx * att.x_a) @ att.a1) @ att.a2)
        g = torch.sigmoid((x + xx * att.x_g) @ att.g1) @ att.g2
        kk = F.normalize((k * att.k_k).view(bsz, t, h, n), dim=-1, p=2.0).view(bsz, t, c)
        k = k * (1 + (iclr - 1) * att.k_a)
        if i == 0:
            carry["v_first"] = v
        else:
            v = v + (carry["v_first"] - v) * torch.sigmoid(att.v0 + (xv @ att.v1) @ att.v2)
        w = torch.exp(-_DECAY_SCALE * torch.sigmoid((att.w0 + w).float()))
        a, b, kw = -kk, kk * iclr, k
        if valid is not None:  # a pad: decay 1, no key, no delta-rule term
            keep = valid[..., None]
            w = torch.where(keep, w, 1.0)
            a, b, kw = a * keep, b * keep, kw * keep
        heads = (bsz, t, h, n)
        wkv_fn = wkv7_scan if t == 1 else wkv7_chunked  # one token (decoding): the plain update
        y, new_wkv = wkv_fn(r.view(heads), w.view(heads), kw.view(heads), v.view(heads), a.view(heads),
                            b.view(heads), wkv)
        y = group_norm_heads(y.reshape(bsz, t, c), h, att.ln_x.weight, att.ln_x.bias, self.ln_x_eps).to(x.dtype)
        bonus = (r * k * att.r_k.reshape(-1)).view(heads).sum(dim=-1, keepdim=True) * v.view(heads)
        y = y + bonus.view(bsz, t, c)
        return F.linear(y * g, att.output.weight), new_wkv

    def _channel_mix(self, ffn: Any, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        k = torch.relu(F.linear(x + (prev - x) * ffn.x_k, ffn.key.weight)) ** 2
        return F.linear(k, ffn.value.weight)
