"""RWKV-6 ("Finch") from an explicit state.

Per head the state is a matrix ``S`` [key, value] (BlinkDL's layout). Each token ``t``
reads ``r_t (u * k_t v_t^T + S)`` and then updates ``S = k_t v_t^T + diag(w_t) S``, with a
data-dependent decay ``w_t = exp(-exp(time_decay + lora(x)))`` per key channel. Every
projection, LoRA and norm runs for all tokens at once; two forms of the WKV:

* :func:`wkv6_scan`, token by token, four batched ``[b, h, n, n]`` operations a token:
  BlinkDL's recurrence. Used on the CPU and for single tokens.
* :func:`wkv6_chunked`: inside a chunk of ``L`` tokens every output is a weighted sum
  over the chunk's earlier keys and the carried state, with weights ``exp(sum of
  log-decays between the two tokens)`` for all pairs at once (a ``[b, h, L+1, L, n]``
  tensor). Each pairwise sum is accumulated from its own terms (a cumulative sum from
  each token back towards the chunk start), never as the difference of two long prefix
  sums, and every exponent is <= 0: RWKV-6's decay is unbounded (a channel may decay by
  e^-100 in one token), so the decay cannot be split into two factors as RWKV-7's is.
  Far fewer kernel launches, but more arithmetic: on the CPU it measured 4x slower than
  the scan (8 rows x 512 tokens, 4 heads of 64: 0.64 vs 0.16 CPU seconds), so it is used
  on other devices only (untested for speed here: no GPU in this project's CI).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .rwkv_native import NativeRwkvBackend, group_norm_heads

__all__ = ["Rwkv6Backend", "wkv6_scan", "wkv6_chunked", "pairwise_decays", "chunk_size"]

# Target floats of one chunk's [b, h, L+1, L, n] pairwise-decay tensor (~16 MiB in float32).
_CHUNK_FLOATS = 1 << 22
_MAX_CHUNK = 32


def pairwise_decays(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decays between the tokens of one chunk, from its log-decays ``log_w`` [b, h, L, n].

    Returns ``carried`` [b, h, L+1, n], the decay of the chunk's start state before token
    ``i`` (exp of the sum over tokens 0..i-1), and ``weights`` [b, h, L+1, L, n], the decay
    of token ``j``'s input before token ``i`` (exp of the sum over j+1..i-1; 0 unless j < i).
    Row ``L`` is the end of the chunk. Each sum is accumulated from token i-1 back to j.
    """
    size = log_w.shape[2]
    before = torch.ones(size + 1, size, dtype=torch.bool, device=log_w.device).tril(-1)  # [i, j]: j < i
    terms = torch.where(before[:, :, None], log_w[:, :, None], 0.0)  # [b, h, L+1, L, n]: lw_j for j < i
    sums = terms.flip(3).cumsum(3).flip(3)  # sums[i, j] = sum of lw over j..i-1
    carried = torch.exp(sums[:, :, :, 0])
    between = torch.cat([sums[:, :, :, 1:], torch.zeros_like(sums[:, :, :, :1])], dim=3)  # lw over j+1..i-1
    return carried, torch.exp(between).masked_fill(~before[:, :, None], 0.0)


def chunk_size(b: int, h: int, n: int) -> int:
    """Tokens per chunk so that one chunk's [b, h, L+1, L, n] decay tensor stays near 4M floats."""
    return max(1, min(_MAX_CHUNK, int((_CHUNK_FLOATS / max(1, b * h * n)) ** 0.5)))


