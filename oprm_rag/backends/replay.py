"""Fallback for models whose cache we cannot continue exactly: replay the token prefix.

Hybrids (Zamba2, Jamba, Falcon-H1, Bamba), transformers and anything else with a
causal-LM head run here. Their "state" is the token prefix itself, so every
continuation re-runs the prefix from scratch: exact by construction, but each chunk
costs a full prefill and the state grows with the text (nothing worth caching).
Decoding keeps the model's own KV/SSM cache inside a session, where single-token
continuation is what transformers' generate relies on.
"""

from __future__ import annotations

from typing import Any

import torch

from ..state import RecurrentState
from .base import Backend, DecodeSession, ForwardOutput

__all__ = ["ReplayBackend"]


class ReplayBackend(Backend):
    family = "replay"
    exact_continuation = False

    @classmethod
    def handles(cls, model: Any) -> bool:
        return callable(getattr(model, "forward", None))

    def empty_state(self, batch_size: int = 1) -> RecurrentState:
        dev = self.device
        return RecurrentState(self.family, {
            "position": torch.zeros(batch_size, dtype=torch.long, device=dev),
            "tokens": torch.zeros(batch_size, 0, dtype=torch.long, device=dev),
        })

    def state_nbytes(self) -> int:
        return 0

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None, *,
                all_logits: bool = False, pad_left: torch.Tensor | None = None) -> ForwardOutput:
        if pad_left is not None and bool((pad_left > 0).any()):
            raise ValueError("the replay backend does not take padded batches")
        b, t = input_ids.shape
        state = self.empty_state(b) if state is None else self.check_state(state, b)
        full = torch.cat([state.tensors["tokens"], input_ids.to(self.device)], dim=1)
        logits = self.model(input_ids=full, use_cache=False).logits
        logits = logits[:, -t:] if all_logits else logits[:, -1]
        new = RecurrentState(self.family, {"position": self._advance(state, t), "tokens": full})
        return ForwardOutput(logits.float(), new)

    def session(self, state: RecurrentState) -> DecodeSession:
        return _CachedSession(self, state)


class _CachedSession(DecodeSession):
    """Single-token decoding on the model's own cache, built from the prefix once."""

    def __init__(self, backend: ReplayBackend, state: RecurrentState) -> None:
        super().__init__(backend, state)
        self._past = None

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        model = self.backend.model
        ids = input_ids.to(self.backend.device)
        if self._past is None:
            full = torch.cat([self.state.tensors["tokens"], ids], dim=1)
            out = model(input_ids=full, use_cache=True)
        else:
            out = model(input_ids=ids, past_key_values=self._past, use_cache=True)
        self._past = out.past_key_values
        tokens = torch.cat([self.state.tensors["tokens"], ids], dim=1)
        self.state = RecurrentState(self.backend.family, {
            "position": self.state.tensors["position"] + ids.shape[1], "tokens": tokens})
        return out.logits[:, -1].float()
