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
from ..state import RecurrentState
from .base import Backend, ForwardOutput, shifted_conv_input, valid_mask

__all__ = ["MambaBackend"]


class MambaBackend(Backend):
    family = "mamba"
    supports_left_padding = True

    def __init__(self, model: Any, kernels: str = "auto") -> None:
        super().__init__(model, kernels)
        self.family = model.config.model_type  # "mamba" or "falcon_mamba"
        self.backbone = model.backbone
        mixer = self.backbone.layers[0].mixer
        self.d_inner = mixer.intermediate_size
        self.d_state = mixer.ssm_state_size
        self.kernel = mixer.conv_kernel_size
        self.quantized = hasattr(model.config, "_is_quantized")

    @classmethod
    def handles(cls, model: Any) -> bool:
        return getattr(model.config, "model_type", None) in ("mamba", "falcon_mamba") and hasattr(model, "backbone")

    def _require_cuda_kernels(self) -> None:
        try:
            import mamba_ssm  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "mamba-ssm is not installed; install the CUDA extra: pip install 'oprm-rag[cuda]'."
            ) from exc

    def empty_state(self, batch_size: int = 1) -> RecurrentState:
        dev = self.device
        tensors: dict[str, torch.Tensor] = {"position": torch.zeros(batch_size, dtype=torch.long, device=dev)}
        for i in range(len(self.backbone.layers)):
            tensors[f"conv.{i}"] = torch.zeros(batch_size, self.d_inner, self.kernel - 1, dtype=self.dtype, device=dev)
            tensors[f"ssm.{i}"] = torch.zeros(batch_size, self.d_inner, self.d_state, dtype=torch.float32, device=dev)
        return RecurrentState(self.family, tensors)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None, *,
                all_logits: bool = False, pad_left: torch.Tensor | None = None) -> ForwardOutput:
        b, t = input_ids.shape
        state = self.empty_state(b) if state is None else self.check_state(state, b)
        pad_left = self._check_padding(pad_left, t)
        mask = valid_mask(pad_left, b, t, self.device)
        use_kernel = self.use_cuda_kernels() and mask is None
        real = t if pad_left is None else t - pad_left
        new: dict[str, torch.Tensor] = {"position": state.tensors["position"] + real}
        hidden = self.backbone.embeddings(input_ids.to(self.device))
        for i, layer in enumerate(self.backbone.layers):
            residual = hidden
            normed = layer.norm(hidden.to(dtype=layer.norm.weight.dtype))
            if layer.residual_in_fp32:
                residual = residual.to(torch.float32)
            out, new[f"conv.{i}"], new[f"ssm.{i}"] = self._mixer(
                layer.mixer, normed, state.tensors[f"conv.{i}"], state.tensors[f"ssm.{i}"], use_kernel, mask, pad_left)
            hidden = residual + out
        hidden = self.backbone.norm_f(hidden)
        if not all_logits:
            hidden = hidden[:, -1]
        return ForwardOutput(self._lm_head(hidden), RecurrentState(self.family, new))

    def _mixer(self, mixer, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
               use_kernel: bool, mask: torch.Tensor | None, pad_left: torch.Tensor | None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = hidden.dtype
        x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # [b, d, t] each
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
        conv_in = shifted_conv_input(conv_state, x, pad_left)
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
        y, new_ssm = selective_scan(x, dt, A, B, C, mixer.D, z, mixer.dt_proj.bias, ssm_state,
                                    use_kernel=use_kernel, mask=mask)
        return mixer.out_proj(y.transpose(1, 2).to(dtype)), new_conv.contiguous(), new_ssm
