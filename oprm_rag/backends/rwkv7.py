"""RWKV-7 ("Goose") from an explicit state.

Per head the state is a matrix ``S`` [value, key] (BlinkDL's layout). Each token updates
``S = S diag(w) + (S a) b^T + v k^T`` with ``a = -kk`` and ``b = kk * iclr`` (the
generalised delta rule) and reads ``S r``. Every projection, LoRA, norm and the output
correction run for all tokens at once; only the state update runs token by token, as
a handful of batched ``[b, h, n, n]`` operations, as in BlinkDL's own CPU path. (A chunked
form of the delta rule needs triangular solves per chunk; it is not implemented here.)

Layer 0's value is kept and mixed into every later layer's value (``v_first``); BlinkDL
ignores layer 0's ``v0/v1/v2``, and so do we (the loader drops them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .rwkv_native import NativeRwkvBackend, group_norm_heads

__all__ = ["Rwkv7Backend", "wkv7_scan"]

#: BlinkDL's constant for exp(-0.5) in the decay, as written in the reference (exactly).
_DECAY_SCALE = 0.606531


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
        y, new_wkv = wkv7_scan(r.view(heads), w.view(heads), kw.view(heads), v.view(heads), a.view(heads),
                               b.view(heads), wkv)
        y = group_norm_heads(y.reshape(bsz, t, c), h, att.ln_x.weight, att.ln_x.bias, self.ln_x_eps).to(x.dtype)
        bonus = (r * k * att.r_k.reshape(-1)).view(heads).sum(dim=-1, keepdim=True) * v.view(heads)
        y = y + bonus.view(bsz, t, c)
        return F.linear(y * g, att.output.weight), new_wkv

    def _channel_mix(self, ffn: Any, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        k = torch.relu(F.linear(x + (prev - x) * ffn.x_k, ffn.key.weight)) ** 2
        return F.linear(k, ffn.value.weight)
