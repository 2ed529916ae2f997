"""Mamba-2 from an explicit state, on our own SSD scan.

Our scan (``kernels/ssd.py``) takes an initial state, is chunked matrix work on CPU,
and hosts the Stuffed-Mamba state-collapse mitigations, which therefore apply alike to
plain inference and to OPRM's chunk prefill.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.ssd import CPU_CHUNK, NEUTRAL, SSDParams, discretise_dt, ssd_scan, ssd_step, ssd_window_scan
from ..kernels.step import act_fn, conv_step, is_silu
from .base import StepInput, causal_conv_time_major
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
        self._silu = [is_silu(layer.mixer.act) for layer in self.backbone.layers]  # native conv fuses SiLU
        # transformers' gated RMS norm, which the native pass after the scan reproduces (float32 only)
        self._fused_norm = [type(layer.mixer.norm).__name__ == "MambaRMSNormGated"
                            and isinstance(getattr(layer.mixer.norm, "group_size", None), int)
                            and layer.mixer.norm.weight.dtype == torch.float32 and layer.mixer.D.dtype == torch.float32
                            for layer in self.backbone.layers]
        self.chunk_size = int(getattr(model.config, "chunk_size", 64) or 64)
        self.mitigation = mitigation
        if mitigation is not None and hasattr(mitigation, "check_for_model"):
            mitigation.check_for_model(model)  # a window state too big for memory fails before allocating
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
        gate, xbc, dt = self.proj(mixer.in_proj)(hidden).split([self.d_inner, self.conv_dim, self.heads], dim=-1)
        xbc, new_conv = self._conv(i, mixer, xbc, step, use_kernel)
        new = {f"conv.{i}": new_conv}
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
                y, h = self._scan_cpu(x, dt, A, B, C, h0)
                if self._fused_norm[i] and y.dtype == torch.float32 and gate.dtype == torch.float32:
                    from ..kernels import native

                    norm = mixer.norm
                    if native.gated_norm_tm(y, x.reshape(b, t, self.d_inner), gate, mixer.D, norm.weight,
                                            self.d_inner // int(norm.group_size), float(norm.variance_epsilon)) \
                            is not None:
                        new[f"ssm.{i}"] = h
                        return self.proj(mixer.out_proj)(y.view(b, t, self.d_inner).to(dtype)), new
            new[f"ssm.{i}"] = h
        y = y + x.float() * mixer.D.float()[:, None]
        y = mixer.norm(y.reshape(b, t, self.d_inner), gate)
        return self.proj(mixer.out_proj)(y.to(dtype)), new

    # ------------------------------------------------------------------ single-token path
    def _mixer_constants(self, i: int, mixer: Any) -> dict[str, Any]:
        norm = mixer.norm
        group = int(getattr(norm, "group_size", self.d_inner) or self.d_inner)
        lo, hi = (float(v) for v in mixer.time_step_limit)
        return {
            "native": self._native_step(mixer, group, (lo, hi)),
            "in_proj": self.step_proj(mixer.in_proj), "out_proj": self.step_proj(mixer.out_proj),
            "conv_w": mixer.conv1d.weight[:, 0, :], "conv_b": mixer.conv1d.bias, "act": act_fn(mixer.act),
            "dt_bias": mixer.dt_bias.float(), "clamp": (lo, hi) if (lo > 0.0 or hi != float("inf")) else None,
            "A": -torch.exp(mixer.A_log.float()),
            "D": mixer.D.float().repeat_interleave(self.head_dim),  # per channel of x, [d_inner]
            "norm_w": norm.weight, "norm_eps": float(norm.variance_epsilon), "norm_groups": self.d_inner // group,
        }

    def _native_step(self, mixer: Any, group: int, dt_limit: tuple[float, float]) -> Any:
        """The C step for this layer (``kernels/native.py``), or None (then torch ops)."""
        from ..kernels import native

        params = [mixer.conv1d.weight, mixer.A_log, mixer.D, mixer.dt_bias, mixer.norm.weight]
        if (self.window is not None or self.device.type != "cpu" or not is_silu(mixer.act)
                or any(t.dtype != torch.float32 for t in params) or self.dtype != torch.float32):
            return None
        lib = native.library()
        if lib is None:
            return None
        p = self.ssd_params
        return native.Mamba2Step(
            lib, heads=self.heads, head_dim=self.head_dim, d_state=self.d_state, groups=self.groups,
            conv_w=mixer.conv1d.weight[:, 0, :], conv_b=mixer.conv1d.bias, dt_bias=mixer.dt_bias, dt_limit=dt_limit,
            A=-torch.exp(mixer.A_log.float()), D=mixer.D.float(), norm_w=mixer.norm.weight,
            norm_groups=self.d_inner // group, eps=float(mixer.norm.variance_epsilon), alpha_scale=p.alpha_scale,
            b_scale=p.b_scale, normalize=p.normalize_state)

    def _mixer_step(self, i: int, c: dict[str, Any], hidden: torch.Tensor,
                    tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mixer on one token: one C call between the projections where the native
        kernels are built; else the conv as a dot product with the conv state and the SSD
        step as a few in-place elementwise ops on the session's own SSM state."""
        b, dtype = hidden.shape[0], hidden.dtype
        if c["native"] is not None:
            conv, h = tensors[f"conv.{i}"], tensors[f"ssm.{i}"]
            if not conv.is_contiguous():
                conv = tensors[f"conv.{i}"] = conv.contiguous()
            return c["out_proj"](c["native"](c["in_proj"](hidden), conv, h))
        heads, p, n, g = self.heads, self.head_dim, self.d_state, self.groups
        gate, xbc, dt = c["in_proj"](hidden).split([self.d_inner, self.conv_dim, heads], dim=-1)
        xbc, tensors[f"conv.{i}"] = conv_step(tensors[f"conv.{i}"], xbc, c["conv_w"], c["conv_b"])
        xbc = c["act"](xbc).to(dtype)
        gn = g * n
        x, B, C = xbc.split([self.d_inner, gn, gn], dim=-1)
        dt = F.softplus(dt.float() + c["dt_bias"])
        if c["clamp"] is not None:
            dt = dt.clamp(*c["clamp"])
        xf, params = x.float(), self.ssd_params
        if self.window is not None:  # the windowed mitigation keeps a history, not a state
            history = tuple(tensors[f"win_{k}.{i}"] for k in "xBA")
            y, hist = ssd_window_scan(xf.view(b, 1, heads, p), dt[:, None], c["A"], B.view(b, 1, g, n),
                                      C.view(b, 1, g, n), self.window, history, params)
            tensors.update({f"win_{k}.{i}": v for k, v in zip("xBA", hist)})
            y = y.reshape(b, self.d_inner)
        else:
            h = tensors[f"ssm.{i}"]  # [b, heads, p, n] float32, owned by the session
            decay = torch.exp(dt * c["A"])
            if params.alpha_scale != 1.0:
                decay = decay * torch.where(dt > 0, params.alpha_scale, 1.0)
            Bf = B.float() if params.b_scale == 1.0 else B.float() * params.b_scale
            h.mul_(decay[:, :, None, None])
            xdt = (xf.view(b, heads, p) * dt[..., None]).view(b, g, heads // g, p, 1)
            h.view(b, g, heads // g, p, n).addcmul_(xdt, Bf.view(b, g, 1, 1, n))
            if params.normalize_state:
                h.div_(h.flatten(2).norm(dim=-1).clamp_min(1e-12)[..., None, None])
            y = torch.matmul(h.view(b, g, (heads // g) * p, n), C.float().view(b, g, n, 1)).view(b, self.d_inner)
        y = torch.addcmul(y, xf, c["D"]) * F.silu(gate.float())
        groups = c["norm_groups"]
        yg = y.view(b, groups, -1) if groups > 1 else y
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + c["norm_eps"])
        y = c["norm_w"] * yg.view(b, self.d_inner)
        return c["out_proj"](y.to(dtype))

    def _conv(self, i: int, mixer: Any, xbc: torch.Tensor, step: StepInput,
              use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal conv and activation on ``xbc`` [b, t, c] (time-major): the output
        [b, t, c] (0 on pads) and the new conv state [b, c, k-1]. On CPU in float32 this is
        one C pass (``kernels/native.py``) with no transposes; else conv1d."""
        return causal_conv_time_major(xbc, step.state.tensors[f"conv.{i}"], mixer.conv1d, mixer.act,
                                      self._silu[i], step.mask, step.pad_left, use_kernel)

    def _scan_cpu(self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scan off CUDA: the recurrence in C where the native kernels are built (the
        fastest form on a CPU: each head's state stays in L1, see ``oprm_mamba2_scan_tm``),
        else the chunked torch scan with chunks of at most :data:`CPU_CHUNK` tokens."""
        b, t, heads, p = x.shape
        params = self.ssd_params
        if (x.device.type == "cpu" and not params.normalize_state and x.dtype == torch.float32
                and B.dtype == torch.float32 and C.dtype == torch.float32):
            from ..kernels import native

            h = h0.float().clone(memory_format=torch.contiguous_format)  # the given state is never modified
            y = native.mamba2_scan_tm(x.reshape(b, t, heads * p), dt, A, B.reshape(b, t, -1), C.reshape(b, t, -1), h,
                                      params.alpha_scale, params.b_scale)
            if y is not None:
                return y.view(b, t, heads, p), h
        chunk = self.chunk_size if x.device.type == "cuda" else min(self.chunk_size, CPU_CHUNK)
        return ssd_scan(x, dt, A, B, C, h0, chunk, params)

    def _scan_cuda(self, x, dt, A, B, C, h0):  # pragma: no cover - needs CUDA and mamba-ssm
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        y, h = mamba_chunk_scan_combined(
            x, dt, A, B, C, chunk_size=self.chunk_size, D=None, z=None,
            initial_states=h0.float(), return_final_states=True)
        return y.float(), h.float()
