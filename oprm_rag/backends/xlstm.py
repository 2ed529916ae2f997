"""xLSTM's own cache (``xLSTMCache``) as a state layout for the cache backend.

xLSTM is purely recurrent: per block, the mLSTM's matrix memory C [b, heads, dk, dv], its
normaliser n [b, heads, dk] and its stabiliser m [b, heads, 1]. transformers keeps them
in ``xLSTMCache.rnn_state`` and updates them **in place** (``copy_``), so the cache is
built from copies. Nothing depends on absolute positions and there are no keys, so
batches of states need no mask. State names: ``ssm.{block}.c`` / ``.n`` / ``.m`` (the
``ssm.`` prefix makes ``chunk_tokens="auto"`` count them as recurrent memory).
"""

from __future__ import annotations

from typing import Any

import torch

from ..state import RecurrentState
from .cache_layout import CacheLayout

__all__ = ["XlstmLayout"]

_PARTS = ("c", "n", "m")


class XlstmLayout(CacheLayout):
    has_kv = False

    def __init__(self, config: Any, dtype: torch.dtype = torch.float32) -> None:
        from transformers.models.xlstm.modeling_xlstm import xLSTMCache  # noqa: F401 (present: xlstm runs here)

        self.config = config
        self.dtype = dtype  # as transformers makes it: the model's dtype

    def build(self, state: RecurrentState, fresh: bool) -> Any:
        from transformers.models.xlstm.modeling_xlstm import xLSTMCache

        pos = state.tensors["position"]
        b = int(pos.shape[0])
        parts = {k: v for k, v in state.tensors.items() if k.startswith("ssm.")}
        cache = xLSTMCache(self.config, b, dtype=self.dtype, device=pos.device)
        if fresh or not parts:
            return cache
        cache.rnn_state = {layer: tuple(state.tensors[f"ssm.{layer}.{p}"].clone() for p in _PARTS)
                           for layer in range(self.config.num_hidden_layers)}
        cache.rnn_state_initial = False
        cache.seqlen_offset = pos.max().reshape(1).clone()
        return cache

    def extract(self, cache: Any) -> dict[str, torch.Tensor]:
        return {f"ssm.{layer}.{p}": t for layer, parts in cache.rnn_state.items() for p, t in zip(_PARTS, parts)}
