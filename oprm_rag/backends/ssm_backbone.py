"""What Mamba-1 and Mamba-2 backends share: the residual backbone around their mixers.

Both families are ``embeddings -> [RMSNorm -> mixer -> + residual] x L -> norm_f -> head``
with per-layer conv and SSM states; they differ only in the mixer. Subclasses supply
the per-layer state layout and the mixer; this class runs the stack from a state.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch

from ..state import RecurrentState
from .base import Backend, ForwardOutput, StepInput

__all__ = ["SSMBackboneBackend"]


class SSMBackboneBackend(Backend):
    supports_left_padding = True

    def __init__(self, model: Any, kernels: str = "auto") -> None:
        super().__init__(model, kernels)
        self.backbone = model.backbone

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

    def _use_kernel(self, step: StepInput) -> bool:
        return self.use_cuda_kernels() and step.mask is None

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None, *,
                all_logits: bool = False, pad_left: torch.Tensor | None = None) -> ForwardOutput:
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
