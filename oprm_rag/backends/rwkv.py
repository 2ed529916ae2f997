"""RWKV-4 (transformers' ``RwkvForCausalLM``) from an explicit state.

We run the blocks ourselves over the model's own modules rather than passing a state
to transformers' forward, because that forward writes the new state *into the list it
is given* (so a stored state would be destroyed by its first use) and, for a single
token at batch > 1, broadcasts the token shift ``[b, h]`` against ``[b, 1, h]`` into
``[b, b, h]`` outputs. Our state also sizes the WKV numerators by
``attention_hidden_size`` (transformers sizes them by ``hidden_size``).

The WKV recurrence runs in chunks: inside a chunk every output is a max-stabilised
weighted sum over the chunk's keys and the carried state, computed as one masked
``[b, L, L, d]`` product, so there is no Python loop over tokens.

Left-padded batches are exact: a pad gets a key of -inf (weight 0) and does not count
as a decay step, and a row's first real token takes its token shift from the state.
"""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.step import embedding_fn, layer_norm_fn, linear_fn
from ..state import RecurrentState
from ..threads import intra_op_threads
from .base import Backend, ForwardOutput, StepSession, call_threads

__all__ = ["RwkvBackend", "wkv_chunked", "wkv_step"]

# The "minus infinity" of an empty WKV state's running max (finite, so that
# max_state - max stays finite: exp() of it is exactly 0 against any real key).
_EMPTY_MAX = -1e38
# Target floats of one chunk's [b, L, L, d] weight tensor (~16 MiB in float32).
_CHUNK_FLOATS = 1 << 22


