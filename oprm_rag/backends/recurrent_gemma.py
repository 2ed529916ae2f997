"""RecurrentGemma (Griffin) from an explicit, fixed-size state.

transformers returns no cache object for this model: it keeps the conv windows and
RG-LRU states in module attributes (one hidden, shared state per model), and a
multi-token forward from them restarts the temporal convolution from zeros. So the
residual blocks run here, over the model's own modules and weights, with the state
passed in and out:

* recurrent blocks keep the last ``conv1d_width - 1`` conv inputs and the RG-LRU
  state (float32);
* local-attention blocks keep the rotated keys and the values of the last
  ``attention_window_size - 1`` tokens, right-aligned (transformers' sliding-window
  mask lets a query see itself and the ``window - 1`` tokens before it, no more).
  ``position`` says how many of those slots are real and where the rotary phase is,
  per row, so rows at different positions can share a batch.

The RG-LRU resets at absolute position 0 only (no decay of the previous state, no
``sqrt(1 - a^2)`` input normalisation), exactly as transformers does for position
ids equal to 0; a state at position > 0 is never reset again.

Left-padded batches are exact: pads enter neither the conv window (they are moved in
front of it), nor the RG-LRU (decay 1, input 0), nor any key/value slot, and a row's
positions count its real tokens only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.step import conv_step
from ..state import RecurrentState
from ..threads import intra_op_threads
from .base import Backend, ForwardOutput, StepSession, call_threads, shifted_conv_input

__all__ = ["RecurrentGemmaBackend"]

# Queries per attention block: bounds the [b, heads, q, q + window] score tensor.
_QUERY_BLOCK = 512


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` channels (partial rotary)."""
    cos, sin = cos[:, None], sin[:, None]  # [b, 1, t, r]
    r = cos.shape[-1]
    rot, keep = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + _rotate_half(rot) * sin, keep], dim=-1)


def _pads_first(seq: torch.Tensor, pad_left: torch.Tensor, k1: int, dim: int) -> torch.Tensor:
    """``seq`` is [state part (k1), new part] along ``dim``; move each row's left pads
    (at the start of the new part) in front of the state part."""
    b, total = seq.shape[0], seq.shape[dim]
    j = torch.arange(total, device=seq.device)[None, :]
    p = pad_left[:, None]
    src = torch.where(j < p, k1 + j, torch.where(j < p + k1, j - p, j))  # [b, total]
    shape = [1] * seq.dim()
    shape[0], shape[dim] = b, total
    return seq.gather(dim, src.view(shape).expand_as(seq))


