"""A faster CPU training forward for transformers' ``Mamba2Mixer`` (same function, same weights).

Why: on 2 CPU cores, a profile of one training step of the reference path (transformers
falls back to plain torch without ``mamba_ssm``) spent 23% of its time in the backward of
the depthwise ``conv1d`` (oneDNN is slow for a 4-tap depthwise kernel) and a further 25%
in copies and products of B and C repeated to every head. Here the 4-tap causal
convolution is four shifted multiply-adds, and with one group B and C stay shared by the
heads (the score matrix ``C B^T`` is computed once, not once per head).

Only the training forward changes: the model is still a ``Mamba2ForCausalLM`` and the
saved weights are the same tensors. :func:`check_equivalence` compares both paths on
random inputs (the training script runs it before training starts).
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["patch_model", "unpatch_model", "check_equivalence", "mixer_forward", "branch_forward"]


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., l] -> [..., l, l]: out[i, j] = sum(a[j+1..i]) for j <= i, else -inf."""
    l = a.shape[-1]
    x = a[..., None].expand(*a.shape, l)
    x = x.masked_fill(~torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device), -1), 0.0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(l, l, dtype=torch.bool, device=a.device), 0), -math.inf)


def ssd_one_group(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  chunk: int, initial_state: torch.Tensor | None = None, return_final: bool = False):
    """Chunked SSD with one group of B/C, from a zero state or ``initial_state`` [b, h, p, n].

    x [b, t, h, p], dt [b, t, h] (discretised), A [h], B and C [b, t, n] -> y [b, t, h, p]
    (without the D skip term); with ``return_final`` also the state after the last step.
    A position with dt = 0 neither decays nor writes the state (how padding is masked).
    """
    b, t, h, p = x.shape
    pad = (chunk - t % chunk) % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, pad))
    c = x.shape[1] // chunk
    if c == 1 and initial_state is None and not return_final:  # one chunk from zero: no state to carry
        xdt = x * dt[..., None]
        a = (A * dt).transpose(1, 2)                                   # [b, h, l]
        M = torch.exp(_segsum(a)) * torch.einsum("bln,bsn->bls", C, B)[:, None]
        return torch.einsum("bhls,bshp->blhp", M, xdt)[:, :t]
    xdt = (x * dt[..., None]).reshape(b, c, chunk, h, p)
    a = (A * dt).reshape(b, c, chunk, h).permute(0, 3, 1, 2)          # [b, h, c, l]
    Bc = B.reshape(b, c, chunk, -1)
    Cc = C.reshape(b, c, chunk, -1)
    a_cum = torch.cumsum(a, dim=-1)
    # within chunks: attention-like, the C.B scores shared by all heads
    L = torch.exp(_segsum(a))                                          # [b, h, c, l, s]
    G = torch.einsum("bcln,bcsn->bcls", Cc, Bc)                        # [b, c, l, s]
    M = L * G[:, None]
    y = torch.einsum("bhcls,bcshp->bclhp", M, xdt)
    # each chunk's final state from its own inputs
    decay = torch.exp(a_cum[..., -1:] - a_cum)                          # [b, h, c, l]
    states = torch.einsum("bcln,bhcl,bclhp->bchpn", Bc, decay, xdt)
    # carry states across chunks
    first = torch.zeros_like(states[:, :1]) if initial_state is None else initial_state[:, None].to(states.dtype)
    states = torch.cat([first, states], dim=1)
    carry = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))          # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", carry, states)          # entering each chunk, then the last
    y = y + torch.einsum("bcln,bchpn,bhcl->bclhp", Cc, states[:, :-1], torch.exp(a_cum))
    y = y.reshape(b, c * chunk, h, p)[:, :t]
    return (y, states[:, -1]) if return_final else y


def _fast_forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if kwargs.get("cache") is not None or kwargs.get("cache_params") is not None or \
            kwargs.get("attention_mask") is not None:
        return self._reference_forward(hidden_states, *args, **kwargs)
    return mixer_forward(self, hidden_states)[0]


