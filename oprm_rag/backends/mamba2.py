"""Mamba-2 from an explicit state, on our own SSD scan.

Our scan (``kernels/ssd.py``) takes an initial state, is chunked matrix work on CPU,
and hosts the Stuffed-Mamba state-collapse mitigations, which therefore apply alike to
plain inference and to OPRM's chunk prefill.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.ssd import NEUTRAL, SSDParams, discretise_dt, ssd_scan, ssd_step, ssd_window_scan
from .base import StepInput, shifted_conv_input
from .ssm_backbone import SSMBackboneBackend

__all__ = ["Mamba2Backend"]


class Mamba2Backend(SSMBackboneBackend):
    family = "mamba2"

    def __init__(self, model: Any, kernels: str = "auto", mitigation: Any = None) -> None:
        super().__init__(model, kernels)
        m = self.backbone.layers[0].mixer
        self.heads, self.head_dim, self.d_state = m.num_heads, m.head_dim, m.ssm_state_size
        self.groups, self.d_inner, self.conv_dim = m.n_groups, m.intermediate_size, m.conv_dim
        self.kernel = m.conv_kernel_size
        self.chunk_size = int(getattr(model.config, "chunk_size", 64) or 64)
        self.mitigation = mitigation
        self.ssd_params: SSDParams = mitigation.ssd_params() if mitigation is not None else NEUTRAL
        self.window: int | None = getattr(mitigation, "window", None)
        if self.window is not None:
            # pads would take window slots: batch equal lengths only
            self.supports_left_padding = False

    @classmethod
    def handles(cls, model: Any) -> bool:
        return getattr(model.config, "model_type", None) == "mamba2" and hasattr(model, "backbone")

    def _empty_layer_state(self, i: int, batch_size: int) -> dict[str, torch.Tensor]:
        f32 = dict(dtype=torch.float32, device=self.device)
        out = {f"conv.{i}": torch.zeros(batch_size, self.conv_dim, self.kernel - 1, dtype=self.dtype,
                                        device=self.device)}
        if self.window is None:
            out[f"ssm.{i}"] = torch.zeros(batch_size, self.heads, self.head_dim, self.d_state, **f32)
        else:
            w = self.window - 1
            out[f"win_x.{i}"] = torch.zeros(batch_size, w, self.heads, self.head_dim, **f32)
            out[f"win_B.{i}"] = torch.zeros(batch_size, w, self.heads, self.d_state, **f32)
            out[f"win_A.{i}"] = torch.zeros(batch_size, w, self.heads, **f32)
        return out

    def _use_kernel(self, step: StepInput) -> bool:
        return super()._use_kernel(step) and self.ssd_params.neutral and self.window is None

    def _mixer(self, i: int, mixer: Any, hidden: torch.Tensor, step: StepInput,
               use_kernel: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, t, _ = hidden.shape
        dtype, mask, tensors = hidden.dtype, step.mask, step.state.tensors
        gate, xbc, dt = mixer.in_proj(hidden).split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        if mask is not None:
            xbc = xbc * mask[..., None].to(xbc.dtype)
        conv_in = shifted_conv_input(tensors[f"conv.{i}"], xbc.transpose(1, 2), step.pad_left)
        new = {f"conv.{i}": conv_in[..., conv_in.shape[-1] - (self.kernel - 1):].contiguous()}
        weight = mixer.conv1d.weight
        xbc = F.conv1d(conv_in.to(weight.dtype), weight, mixer.conv1d.bias, groups=self.conv_dim)
        xbc = mixer.act(xbc).to(dtype).transpose(1, 2)
        if mask is not None:
            xbc = xbc * mask[..., None].to(xbc.dtype)
        gn = self.groups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        dt = discretise_dt(dt, mixer.dt_bias, tuple(mixer.time_step_limit))
        if mask is not None:  # a zero step keeps the state exactly through the pads
            dt = dt * mask[..., None].to(dt.dtype)
        A = -torch.exp(mixer.A_log.float())
        x = x.reshape(b, t, self.heads, self.head_dim)
        B = B.reshape(b, t, self.groups, self.d_state)
        C = C.reshape(b, t, self.groups, self.d_state)
        if self.window is not None:
            history = tuple(tensors[f"win_{k}.{i}"] for k in "xBA")
            y, hist = ssd_window_scan(x, dt, A, B, C, self.window, history, self.ssd_params)
            new.update({f"win_{k}.{i}": v for k, v in zip("xBA", hist)})
        else:
            h0 = tensors[f"ssm.{i}"]
            if use_kernel:
                y, h = self._scan_cuda(x, dt, A, B, C, h0)
            elif t == 1:
                y, h = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], h0.float(), self.ssd_params)
                y = y[:, None]
            else:
                y, h = ssd_scan(x, dt, A, B, C, h0, self.chunk_size, self.ssd_params)
            new[f"ssm.{i}"] = h
        y = y + x.float() * mixer.D.float()[:, None]
        y = mixer.norm(y.reshape(b, t, self.d_inner), gate)
        return mixer.out_proj(y.to(dtype)), new

    def _scan_cuda(self, x, dt, A, B, C, h0):  # pragma: no cover - needs CUDA and mamba-ssm
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        y, h = mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size=self.chunk_size, D=None, z=None,
            initial_states=h0.float(), return_final_states=True)
        return y.float(), h.float()
