"""Building blocks of the single-token decode step, with as few torch ops as possible.

At batch 1 and one token every op is tiny, so a step costs what its ops cost to
dispatch, not what they compute: a module call adds hooks and attribute lookups, a
``conv1d`` on one token goes through oneDNN's convolution set-up, an ``einsum`` parses
its equation. These helpers resolve each module once per decode session into the
plain functional call it amounts to, and fall back to calling the module itself for
anything they do not recognise (quantised linears, unknown norms), so they are exact
for every model the backends run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["linear_fn", "step_linear", "STEP_NATIVE_MIN", "layer_norm_fn", "rms_norm_fn", "act_fn", "is_silu", "embedding_fn", "conv_step"]

Fn = Callable[[torch.Tensor], torch.Tensor]

# transformers' RMS norms that compute weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)
_RMS_NORMS = {"MambaRMSNorm", "Mamba2RMSNorm", "FalconMambaRMSNorm"}


def linear_fn(module: Any) -> Fn:
    """``module(x)`` for an ``nn.Linear`` as one ``F.linear`` call (else the module)."""
    if type(module) is torch.nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


#: Weights (elements) from which a decode step's projection runs in C (``native.StepLinear``):
#: there reading the weight (>= 1 MB in float32) outweighs a ctypes call, and the rows are
#: split over threads that sleep, not spin, while they wait. Smaller ones stay ``F.linear``.
STEP_NATIVE_MIN = 1 << 18


def step_linear(module: Any, weight_dtype: torch.dtype | None = None) -> Fn:
    """A decode step's projection for ``module``: the C matrix-vector product on a CPU
    float32 ``nn.Linear`` of at least :data:`STEP_NATIVE_MIN` weights (on a bf16 copy of the
    weight when ``weight_dtype`` is bfloat16), else :func:`linear_fn`. Without the native
    kernels the weights stay as loaded (float32): bf16 storage needs the C product."""
    if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32 \
            and module.weight.device.type == "cpu" and module.weight.numel() >= STEP_NATIVE_MIN:
        from . import native

        lib = native.library()
        if lib is not None:
            return native.StepLinear(lib, module.weight, module.bias, weight_dtype or torch.float32,
                                     threads=torch.get_num_threads())
    return linear_fn(module)


def layer_norm_fn(module: Any) -> Fn:
    """``nn.LayerNorm`` as one ``F.layer_norm`` call (else the module)."""
    if type(module) is torch.nn.LayerNorm:
        shape, weight, bias, eps = tuple(module.normalized_shape), module.weight, module.bias, module.eps
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    return module


def embedding_fn(module: Any) -> Fn:
    if type(module) is torch.nn.Embedding and module.max_norm is None:
        weight = module.weight
        return lambda ids: F.embedding(ids, weight)
    return module


def rms_norm_fn(module: Any) -> Fn:
    """transformers' Mamba RMS norms (and Falcon-Mamba's weightless one) as plain ops."""
    name = type(module).__name__
    if name in _RMS_NORMS and hasattr(module, "variance_epsilon"):
        weight, eps = module.weight, float(module.variance_epsilon)
        if weight.dtype == torch.float32:

            def norm(x: torch.Tensor) -> torch.Tensor:
                if x.dtype == torch.float32:
                    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
                xf = x.float()
                return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

            return norm
        return module
    if name == "FalconMambaWeightlessRMSNorm" and hasattr(module, "eps"):
        eps = float(module.eps)

        def weightless(x: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)

        return weightless
    return module


def is_silu(module: Any) -> bool:
    """True when the activation module computes SiLU (torch's ``nn.SiLU`` or transformers'
    ``SiLUActivation``), checked on sample values so that a look-alike is never taken."""
    if type(module) is torch.nn.SiLU:
        return True
    if type(module).__name__ not in ("SiLU", "SiLUActivation", "Swish"):
        return False
    probe = torch.linspace(-30.0, 30.0, 61)
    try:
        with torch.no_grad():
            return bool(torch.equal(module(probe), F.silu(probe)))
    except Exception:  # noqa: BLE001 - an activation that cannot take a plain tensor is not SiLU
        return False


def act_fn(module: Any) -> Fn:
    return F.silu if is_silu(module) else module


def conv_step(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of a causal depthwise conv: ``x`` [b, c] after ``conv_state`` [b, c, k-1].

    Returns the conv output [b, c] (in ``weight``'s dtype, before the activation) and
    the new conv state (the window's last k-1 inputs, a view). ``weight`` is [c, k]. At
    one token the convolution is a k-term dot product per channel: no conv1d set-up.
    """
    window = torch.cat([conv_state, x.to(conv_state.dtype)[..., None]], dim=-1)  # [b, c, k]
    w = window if window.dtype == weight.dtype else window.to(weight.dtype)
    out = (w * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return out, window[..., 1:]
