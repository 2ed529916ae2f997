"""Matrix products in bfloat16 on CPU, where the hardware pays for it; float32 elsewhere.

Why: at 130M parameters and up, prefill is matrix products (the projections) and a
decode step is a pass over every weight (memory-bound). A CPU with AMX multiplies bf16
matrices many times faster than float32 ones; any CPU reads bf16 weights in half the
time. The recurrence (scan, states, norms, residual stream) stays float32: only the
projections' inputs and weights are rounded, products accumulate in float32.

``matmul_dtype`` (on :meth:`oprm_rag.RecurrentLM.from_pretrained`) chooses:

* ``None`` / ``"float32"`` (default): the model's own dtype everywhere, exact.
* ``"bfloat16"``: prefill projections and the LM head in bf16 (weights kept as bf16
  copies, inputs rounded, float32 out), decode-step projections on bf16 weights.
* ``"auto"``: bf16 for prefill only where the CPU has AMX (on AVX-512-BF16 alone
  torch's bf16 products measured slower than float32), bf16 decode weights where the
  CPU has AVX-512-BF16 or AMX; float32 otherwise. Nothing changes on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["MatmulPrecision", "resolve_matmul_dtype", "cpu_bf16_support", "Bf16Linear", "linear_for", "MATMUL_DTYPES"]

MATMUL_DTYPES = (None, "auto", "float32", "bfloat16")


@dataclass(frozen=True)
class MatmulPrecision:
    """What the projections run in: ``prefill`` (None: the model's dtype) and ``step``
    (the decode path's weight storage; None: as loaded)."""

    prefill: torch.dtype | None = None
    step: torch.dtype | None = None

    @property
    def exact(self) -> bool:
        return self.prefill is None and self.step is None

    def label(self) -> str:
        name = {None: "model", torch.bfloat16: "bf16"}
        return f"prefill={name.get(self.prefill, str(self.prefill))},step={name.get(self.step, str(self.step))}"


def cpu_bf16_support() -> dict[str, bool]:
    """Which bf16 instructions this CPU has, as torch sees them (False where it cannot say)."""
    cpu = getattr(torch, "cpu", None)

    def ask(name: str) -> bool:
        fn = getattr(cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except Exception:  # noqa: BLE001 - an unknown build: report the feature absent
            return False

    return {"amx": ask("_is_amx_tile_supported"), "avx512_bf16": ask("_is_avx512_bf16_supported")}


def resolve_matmul_dtype(value: Any, device: torch.device, model_dtype: torch.dtype) -> MatmulPrecision:
    """The precision for ``matmul_dtype=value`` on ``device`` (see the module docstring)."""
    if isinstance(value, torch.dtype):
        value = str(value).replace("torch.", "")
    if value not in MATMUL_DTYPES:
        raise ValueError(f"matmul_dtype must be one of {MATMUL_DTYPES[1:]} (or None), got {value!r}")
    if value in (None, "float32") or device.type != "cpu" or model_dtype != torch.float32:
        return MatmulPrecision()
    if value == "bfloat16":
        return MatmulPrecision(torch.bfloat16, torch.bfloat16)
    has = cpu_bf16_support()
    return MatmulPrecision(torch.bfloat16 if has["amx"] else None,
                           torch.bfloat16 if (has["amx"] or has["avx512_bf16"]) else None)


class Bf16Linear:
    """``module(x)`` for an ``nn.Linear`` with a bf16 copy of its weight: ``x`` rounded to
    bf16, the product accumulated by torch's bf16 kernels, the result (and bias) float32."""

    def __init__(self, module: Any) -> None:
        self.weight = module.weight.detach().to(torch.bfloat16).contiguous()
        self.bias = None if module.bias is None else module.bias.detach().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(torch.bfloat16), self.weight).float()
        return out if self.bias is None else out + self.bias


def linear_for(module: Any, dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The prefill projection for ``module`` at ``dtype`` (None: the module itself)."""
    if dtype is torch.bfloat16 and type(module) is torch.nn.Linear and module.weight.dtype == torch.float32:
        return Bf16Linear(module)
    return module
