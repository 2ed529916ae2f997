"""What Mamba-1 and Mamba-2 backends share: the residual backbone around their mixers.

Both families are ``embeddings -> [RMSNorm -> mixer -> + residual] x L -> norm_f -> head``
with per-layer conv and SSM states; they differ only in the mixer. Subclasses supply
the per-layer state layout and the mixer; this class runs the stack from a state.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from ..kernels.precision import MatmulPrecision, linear_for, resolve_matmul_dtype
from ..kernels.step import embedding_fn, rms_norm_fn, step_linear
from ..state import RecurrentState
from ..threads import intra_op_threads
from .base import Backend, ForwardOutput, StepInput, StepSession, call_threads

__all__ = ["SSMBackboneBackend"]


class SSMBackboneBackend(Backend):
    supports_left_padding = True

    def __init__(self, model: Any, kernels: str = "auto") -> None:
        super().__init__(model, kernels)
        self.backbone = model.backbone
        self.precision = MatmulPrecision()  # float32 projections: exact (see set_matmul_dtype)
        self._projections: dict[tuple[int, str], Any] = {}

    # ------------------------------------------------------------------ projections
    def set_matmul_dtype(self, value: Any) -> MatmulPrecision:
        """Run the projections in ``value`` ("bfloat16", "auto", "float32" or None; see
        :mod:`oprm_rag.kernels.precision`); returns what it resolved to here."""
        self.precision = resolve_matmul_dtype(value, self.device, self.dtype)
        self._projections.clear()
        return self.precision

    def proj(self, module: Any) -> Any:
        """``module`` as the forward pass runs it: itself, or a bf16 copy (made once)."""
        if self.precision.prefill is None:
            return module
        key = (id(module), "prefill")
        fn = self._projections.get(key)
        if fn is None:
            fn = self._projections[key] = linear_for(module, self.precision.prefill)
        return fn

    def step_proj(self, module: Any) -> Any:
        """``module`` as a decode step runs it (``kernels.step.step_linear``), made once per
        backend: a bf16 copy of the weights is not remade for every session."""
        key = (id(module), "step")
        fn = self._projections.get(key)
        if fn is None:
            fn = self._projections[key] = step_linear(module, self.precision.step)
        elif hasattr(fn, "threads"):  # a C product: split over the threads of the session now being made
            fn.threads = torch.get_num_threads()
        return fn

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        return self.proj(head)(hidden.to(head.weight.dtype)).float()

    def _require_cuda_kernels(self) -> None:
        try:
            import mamba_ssm  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "mamba-ssm is not installed; install the CUDA extra: pip install 'oprm-rag[cuda]'."
            ) from exc

    def empty_state(self, batch_size: int = 1) -> RecurrentState:
        tensors = {"position": torch.zeros(batch_size, dtype=torch.long, device=self.device)}
        for i in range(len(self.backbone.layers)):
            tensors.update(self._empty_layer_state(i, batch_size))
        return RecurrentState(self.family, tensors)

    @abstractmethod
    def _empty_layer_state(self, i: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s named state tensors before any token."""

    @abstractmethod
    def _mixer(self, i: int, mixer: Any, hidden: torch.Tensor, step: StepInput,
               use_kernel: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Layer ``i``'s mixer output and its new named state tensors."""

    @abstractmethod
    def _mixer_constants(self, i: int, mixer: Any) -> dict[str, Any]:
        """Layer ``i``'s mixer weights and derived constants for :meth:`_mixer_step`."""

    @abstractmethod
    def _mixer_step(self, i: int, c: dict[str, Any], hidden: torch.Tensor,
                    tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One token through layer ``i``'s mixer: ``hidden`` [b, d] (normed); updates
        ``tensors`` (the session's own state) in place or by replacing its entries."""

    def _use_kernel(self, step: StepInput) -> bool:
        return self.use_cuda_kernels() and step.mask is None

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None, *,
                all_logits: bool = False, pad_left: torch.Tensor | None = None) -> ForwardOutput:
        with intra_op_threads(call_threads(self, input_ids.numel())):  # short calls: one thread
            return self._forward(input_ids, state, all_logits, pad_left)

    def _forward(self, input_ids: torch.Tensor, state: RecurrentState | None, all_logits: bool,
                 pad_left: torch.Tensor | None) -> ForwardOutput:
        step = self._begin(input_ids, state, pad_left)
        use_kernel = self._use_kernel(step)
        new: dict[str, torch.Tensor] = {"position": step.position_after()}
        hidden = self.backbone.embeddings(step.ids)
        for i, layer in enumerate(self.backbone.layers):
            residual = hidden
            normed = layer.norm(hidden.to(dtype=layer.norm.weight.dtype))
            if layer.residual_in_fp32:
                residual = residual.to(torch.float32)
            out, layer_state = self._mixer(i, layer.mixer, normed, step, use_kernel)
            new.update(layer_state)
            hidden = residual + out
        hidden = self.backbone.norm_f(hidden)
        if not all_logits:
            hidden = hidden[:, -1]
        return ForwardOutput(self._lm_head(hidden), RecurrentState(self.family, new))

    # ------------------------------------------------------------------ single-token path
    def session(self, state: RecurrentState) -> StepSession:
        return StepSession(self, state)

    def _step_constants(self) -> dict[str, Any]:
        """Per-layer functions and constants, resolved once per decode session."""
        layers = self.backbone.layers
        head = self.model.get_output_embeddings()
        return {
            "embed": embedding_fn(self.backbone.embeddings),
            "layers": [(rms_norm_fn(layer.norm), layer.norm.weight.dtype, bool(layer.residual_in_fp32),
                        self._mixer_constants(i, layer.mixer)) for i, layer in enumerate(layers)],
            "norm_f": rms_norm_fn(self.backbone.norm_f),
            "head": self.step_proj(head),
            "head_dtype": head.weight.dtype,
        }

    def _step(self, ids: torch.Tensor, tensors: dict[str, torch.Tensor], c: dict[str, Any]) -> torch.Tensor:
        """One token per row (``ids`` [b]) from the session's ``tensors``; logits [b, v]."""
        hidden = c["embed"](ids)
        for i, (norm, norm_dtype, fp32_residual, mc) in enumerate(c["layers"]):
            residual = hidden.float() if fp32_residual else hidden
            hidden = residual + self._mixer_step(i, mc, norm(hidden.to(norm_dtype)), tensors)
        return c["head"](c["norm_f"](hidden).to(c["head_dtype"])).float()