def wkv6_scan(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_w: torch.Tensor, u: torch.Tensor,
              state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`wkv6_chunked` token by token (same arguments and results): BlinkDL's recurrence."""
    r, k, v = r.float(), k.float(), v.float()
    w = torch.exp(log_w.float())[..., None]  # [b, t, h, key, 1]
    u = u.float()[..., None]
    s = state.float()
    out = torch.empty_like(r)
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [b, h, key, value]
        out[:, t] = (r[:, t, :, None, :] @ (u * kv + s))[:, :, 0]
        s = kv + w[:, t] * s
    return out, s


def wkv6_chunked(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_w: torch.Tensor, u: torch.Tensor,
                 state: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-6's WKV over ``t`` tokens from ``state``; all arithmetic in float32.

    ``r, k, v, log_w`` [b, t, h, n] (``log_w`` = log of the decay, <= 0; a pad has key 0
    and log-decay 0, so it leaves the state alone); ``u`` [h, n] (``time_faaaa``, the
    bonus of the current token); ``state`` [b, h, n, n] as [key, value]. Returns the
    outputs [b, t, h, n] and the new state.
    """
    b, t, h, n = r.shape
    if t == 1:
        return wkv6_scan(r, k, v, log_w, u, state)
    r, k, v, log_w = (z.float().transpose(1, 2) for z in (r, k, v, log_w))  # [b, h, t, n]
    u = u.float().reshape(1, h, 1, n)
    chunk = chunk or chunk_size(b, h, n)
    s = state.float()
    outs = []
    for start in range(0, t, chunk):
        rc, kc, vc, lc = (z[:, :, start:start + chunk] for z in (r, k, v, log_w))
        size = rc.shape[2]
        carried, weights = pairwise_decays(lc)
        scores = torch.einsum("bhtn,bhsn,bhtsn->bhts", rc, kc, weights[:, :, :size])
        scores = scores + torch.diag_embed((rc * u * kc).sum(-1))
        out = scores @ vc + (rc * carried[:, :, :size]) @ s
        outs.append(out)
        s = carried[:, :, size, :, None] * s + (kc * weights[:, :, size]).transpose(2, 3) @ vc
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2), s


class Rwkv6Backend(NativeRwkvBackend):
    """RWKV-6 (BlinkDL's v6.0 "Finch"), from BlinkDL ``.pth`` files or RWKV's HF folders."""

    family = "rwkv6"
    version = 6

    def _time_mix(self, i: int, att: Any, x: torch.Tensor, prev: torch.Tensor, wkv: torch.Tensor,
                  valid: torch.Tensor | None, carry: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, c = x.shape
        h, n = self.heads, self.head_size
        sx = prev - x
        mix = torch.tanh((x + sx * att.time_maa_x) @ att.time_maa_w1)
        mix = torch.bmm(mix.view(b * t, 5, -1).transpose(0, 1), att.time_maa_w2).view(5, b, t, c)
        mw, mk, mv, mr, mg = mix.unbind(0)
        r = F.linear(x + sx * (att.time_maa_r + mr), att.receptance.weight).float()
        k = F.linear(x + sx * (att.time_maa_k + mk), att.key.weight).float()
        v = F.linear(x + sx * (att.time_maa_v + mv), att.value.weight).float()
        g = F.silu(F.linear(x + sx * (att.time_maa_g + mg), att.gate.weight))
        decay = att.time_decay.reshape(-1) + (torch.tanh((x + sx * (att.time_maa_w + mw)) @ att.time_decay_w1)
                                              @ att.time_decay_w2)
        log_w = -torch.exp(decay.float())
        if valid is not None:  # a pad: no key, no decay
            keep = valid[..., None]
            k, log_w = k * keep, log_w * keep
        wkv_fn = wkv6_scan if x.device.type == "cpu" else wkv6_chunked  # see the module docstring
        out, new_wkv = wkv_fn(r.view(b, t, h, n), k.view(b, t, h, n), v.view(b, t, h, n),
                              log_w.view(b, t, h, n), att.time_faaaa, wkv)
        out = group_norm_heads(out.reshape(b, t, c), h, att.ln_x.weight, att.ln_x.bias, self.ln_x_eps)
        return F.linear(out.to(x.dtype) * g, att.output.weight), new_wkv

    def _channel_mix(self, ffn: Any, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        sx = prev - x
        r = torch.sigmoid(F.linear(x + sx * ffn.time_maa_r, ffn.receptance.weight))
        k = torch.relu(F.linear(x + sx * ffn.time_maa_k, ffn.key.weight)) ** 2
        return r * F.linear(k, ffn.value.weight)