def wkv_chunked(time_decay: torch.Tensor, time_first: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                state: torch.Tensor, chunk: int | None = None,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-4's WKV over ``t`` tokens from ``state``; all arithmetic in float32.

    ``key, value`` [b, t, d]; ``time_decay, time_first`` [d] (raw parameters: the decay
    per step is ``-exp(time_decay)``); ``state`` [b, 3, d] = (num, den, max) with the
    real numerator ``num * exp(max)`` and denominator ``den * exp(max)``. ``valid``
    [b, t] (optional) is False on pads, which then leave the state untouched (their
    outputs are 0). Returns the outputs [b, t, d] (float32) and the new state [b, 3, d].

    Output t weighs the carried state by ``exp(r_t * w)``, an earlier token s by
    ``exp((r_t - 1 - r_s) * w + k_s)`` and token t itself by ``exp(u + k_t)``, where
    ``r_t`` counts the real tokens before t in the chunk (``r_t = t`` without pads).
    The weights are taken relative to their maximum, as RWKV's own kernels do, so
    large keys cannot overflow.
    """
    b, t, d = key.shape
    # exp in the parameter's own dtype, as transformers does (checkpoints keep it float32).
    w = -torch.exp(time_decay).float()
    u = time_first.float()
    k, v = key.float(), value.float()
    if valid is not None:
        k = k.masked_fill(~valid[..., None], -float("inf"))
        v = v.masked_fill(~valid[..., None], 0.0)
    num, den, mx = state.float().unbind(1)
    mx = mx.clamp_min(_EMPTY_MAX)  # keeps every running max finite (an fp16-cast empty state holds -inf)
    if chunk is None:
        chunk = max(1, min(64, int((_CHUNK_FLOATS / max(1, b * d)) ** 0.5)))
    outs = []
    for start in range(0, t, chunk):
        kc, vc = k[:, start:start + chunk], v[:, start:start + chunk]
        n = kc.shape[1]
        if valid is None:
            before = torch.arange(n, device=k.device, dtype=torch.float32).expand(b, n)
            count = torch.full((b, 1), float(n), device=k.device)
        else:
            real = valid[:, start:start + chunk].float()
            before = torch.cumsum(real, dim=1) - real  # real tokens before each one, [b, n]
            count = real.sum(dim=1, keepdim=True)
        lag = before[:, :, None] - 1 - before[:, None, :]  # [b, t, s]
        logits = lag[..., None] * w + kc[:, None]  # [b, t, s, d]
        diag = torch.arange(n, device=k.device)
        logits[:, diag, diag] = u + kc
        future = torch.ones(n, n, dtype=torch.bool, device=k.device).triu(1)[None, :, :, None]  # s > t
        logits = logits.masked_fill(future, -float("inf"))
        carried = mx[:, None] + before[..., None] * w  # [b, t, d]
        top = torch.maximum(carried, logits.amax(dim=2))
        weights = torch.exp(logits - top[:, :, None])
        w_state = torch.exp(carried - top)
        out_num = w_state * num[:, None] + torch.einsum("btsd,bsd->btd", weights, vc)
        out_den = w_state * den[:, None] + weights.sum(dim=2)
        out = out_num / out_den
        if valid is not None:  # a pad from an empty state is 0/0: drop it
            out = torch.where(valid[:, start:start + chunk, None], out, 0.0)
        outs.append(out)
        # State after the chunk: the carried state decays `count` steps, token s the rest.
        carried_end = mx + count * w
        tail = (count - 1 - before)[..., None] * w + kc  # [b, s, d]
        new_mx = torch.maximum(carried_end, tail.amax(dim=1))
        e_state = torch.exp(carried_end - new_mx)
        e_tok = torch.exp(tail - new_mx[:, None])
        num = e_state * num + (e_tok * vc).sum(dim=1)
        den = e_state * den + e_tok.sum(dim=1)
        mx = new_mx
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    return out, torch.stack([num, den, mx], dim=1)


def wkv_step(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`wkv_chunked` for one token, as RWKV's own recurrence: ``w`` = -exp(time_decay)
    and ``u`` = time_first (float32, [d]); ``k, v`` [b, d]; ``state`` [b, 3, d]. Returns
    the output [b, d] (float32) and the new state [b, 3, d]."""
    k, v = k.float(), v.float()
    num, den, mx = state.float().unbind(1)
    mx = mx.clamp_min(_EMPTY_MAX)
    ww = u + k
    top = torch.maximum(mx, ww)
    e_state, e_tok = torch.exp(mx - top), torch.exp(ww - top)
    out = (e_state * num + e_tok * v) / (e_state * den + e_tok)
    decayed = mx + w
    top = torch.maximum(decayed, k)
    e_state, e_tok = torch.exp(decayed - top), torch.exp(k - top)
    new = torch.stack([e_state * num + e_tok * v, e_state * den + e_tok, top], dim=1)
    return out, new


class RwkvBackend(Backend):
    family = "rwkv"
    supports_left_padding = True

    def __init__(self, model: Any, kernels: str = "auto") -> None:
        super().__init__(model, kernels)
        self.body = model.rwkv
        att = self.body.blocks[0].attention
        self.hidden_size = model.config.hidden_size
        self.att_size = att.attention_hidden_size

    @classmethod
    def handles(cls, model: Any) -> bool:
        return getattr(model.config, "model_type", None) == "rwkv" and hasattr(model, "rwkv")

    def empty_state(self, batch_size: int = 1) -> RecurrentState:
        dev, dt = self.device, self.dtype
        tensors: dict[str, torch.Tensor] = {"position": torch.zeros(batch_size, dtype=torch.long, device=dev)}
        for i in range(len(self.body.blocks)):
            # Token shift: the previous token's normed input to time-mix and channel-mix.
            tensors[f"att_shift.{i}"] = torch.zeros(batch_size, self.hidden_size, dtype=dt, device=dev)
            tensors[f"ffn_shift.{i}"] = torch.zeros(batch_size, self.hidden_size, dtype=dt, device=dev)
            wkv = torch.zeros(batch_size, 3, self.att_size, dtype=torch.float32, device=dev)
            wkv[:, 2] = _EMPTY_MAX
            tensors[f"wkv.{i}"] = wkv
        return RecurrentState(self.family, tensors)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None, *,
                all_logits: bool = False, pad_left: torch.Tensor | None = None) -> ForwardOutput:
        with intra_op_threads(call_threads(self, input_ids.numel())):  # short calls: one thread
            return self._forward(input_ids, state, all_logits, pad_left)

    def _forward(self, input_ids: torch.Tensor, state: RecurrentState | None, all_logits: bool,
                 pad_left: torch.Tensor | None) -> ForwardOutput:
        step = self._begin(input_ids, state, pad_left)
        b, t, state, pad_left, valid = step.batch, step.length, step.state, step.pad_left, step.mask
        self.use_cuda_kernels()  # no fused kernels: raises if kernels="cuda", else the torch path
        body = self.body
        # transformers halves the hidden state every `rescale_every` blocks at inference
        # (and divides those blocks' output weights to match, in place, at its first eval
        # forward), so that fp16 activations do not overflow. Do the same, so that our
        # logits equal the model's own in whichever mode it is in.
        if hasattr(body, "_rescale_layers"):
            body._rescale_layers()
        every = int(getattr(self.config, "rescale_every", 0) or 0)
        halve = bool(getattr(body, "layers_are_rescaled", False)) and every > 0

        new: dict[str, torch.Tensor] = {"position": step.position_after()}
        hidden = body.embeddings(step.ids)
        for i, block in enumerate(body.blocks):
            if i == 0:
                hidden = block.pre_ln(hidden)
            x = block.ln1(hidden)
            out, new[f"att_shift.{i}"], new[f"wkv.{i}"] = self._time_mix(
                block.attention, x, state.tensors[f"att_shift.{i}"], state.tensors[f"wkv.{i}"], pad_left, valid)
            hidden = hidden + out
            x = block.ln2(hidden)
            out, new[f"ffn_shift.{i}"] = self._channel_mix(
                block.feed_forward, x, state.tensors[f"ffn_shift.{i}"], pad_left)
            hidden = hidden + out
            if halve and (i + 1) % every == 0:
                hidden = hidden / 2
        hidden = body.ln_out(hidden)
        if not all_logits:
            hidden = hidden[:, -1]
        return ForwardOutput(self._lm_head(hidden), RecurrentState(self.family, new))

    @staticmethod
    def _shift(x: torch.Tensor, last: torch.Tensor, pad_left: torch.Tensor | None) -> torch.Tensor:
        """Each token's predecessor: the stored last token, then the input shifted by one.

        With left padding, each row's first real token takes the stored token instead.
        """
        last = last.to(x.dtype)[:, None]
        shifted = torch.cat([last, x[:, :-1]], dim=1)
        if pad_left is not None:
            first_real = torch.arange(x.shape[1], device=x.device)[None, :] == pad_left[:, None]
            shifted = torch.where(first_real[..., None], last, shifted)
        return shifted

    def _time_mix(self, att, x, shift_state, wkv_state, pad_left, valid):
        shifted = self._shift(x, shift_state, pad_left)
        key = att.key(x * att.time_mix_key + shifted * (1 - att.time_mix_key))
        value = att.value(x * att.time_mix_value + shifted * (1 - att.time_mix_value))
        receptance = torch.sigmoid(att.receptance(x * att.time_mix_receptance
                                                  + shifted * (1 - att.time_mix_receptance)))
        wkv, new_wkv = wkv_chunked(att.time_decay, att.time_first, key, value, wkv_state, valid=valid)
        out = att.output(receptance * wkv.to(key.dtype))
        return out, x[:, -1].contiguous(), new_wkv  # pads are on the left: the last token is real

    def _channel_mix(self, ffn, x, shift_state, pad_left):
        shifted = self._shift(x, shift_state, pad_left)
        key = ffn.key(x * ffn.time_mix_key + shifted * (1 - ffn.time_mix_key))
        receptance = torch.sigmoid(ffn.receptance(x * ffn.time_mix_receptance
                                                  + shifted * (1 - ffn.time_mix_receptance)))
        out = receptance * ffn.value(torch.square(torch.relu(key)))
        return out, x[:, -1].contiguous()

    # ------------------------------------------------------------------ single-token path
    def session(self, state: RecurrentState) -> StepSession:
        return StepSession(self, state)

    def _step_constants(self) -> dict[str, Any]:
        body = self.body
        if hasattr(body, "_rescale_layers"):
            body._rescale_layers()
        every = int(getattr(self.config, "rescale_every", 0) or 0)
        halve = bool(getattr(body, "layers_are_rescaled", False)) and every > 0

        def mix(module: Any, names: tuple[str, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            for name in names:
                m = getattr(module, f"time_mix_{name}").reshape(-1)
                out.append((m, 1 - m))
            return out

        blocks = []
        for i, block in enumerate(body.blocks):
            att, ffn = block.attention, block.feed_forward
            blocks.append({
                "pre_ln": layer_norm_fn(block.pre_ln) if i == 0 else None,
                "ln1": layer_norm_fn(block.ln1), "ln2": layer_norm_fn(block.ln2),
                "att_mix": mix(att, ("key", "value", "receptance")),
                "att": [linear_fn(att.key), linear_fn(att.value), linear_fn(att.receptance), linear_fn(att.output)],
                "w": -torch.exp(att.time_decay).float(), "u": att.time_first.float(),
                "ffn_mix": mix(ffn, ("key", "receptance")),
                "ffn": [linear_fn(ffn.key), linear_fn(ffn.receptance), linear_fn(ffn.value)],
                "halve": halve and (i + 1) % every == 0,
            })
        head = self.model.get_output_embeddings()
        return {"embed": embedding_fn(body.embeddings), "blocks": blocks, "ln_out": layer_norm_fn(body.ln_out),
                "head": linear_fn(head), "head_dtype": head.weight.dtype}

    def _step(self, ids: torch.Tensor, tensors: dict[str, torch.Tensor], c: dict[str, Any]) -> torch.Tensor:
        """One token per row: token shift from the state, :func:`wkv_step` for the WKV."""
        hidden = c["embed"](ids)  # [b, h]
        for i, blk in enumerate(c["blocks"]):
            if blk["pre_ln"] is not None:
                hidden = blk["pre_ln"](hidden)
            x = blk["ln1"](hidden)
            last = tensors[f"att_shift.{i}"].to(x.dtype)
            (mk, nk), (mv, nv), (mr, nr) = blk["att_mix"]
            key_l, value_l, rec_l, out_l = blk["att"]
            key = key_l(torch.addcmul(last * nk, x, mk))
            value = value_l(torch.addcmul(last * nv, x, mv))
            receptance = torch.sigmoid(rec_l(torch.addcmul(last * nr, x, mr)))
            wkv, tensors[f"wkv.{i}"] = wkv_step(blk["w"], blk["u"], key, value, tensors[f"wkv.{i}"])
            tensors[f"att_shift.{i}"] = x
            hidden = hidden + out_l(receptance * wkv.to(key.dtype))
            x = blk["ln2"](hidden)
            last = tensors[f"ffn_shift.{i}"].to(x.dtype)
            (mk, nk), (mr, nr) = blk["ffn_mix"]
            key_l, rec_l, value_l = blk["ffn"]
            key = key_l(torch.addcmul(last * nk, x, mk))
            receptance = torch.sigmoid(rec_l(torch.addcmul(last * nr, x, mr)))
            tensors[f"ffn_shift.{i}"] = x
            hidden = hidden + receptance * value_l(torch.square(torch.relu(key)))
            if blk["halve"]:
                hidden = hidden / 2
        return c["head"](c["ln_out"](hidden).to(c["head_dtype"])).float()