def mixer_forward(self: Any, hidden_states: torch.Tensor, mask: torch.Tensor | None = None,
                  state: tuple[torch.Tensor, torch.Tensor] | None = None, per_state: int = 1):
    """One ``Mamba2Mixer`` over ``hidden_states`` [b, t, d] -> (output, (conv tail, SSM state)).

    ``mask`` [b, t] (1 = token, 0 = left padding) makes padded positions invisible: their
    convolution inputs are zero (as before a sequence's first token) and their dt is zero
    (the state neither decays nor is written). ``state``, from an earlier call over
    ``b / per_state`` sequences, continues them: row ``i`` continues sequence
    ``i // per_state`` (its last ``conv_kernel - 1`` convolution inputs and its SSM state).
    A continued call returns no state (None): branches are leaves.
    """
    b, t, _ = hidden_states.shape
    gate, xbc, dt = self.in_proj(hidden_states).split(
        [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
    if mask is not None:
        xbc = xbc * mask[..., None].to(xbc.dtype)
    w = self.conv1d.weight[:, 0, :]                                      # [channels, K]
    k = w.shape[1]
    padded = F.pad(xbc, (0, 0, k - 1, 0)) if state is None else \
        torch.cat([state[0].repeat_interleave(per_state, 0), xbc], dim=1)
    tail = padded[:, padded.shape[1] - (k - 1):]
    conv = padded[:, k - 1:k - 1 + t] * w[:, k - 1]
    for j in range(k - 1):
        conv = conv + padded[:, j:j + t] * w[:, j]
    if self.conv1d.bias is not None:
        conv = conv + self.conv1d.bias
    xbc = F.silu(conv)
    n = self.n_groups * self.ssm_state_size
    x, B, C = xbc.split([self.intermediate_size, n, n], dim=-1)
    lo, hi = self.time_step_limit
    dt = F.softplus(dt + self.dt_bias)
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    if mask is not None:
        dt = dt * mask[..., None].to(dt.dtype)
    A = -torch.exp(self.A_log.float())
    x = x.reshape(b, t, self.num_heads, self.head_dim)
    if state is None:
        y, final = ssd_one_group(x.float(), dt.float(), A, B.float(), C.float(), self.chunk_size,
                                 return_final=True)
    else:
        # from a zero state in one chunk (short rows), plus what the given state adds:
        # y_t += C_t . (exp(sum of A dt up to t) * S), without copying S to every row
        y = ssd_one_group(x.float(), dt.float(), A, B.float(), C.float(), max(1, t))
        g = b // per_state
        decay = torch.exp(torch.cumsum(A * dt.float(), dim=1)).reshape(g, per_state, t, self.num_heads)
        from_state = torch.einsum("gktn,ghpn->gkthp", C.float().reshape(g, per_state, t, -1), state[1])
        y = y + (from_state * decay[..., None]).reshape(b, t, self.num_heads, self.head_dim)
        final = None
    y = y + x * self.D[:, None]
    y = self.norm(y.reshape(b, t, -1), gate)
    return self.out_proj(y.to(hidden_states.dtype)), (tail, final)


def branch_forward(model: Any, doc_ids: torch.Tensor, doc_mask: torch.Tensor, branch_ids: torch.Tensor,
                   per_doc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of ``doc_ids`` [b, T] and of ``branch_ids`` [b * per_doc, t], where
    branch row ``i * per_doc + j`` continues document ``i`` (as if it were appended to it).

    This is how OPRM scores a chunk: one state after ``[P, C]``, then each question from
    that state. Training on it costs the document once for ``per_doc`` questions, and
    each question sees exactly ``P, C, Q`` (no earlier questions in between). Documents
    are left-padded (``doc_mask`` 0 there); branches are right-padded (causal: the
    padding after a branch's tokens does not change them).
    """
    bb = model.backbone
    h_doc = bb.embeddings(doc_ids)
    h_br = bb.embeddings(branch_ids)
    for layer in bb.layers:
        res_doc, res_br = h_doc, h_br
        normed = layer.norm(h_doc.to(dtype=layer.norm.weight.dtype))
        out_doc, state = mixer_forward(layer.mixer, normed, mask=doc_mask)
        out_br, _ = mixer_forward(layer.mixer, layer.norm(h_br.to(dtype=layer.norm.weight.dtype)), state=state,
                                  per_state=per_doc)
        if layer.residual_in_fp32:
            res_doc, res_br = res_doc.float(), res_br.float()
        h_doc, h_br = res_doc + out_doc, res_br + out_br
    return bb.norm_f(h_doc), bb.norm_f(h_br)


def patch_model(model: Any) -> Any:
    """Route every mixer's forward through the fast path (one group only)."""
    for layer in model.backbone.layers:
        mixer = layer.mixer
        if mixer.n_groups != 1:
            raise ValueError("the fast training forward supports n_groups=1 only")
        if not hasattr(mixer, "_reference_forward"):
            mixer._reference_forward = mixer.forward
            mixer.forward = types.MethodType(_fast_forward, mixer)
    return model


def unpatch_model(model: Any) -> Any:
    for layer in model.backbone.layers:
        mixer = layer.mixer
        if hasattr(mixer, "_reference_forward"):
            mixer.forward = mixer._reference_forward
            del mixer._reference_forward
    return model


@torch.no_grad()
def check_equivalence(model: Any, vocab: int, length: int = 150, atol: float = 2e-4) -> float:
    """Largest logit difference between the fast and the reference forward; raises past ``atol``."""
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    fast_on = hasattr(model.backbone.layers[0].mixer, "_reference_forward")
    unpatch_model(model)
    ref = model(ids, use_cache=False).logits
    patch_model(model)
    fast = model(ids, use_cache=False).logits
    if not fast_on:
        unpatch_model(model)
    model.train(was_training)
    diff = float((ref - fast).abs().max())
    if diff > atol:
        raise AssertionError(f"fast Mamba-2 training forward differs from the reference by {diff:.2e}")
    return diff
