"""Mamba-1 and Falcon-Mamba (Falcon3-Mamba too) from an explicit state.

The model's own modules supply every weight and norm; only the mixer's sequence
computation is ours, because transformers' multi-token continuation from a cache
drops the initial SSM state and its CPU path loops over time in Python.
Falcon-Mamba differs only by weightless RMS norms on dt, B and C.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.selective_scan import selective_scan
from .base import StepInput, shifted_conv_input
from .ssm_backbone import SSMBackboneBackend

__all__ = ["MambaBackend"]


class MambaBackend(SSMBackboneBackend):
    family = "mamba"

    def __init__(self, model: Any, kernels: str = "auto") -> None:
        super().__init__(model, kernels)
        self.family = model.config.model_type  # "mamba" or "falcon_mamba"
        mixer = self.backbone.layers[0].mixer
        self.d_inner = mixer.intermediate_size
        self.d_state = mixer.ssm_state_size
        self.kernel = mixer.conv_kernel_size
        self.quantized = hasattr(model.config, "_is_quantized")

    @classmethod
    def handles(cls, model: Any) -> bool:
        return getattr(model.config, "model_type", None) in ("mamba", "falcon_mamba") and hasattr(model, "backbone")

    def _empty_layer_state(self, i: int, batch_size: int) -> dict[str, torch.Tensor]:
        return {
            f"conv.{i}": torch.zeros(batch_size, self.d_inner, self.kernel - 1, dtype=self.dtype, device=self.device),
            f"ssm.{i}": torch.zeros(batch_size, self.d_inner, self.d_state, dtype=torch.float32, device=self.device),
        }

    def _mixer(self, i: int, mixer: Any, hidden: torch.Tensor, step: StepInput,
               use_kernel: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dtype, mask = hidden.dtype, step.mask
        x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # [b, d, t] each
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
        conv_in = shifted_conv_input(step.state.tensors[f"conv.{i}"], x, step.pad_left)
        new_conv = conv_in[..., conv_in.shape[-1] - (self.kernel - 1):]
        weight = mixer.conv1d.weight
        x = F.conv1d(conv_in.to(weight.dtype), weight, mixer.conv1d.bias, groups=self.d_inner)
        x = mixer.act(x).to(dtype)
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
        dt, B, C = torch.split(mixer.x_proj(x.transpose(1, 2)),
                               [mixer.time_step_rank, self.d_state, self.d_state], dim=-1)
        if hasattr(mixer, "b_layernorm"):  # Falcon-Mamba
            dt, B, C = mixer.dt_layernorm(dt), mixer.b_layernorm(B), mixer.c_layernorm(C)
        if self.quantized:
            dt = (mixer.dt_proj(dt) - mixer.dt_proj.bias).transpose(1, 2)
        else:
            dt = mixer.dt_proj.weight @ dt.transpose(1, 2)
        A = -torch.exp(mixer.A_log.float())
        y, new_ssm = selective_scan(x, dt, A, B, C, mixer.D, z, mixer.dt_proj.bias, step.state.tensors[f"ssm.{i}"],
                                    use_kernel=use_kernel, mask=mask)
        out = mixer.out_proj(y.transpose(1, 2).to(dtype))
        return out, {f"conv.{i}": new_conv.contiguous(), f"ssm.{i}": new_ssm}
