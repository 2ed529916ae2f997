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

from ..kernels.selective_scan import selective_scan, selective_scan_time_major
from ..kernels.step import act_fn, conv_step, is_silu, linear_fn, rms_norm_fn
from .base import StepInput, causal_conv_time_major
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
        self._silu = [is_silu(layer.mixer.act) for layer in self.backbone.layers]  # native conv fuses SiLU
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
        xz = self.proj(mixer.in_proj)(hidden)  # [b, t, 2d]
        x_tm, new_conv = self._conv(i, mixer, xz[..., :self.d_inner], step, use_kernel)
        dt, B, C = torch.split(mixer.x_proj(x_tm), [mixer.time_step_rank, self.d_state, self.d_state], dim=-1)
        if hasattr(mixer, "b_layernorm"):  # Falcon-Mamba
            dt, B, C = mixer.dt_layernorm(dt), mixer.b_layernorm(B), mixer.c_layernorm(C)
        if self.quantized:
            dt = mixer.dt_proj(dt) - mixer.dt_proj.bias  # [b, t, d]
        else:
            dt = F.linear(dt, mixer.dt_proj.weight)
        A = -torch.exp(mixer.A_log.float())
        h0 = step.state.tensors[f"ssm.{i}"]
        if use_kernel:
            y, new_ssm = selective_scan(x_tm.transpose(1, 2), dt.transpose(1, 2), A, B, C, mixer.D,
                                        xz[..., self.d_inner:].transpose(1, 2), mixer.dt_proj.bias, h0,
                                        use_kernel=True, mask=mask)
            y = y.transpose(1, 2)
        else:
            y, new_ssm = selective_scan_time_major(x_tm, dt, A, B, C, mixer.D, xz[..., self.d_inner:],
                                                   mixer.dt_proj.bias, h0, pad_left=step.pad_left)
        out = self.proj(mixer.out_proj)(y.to(dtype))
        return out, {f"conv.{i}": new_conv, f"ssm.{i}": new_ssm}

    def _conv(self, i: int, mixer: Any, x: torch.Tensor, step: StepInput,
              use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal conv and activation on ``x`` [b, t, d] (time-major): the output
        [b, t, d] (contiguous, 0 on pads) and the new conv state [b, d, k-1]."""
        return causal_conv_time_major(x, step.state.tensors[f"conv.{i}"], mixer.conv1d, mixer.act,
                                      self._silu[i], step.mask, step.pad_left, use_kernel)

    # ------------------------------------------------------------------ single-token path
    def _mixer_constants(self, i: int, mixer: Any) -> dict[str, Any]:
        falcon = hasattr(mixer, "b_layernorm")
        return {
            "in_proj": self.step_proj(mixer.in_proj), "out_proj": self.step_proj(mixer.out_proj),
            "x_proj": linear_fn(mixer.x_proj),
            "conv_w": mixer.conv1d.weight[:, 0, :], "conv_b": mixer.conv1d.bias, "act": act_fn(mixer.act),
            "norms": tuple(rms_norm_fn(m) for m in (mixer.dt_layernorm, mixer.b_layernorm, mixer.c_layernorm))
            if falcon else None,
            "dt_proj": mixer.dt_proj, "dt_w": mixer.dt_proj.weight, "dt_bias": mixer.dt_proj.bias.float(),
            "A": -torch.exp(mixer.A_log.float()), "D": mixer.D.float(), "split": [mixer.time_step_rank,
                                                                              self.d_state, self.d_state],
        }

    def _mixer_step(self, i: int, c: dict[str, Any], hidden: torch.Tensor,
                    tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mixer on one token: the conv as a dot product with the conv state, the
        selective-scan step as in-place elementwise ops on the session's SSM state."""
        dtype = hidden.dtype
        x, z = c["in_proj"](hidden).chunk(2, dim=-1)  # [b, d] each
        x, tensors[f"conv.{i}"] = conv_step(tensors[f"conv.{i}"], x, c["conv_w"], c["conv_b"])
        x = c["act"](x).to(dtype)
        dt, B, C = torch.split(c["x_proj"](x), c["split"], dim=-1)
        if c["norms"] is not None:  # Falcon-Mamba
            dt, B, C = (norm(v) for norm, v in zip(c["norms"], (dt, B, C)))
        if self.quantized:
            dt = c["dt_proj"](dt) - c["dt_proj"].bias
        else:
            dt = F.linear(dt, c["dt_w"])
        dt = F.softplus(dt.float() + c["dt_bias"])  # [b, d]
        xf = x.float()
        h = tensors[f"ssm.{i}"]  # [b, d, n] float32, owned by the session
        h.mul_(torch.exp(dt[..., None] * c["A"])).addcmul_((dt * xf)[..., None], B.float()[:, None, :])
        y = torch.matmul(h, C.float()[..., None])[..., 0]
        y = torch.addcmul(y, xf, c["D"]) * F.silu(z.float())
        return c["out_proj"](y.to(x.dtype).to(dtype))
