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
from ..state import RecurrentState
from .base import Backend, ForwardOutput, shifted_conv_input, valid_mask

__all__ = ["Mamba2Backend"]


class Mamba2Backend(Backend):
    family = "mamba2"
    supports_left_padding = True

    def __init__(self, model: Any, kernels: str = "auto", mitigation: Any = None) -> None:
        super().__init__(model, kernels)
        self.backbone = model.backbone
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
            tensors[f"conv.{i}"] = torch.zeros(batch_size, self.conv_dim, self.kernel - 1, dtype=self.dtype, device=dev)
            if self.window is None:
                tensors[f"ssm.{i}"] = torch.zeros(batch_size, self.heads, self.head_dim, self.d_state,
                                                  dtype=torch.float32, device=dev)
            else:
                w = self.window - 1
                f32 = dict(dtype=torch.float32, device=dev)
                tensors[f"win_x.{i}"] = torch.zeros(batch_size, w, self.heads, self.head_dim, **f32)
                tensors[f"win_B.{i}"] = torch.zeros(batch_size, w, self.heads, self.d_state, **f32)
                tensors[f"win_A.{i}"] = torch.zeros(batch_size, w, self.heads, **f32)
        return RecurrentState(self.family, tensors)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None, *,
                all_logits: bool = False, pad_left: torch.Tensor | None = None) -> ForwardOutput:
        b, t = input_ids.shape
        state = self.empty_state(b) if state is None else self.check_state(state, b)
        pad_left = self._check_padding(pad_left, t)
        mask = valid_mask(pad_left, b, t, self.device)
        use_kernel = self.use_cuda_kernels() and self.ssd_params.neutral and self.window is None
        real = t if pad_left is None else t - pad_left
        new: dict[str, torch.Tensor] = {"position": state.tensors["position"] + real}
        hidden = self.backbone.embeddings(input_ids.to(self.device))
        for i, layer in enumerate(self.backbone.layers):
            residual = hidden
            normed = layer.norm(hidden.to(dtype=layer.norm.weight.dtype))
            if layer.residual_in_fp32:
                residual = residual.to(torch.float32)
            ssm = (state.tensors[f"ssm.{i}"] if self.window is None else
                   tuple(state.tensors[f"win_{k}.{i}"] for k in "xBA"))
            out, new[f"conv.{i}"], new_ssm = self._mixer(
                layer.mixer, normed, state.tensors[f"conv.{i}"], ssm, use_kernel, mask, pad_left)
            if self.window is None:
                new[f"ssm.{i}"] = new_ssm
            else:
                new.update({f"win_{k}.{i}": v for k, v in zip("xBA", new_ssm)})
            hidden = residual + out
        hidden = self.backbone.norm_f(hidden)
        if not all_logits:
            hidden = hidden[:, -1]
        return ForwardOutput(self._lm_head(hidden), RecurrentState(self.family, new))

    def _mixer(self, mixer, hidden, conv_state, ssm_state, use_kernel, mask, pad_left):
        b, t, _ = hidden.shape
        dtype = hidden.dtype
        gate, xbc, dt = mixer.in_proj(hidden).split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        if mask is not None:
            xbc = xbc * mask[..., None].to(xbc.dtype)
        conv_in = shifted_conv_input(conv_state, xbc.transpose(1, 2), pad_left)
        new_conv = conv_in[..., conv_in.shape[-1] - (self.kernel - 1):].contiguous()
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
            y, new_ssm = ssd_window_scan(x, dt, A, B, C, self.window, ssm_state, self.ssd_params)
        elif use_kernel:
            y, new_ssm = self._scan_cuda(x, dt, A, B, C, ssm_state)
        elif t == 1:
            y, new_ssm = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], ssm_state.float(), self.ssd_params)
            y = y[:, None]
        else:
            y, new_ssm = ssd_scan(x, dt, A, B, C, ssm_state, self.chunk_size, self.ssd_params)
        y = y + x.float() * mixer.D.float()[:, None]
        y = mixer.norm(y.reshape(b, t, self.d_inner), gate)
        return mixer.out_proj(y.to(dtype)), new_conv, new_ssm

    def _scan_cuda(self, x, dt, A, B, C, h0):  # pragma: no cover - needs CUDA and mamba-ssm
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        y, h = mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size=self.chunk_size, D=None, z=None,
            initial_states=h0.float(), return_final_states=True)
        return y.float(), h.float()