class RecurrentGemmaBackend(Backend):
    family = "recurrent_gemma"
    supports_left_padding = True

    def __init__(self, model: Any, kernels: str = "auto") -> None:
        super().__init__(model, kernels)
        cfg = model.config
        self.body = model.model
        self.kinds = ["attention" if hasattr(layer.temporal_block, "q_proj") else "recurrent"
                      for layer in self.body.layers]
        self.lru_width = cfg.lru_width
        self.conv_width = cfg.conv1d_width
        self.window = int(cfg.attention_window_size)
        self.kv_slots = max(self.window - 1, 0)
        self.kv_heads = cfg.num_key_value_heads
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.soft_cap = cfg.logits_soft_cap

    @classmethod
    def handles(cls, model: Any) -> bool:
        return (getattr(model.config, "model_type", None) == "recurrent_gemma"
                and hasattr(model, "model") and hasattr(model, "lm_head"))

    def empty_state(self, batch_size: int = 1) -> RecurrentState:
        dev, dt = self.device, self.dtype
        tensors: dict[str, torch.Tensor] = {"position": torch.zeros(batch_size, dtype=torch.long, device=dev)}
        for i, kind in enumerate(self.kinds):
            if kind == "recurrent":
                tensors[f"conv.{i}"] = torch.zeros(batch_size, self.lru_width, self.conv_width - 1,
                                                   dtype=dt, device=dev)
                tensors[f"rglru.{i}"] = torch.zeros(batch_size, self.lru_width, dtype=torch.float32, device=dev)
            else:
                shape = (batch_size, self.kv_heads, self.kv_slots, self.head_dim)
                tensors[f"key.{i}"] = torch.zeros(shape, dtype=dt, device=dev)
                tensors[f"value.{i}"] = torch.zeros(shape, dtype=dt, device=dev)
        return RecurrentState(self.family, tensors)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None, *,
                all_logits: bool = False, pad_left: torch.Tensor | None = None) -> ForwardOutput:
        with intra_op_threads(call_threads(self, input_ids.numel())):  # short calls: one thread
            return self._forward(input_ids, state, all_logits, pad_left)

    def _forward(self, input_ids: torch.Tensor, state: RecurrentState | None, all_logits: bool,
                 pad_left: torch.Tensor | None) -> ForwardOutput:
        self.use_cuda_kernels()  # no fused kernels: raises if kernels="cuda", else the torch path
        step = self._begin(input_ids, state, pad_left)
        b, t, state, pad_left, valid = step.batch, step.length, step.state, step.pad_left, step.mask
        start = state.tensors["position"]
        positions = start[:, None] + torch.arange(t, device=start.device)  # [b, t] absolute
        if pad_left is not None:
            positions = positions - pad_left[:, None]  # real tokens count from the state; pads are masked
        new: dict[str, torch.Tensor] = {"position": step.position_after()}
        hidden = self.body.embed_tokens(step.ids)
        # The model scales by its own normaliser buffer (sqrt(hidden) rounded to bfloat16).
        hidden = hidden * self.body.normalizer.type(hidden.dtype)
        for i, layer in enumerate(self.body.layers):
            raw = hidden
            x = layer.temporal_pre_norm(raw)
            block = layer.temporal_block
            if self.kinds[i] == "recurrent":
                out, new[f"conv.{i}"], new[f"rglru.{i}"] = self._recurrent(
                    block, x, positions, state.tensors[f"conv.{i}"], state.tensors[f"rglru.{i}"], pad_left, valid)
            else:
                out, new[f"key.{i}"], new[f"value.{i}"] = self._attention(
                    block, x, positions, start, state.tensors[f"key.{i}"], state.tensors[f"value.{i}"],
                    pad_left, valid)
            residual = out + raw
            hidden = layer.mlp_block(layer.channel_pre_norm(residual)) + residual
        hidden = self.body.final_norm(hidden)
        if not all_logits:
            hidden = hidden[:, -1]
        logits = self._lm_head(hidden)
        if self.soft_cap:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        return ForwardOutput(logits, RecurrentState(self.family, new))

    # ------------------------------------------------------------------ single-token path
    def session(self, state: RecurrentState) -> StepSession:
        """Steps take ``forward`` on one token (whose conv is a dot product, see
        ``_recurrent``) with the session's thread setting."""
        return StepSession(self, state)

    def _step_constants(self) -> None:
        return None

    def _step(self, ids: torch.Tensor, tensors: dict[str, torch.Tensor], c: None) -> torch.Tensor:
        out = self.forward(ids[:, None], RecurrentState(self.family, tensors))
        tensors.update((k, v) for k, v in out.state.tensors.items() if k != "position")
        return out.logits

    # ------------------------------------------------------------------ recurrent block
    def _recurrent(self, block, x, positions, conv_state, lru_state, pad_left, valid):
        t = x.shape[1]
        y = block.act_fn(block.linear_y(x))
        conv = block.conv_1d
        if t == 1 and valid is None and conv.groups == conv.in_channels == conv.out_channels:
            # One token: the depthwise conv is a dot product with the conv state (no conv1d set-up).
            xb, new_conv = conv_step(conv_state, block.linear_x(x)[:, 0], conv.weight[:, 0, :], conv.bias)
            xb, new_conv = xb.to(x.dtype)[:, None], new_conv.contiguous()  # [b, 1, w]
        else:
            xb = block.linear_x(x).transpose(1, 2)  # [b, w, t]
            if valid is not None:
                xb = torch.where(valid[:, None, :], xb, 0.0)
            conv_in = shifted_conv_input(conv_state, xb, pad_left)  # pads go in front of the window
            new_conv = conv_in[..., conv_in.shape[-1] - (self.conv_width - 1):].contiguous()
            xb = F.conv1d(conv_in.to(conv.weight.dtype), conv.weight, conv.bias, groups=conv.groups)
            xb = xb[..., xb.shape[-1] - t:].to(x.dtype).transpose(1, 2)  # [b, t, w]
        h, new_lru = self._rg_lru(block.rg_lru, xb, positions, lru_state, valid)
        return block.linear_out(h * y), new_conv, new_lru

    @staticmethod
    def _rg_lru(lru, x, positions, h, valid):
        """Real-gated linear recurrent unit, from state ``h`` [b, w] (float32)."""
        b, t, w = x.shape
        heads, bw = lru.input_gate_weight.shape[:2]
        reset = (positions == 0)[:, :, None]  # [b, t, 1]
        if valid is not None:
            reset = reset & valid[:, :, None]
        blocks = x.reshape(b * t, heads, bw).transpose(0, 1)  # block-diagonal gates, per head
        gate_x = torch.baddbmm(lru.input_gate_bias[:, None, :], blocks, lru.input_gate_weight)
        gate_a = torch.baddbmm(lru.recurrent_gate_bias[:, None, :], blocks, lru.recurrent_gate_weight)
        gate_x = torch.sigmoid(gate_x.transpose(0, 1).reshape(b, t, w))
        gate_a = torch.sigmoid(gate_a.transpose(0, 1).reshape(b, t, w))
        log_a = -8.0 * gate_a * F.softplus(lru.recurrent_param)
        a = torch.exp(log_a)
        a_square = torch.exp(2 * log_a)
        # Input normalisation sqrt(1 - a^2), except on a sequence's first token.
        multiplier = torch.sqrt(1 - a_square)
        multiplier = reset + ~reset * multiplier
        normed = (x * gate_x) * multiplier.type(x.dtype)
        a = (a * ~reset).float()
        normed_f = normed.float()
        if valid is not None:  # a pad keeps h: decay 1, input 0
            a = torch.where(valid[:, :, None], a, 1.0)
            normed_f = torch.where(valid[:, :, None], normed_f, 0.0)
        h = h.float()
        out = torch.empty(b, t, w, dtype=torch.float32, device=x.device)
        for i in range(t):  # h <- a_t * h + x_t, in float32
            h = torch.addcmul(normed_f[:, i], a[:, i], h)
            out[:, i] = h
        return out.to(x.dtype), h

    # ------------------------------------------------------------------ local attention
    def _attention(self, attn, x, positions, start, key_cache, value_cache, pad_left, valid):
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = attn.rotary_emb(v, positions)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)

        keys = torch.cat([key_cache.to(k.dtype), k], dim=2)  # [b, kv, slots + t, d]
        values = torch.cat([value_cache.to(v.dtype), v], dim=2)
        slots = self.kv_slots
        new_pos = positions if valid is None else positions.masked_fill(~valid, -1)  # -1: never a key
        cache_pos = start[:, None] - slots + torch.arange(slots, device=x.device)  # < 0: an empty slot
        key_pos = torch.cat([cache_pos, new_pos], dim=1)
        if pad_left is not None:
            # [pads, cache, real]: the cache keeps the last real keys, and query i again
            # sees key slots i .. slots + i.
            keys, values = _pads_first(keys, pad_left, slots, 2), _pads_first(values, pad_left, slots, 2)
            key_pos = _pads_first(key_pos, pad_left, slots, 1)
        new_k = keys[:, :, keys.shape[2] - slots:].contiguous()
        new_v = values[:, :, values.shape[2] - slots:].contiguous()

        groups = self.heads // self.kv_heads
        keys = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
        values = values.repeat_interleave(groups, dim=1) if groups > 1 else values
        outs = []
        # Query i (slot slots + i of `keys`) sees key slots i .. slots + i: blocks of
        # queries need only a window-long band of keys.
        for s in range(0, t, _QUERY_BLOCK):
            e = min(t, s + _QUERY_BLOCK)
            kp = key_pos[:, s:e + slots]
            qp = positions[:, s:e]
            allowed = ((kp[:, None, :] <= qp[:, :, None]) & (kp[:, None, :] > qp[:, :, None] - self.window)
                       & (kp[:, None, :] >= 0))
            if valid is not None:  # a pad's query sees its whole band: finite, and unused
                allowed = allowed | ~valid[:, s:e, None]
            outs.append(F.scaled_dot_product_attention(
                q[:, :, s:e], keys[:, :, s:e + slots], values[:, :, s:e + slots],
                attn_mask=allowed[:, None], scale=attn.scaling))
        out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return attn.o_proj(out), new_k, new_v
