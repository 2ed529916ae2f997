"""``CacheLayout``: how one kind of transformers cache maps to and from a state's tensors.

Kept apart from :mod:`.hf_cache` (which picks a layout per model) so that a family's own
layout (``xlstm.py``) and the generic backend do not import each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..state import RecurrentState

__all__ = ["CacheLayout"]


class CacheLayout(ABC):
    """How one kind of transformers cache maps to and from a state's named tensors."""

    #: Attention keys and values live in the state (then positions and masks are needed).
    has_kv: bool = True

    @abstractmethod
    def build(self, state: RecurrentState, fresh: bool) -> Any:
        """A new cache holding ``state`` (copies of whatever the model updates in place)."""

    @abstractmethod
    def extract(self, cache: Any) -> dict[str, torch.Tensor]:
        """The cache's tensors by state name (``position`` excluded)."""
