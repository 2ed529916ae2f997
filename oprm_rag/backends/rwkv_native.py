"""RWKV-6 ("Finch") and RWKV-7 ("Goose") run natively: what the two backends share.

transformers ships no RWKV-6 or RWKV-7 model; the Hugging Face releases run on remote
code (``trust_remote_code``) whose cache cannot be handed a stored state, so they would
fall back to token replay. We hold the weights ourselves, in a plain ``nn.Module`` whose
``state_dict()`` keys are exactly those of BlinkDL's ``.pth`` files (``emb.weight``,
``blocks.{i}.att.x_r``, ``blocks.{i}.ffn.key.weight``, ``head.weight``...), with their
shapes, and run them in :mod:`.rwkv6` / :mod:`.rwkv7` from explicit states. Hugging
Face folders are renamed to these keys on load (:mod:`oprm_rag.rwkv_loading`).

This module also holds what the two versions share: the state layout (the same as
BlinkDL's reference, ``rwkv`` on PyPI: per layer the token shift of the time mix, the
WKV matrix per head in float32, and the token shift of the channel mix), the block loop,
left padding, and the single-token decode session.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..state import RecurrentState
from ..threads import intra_op_threads
from .base import Backend, ForwardOutput, StepSession, call_threads
from .rwkv import RwkvBackend

__all__ = ["NativeRwkvBackend", "token_shift", "group_norm_heads"]

# ---------------------------------------------------------------------------- shared math
#: Each token's predecessor [b, t, c] with left padding handled: the same as RWKV-4's.
token_shift = RwkvBackend._shift


def group_norm_heads(y: torch.Tensor, heads: int, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """``ln_x``: a GroupNorm with one group per head over y [b, t, c] (as BlinkDL's), in
    float32 whatever the weights' dtype (the WKV output is float32); returns float32."""
    b, t, c = y.shape
    return F.group_norm(y.float().reshape(b * t, c), heads, weight.float().reshape(-1), bias.float().reshape(-1),
                        eps).view(b, t, c)


def _ln(node: nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), node.weight, node.bias, eps)


class NativeRwkvBackend(Backend):
    """What RWKV-6 and RWKV-7 share: state, block loop, padding, decode session.

    Subclasses provide ``_time_mix`` and ``_channel_mix``. The state holds, per layer
    ``i``: ``att_shift.{i}`` [b, c] (the last ``ln1`` output), ``wkv.{i}`` [b, h, n, n]
    float32 and ``ffn_shift.{i}`` [b, c] (the last ``ln2`` output): BlinkDL's
    ``state[3i]``, ``state[3i+1]``, ``state[3i+2]`` with a batch dimension in front.

    Left-padded batches are exact: a pad's key is zeroed and its decay set to 1 before
    the WKV, so it leaves the state as it was, and each row's first real token takes
    its token shift from the state (``token_shift``).
    """

    version: ClassVar[int] = 0
    supports_left_padding = True

    def __init__(self, model: Any, kernels: str = "auto") -> None:
        super().__init__(model, kernels)
        cfg = model.config
        self.hidden_size = cfg.hidden_size
        self.heads, self.head_size = cfg.num_heads, cfg.head_size
        self.eps = float(cfg.layer_norm_epsilon)
        self.ln_x_eps = float(cfg.ln_x_eps)
        self.blocks = model.layers()

    @classmethod
    def handles(cls, model: Any) -> bool:
        # the model class's own mark (oprm_rag.rwkv_model.RwkvNativeModel), not an import of it:
        # the model runs its plain forward through this registry
        return getattr(model, "native_rwkv_version", None) == cls.version

    def empty_state(self, batch_size: int = 1) -> RecurrentState:
        dev, dt = self.device, self.dtype
        c, h, n = self.hidden_size, self.heads, self.head_size
        tensors: dict[str, torch.Tensor] = {"position": torch.zeros(batch_size, dtype=torch.long, device=dev)}
        for i in range(len(self.blocks)):
            tensors[f"att_shift.{i}"] = torch.zeros(batch_size, c, dtype=dt, device=dev)
            tensors[f"wkv.{i}"] = torch.zeros(batch_size, h, n, n, dtype=torch.float32, device=dev)
            tensors[f"ffn_shift.{i}"] = torch.zeros(batch_size, c, dtype=dt, device=dev)
        return RecurrentState(self.family, tensors)

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None, *,
                all_logits: bool = False, pad_left: torch.Tensor | None = None) -> ForwardOutput:
        with intra_op_threads(call_threads(self, input_ids.numel())):
            step = self._begin(input_ids, state, pad_left)
            self.use_cuda_kernels()  # no fused kernels: raises if kernels="cuda", else the torch path
            new, hidden = self._run(step.ids, step.state.tensors, step.pad_left, step.mask)
            new["position"] = step.position_after()
            if not all_logits:
                hidden = hidden[:, -1]
            return ForwardOutput(self._lm_head(hidden), RecurrentState(self.family, new))

    def _run(self, ids: torch.Tensor, tensors: dict[str, torch.Tensor], pad_left: torch.Tensor | None,
             valid: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The blocks over ``ids`` [b, t] from ``tensors``: the new per-layer tensors (no
        position) and the final normed hidden states [b, t, c]."""
        model = self.model
        hidden = model.emb(ids)
        first = self.blocks[0]
        if hasattr(first, "ln0"):
            hidden = _ln(first.ln0, hidden, self.eps)
        new: dict[str, torch.Tensor] = {}
        carry: dict[str, torch.Tensor] = {}  # across layers at the same tokens (RWKV-7's v_first)
        for i, block in enumerate(self.blocks):
            x = _ln(block.ln1, hidden, self.eps)
            out, new[f"wkv.{i}"] = self._time_mix(
                i, block.att, x, token_shift(x, tensors[f"att_shift.{i}"], pad_left), tensors[f"wkv.{i}"],
                valid, carry)
            new[f"att_shift.{i}"] = x[:, -1].contiguous()  # pads are on the left: the last token is real
            hidden = hidden + out
            x = _ln(block.ln2, hidden, self.eps)
            hidden = hidden + self._channel_mix(block.ffn, x, token_shift(x, tensors[f"ffn_shift.{i}"], pad_left))
            new[f"ffn_shift.{i}"] = x[:, -1].contiguous()
        return new, _ln(model.ln_out, hidden, self.eps)

    @abstractmethod
    def _time_mix(self, i: int, att: nn.Module, x: torch.Tensor, prev: torch.Tensor, wkv: torch.Tensor,
                  valid: torch.Tensor | None, carry: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i``'s time mix (each version's WKV): its output and the new WKV state."""

    @abstractmethod
    def _channel_mix(self, ffn: nn.Module, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """A block's channel mix (each version's feed-forward)."""

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.head.weight
        return F.linear(hidden.to(weight.dtype), weight).float()

    # ------------------------------------------------------------------ single-token path
    def session(self, state: RecurrentState) -> StepSession:
        return StepSession(self, state)

    def _step_constants(self) -> dict[str, Any]:
        return {}

    def _step(self, ids: torch.Tensor, tensors: dict[str, torch.Tensor], c: dict[str, Any]) -> torch.Tensor:
        """One token per row, in place on the session's ``tensors`` (position excepted)."""
        new, hidden = self._run(ids[:, None], tensors, None, None)
        tensors.update(new)
        return self._lm_head(hidden[:, -1])
