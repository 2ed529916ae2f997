"""``chunk_tokens="auto"``: a chunk size from the model's state capacity.

Stuffed Mamba (Chen et al. 2024) fits, for Mamba-2, the forget threshold against the
state size N_S (millions of floats per sequence):

    T_forget ~= 5.172 * N_S - 4.469   (thousands of tokens)

A model whose state holds more can take longer chunks before it has to forget. The
chosen size is capped by the context the model was trained on (its folder's
``training_log.json`` or config), since OPRM chunks should sit inside the length the
model has seen. Outside the law's range (tiny states give T_forget <= 0) the training
length alone decides; with neither, the paper's 2K default. The choice and the reason
are logged, and an explicit ``chunk_tokens=`` always overrides this.

Attention layers (a hybrid's, or a plain transformer's) are not recurrent memory: they
keep every token of the chunk, so they never overflow within it, and they do not count
in N_S. What they change is a chunk state's size, which grows with the chunk (fixed
recurrent part + bytes per token x (|P| + chunk)): "auto" still picks the size from the
recurrent state and the training length, and the cache and batch budgets are planned
with the state's bytes at that size (``Backend.state_nbytes(tokens)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .lm import RecurrentLM

__all__ = ["AutoChunk", "auto_chunk_tokens", "state_size_millions", "forget_threshold_tokens"]

logger = logging.getLogger("oprm_rag")

SLOPE_K, INTERCEPT_K = 5.172, -4.469
DEFAULT_CHUNK = 2000
MIN_CHUNK = 64


@dataclass(frozen=True)
class AutoChunk:
    chunk_tokens: int
    reason: str
    state_millions: float
    forget_tokens: int | None
    train_tokens: int | None


def state_size_millions(lm: "RecurrentLM") -> float:
    """Recurrent memory floats per sequence, in millions.

    The law's N_S is the recurrent memory: Mamba's SSM state, RecurrentGemma's RG-LRU
    state, RWKV's WKV state. Convolution and token-shift buffers (a few past inputs) and
    RecurrentGemma's local-attention window are not memory of the text and do not count.
    """
    total = 0
    for name, t in lm.backend.empty_state(1).tensors.items():
        if name.startswith(("ssm.", "rglru.", "wkv.")):
            total += t.numel()
    return total / 1e6


def forget_threshold_tokens(state_millions: float) -> int | None:
    """The Stuffed-Mamba law in tokens, or None where it gives no positive length."""
    k = SLOPE_K * state_millions + INTERCEPT_K
    return int(round(k * 1000)) if k > 0 else None


def auto_chunk_tokens(lm: "RecurrentLM") -> AutoChunk:
    n_s = state_size_millions(lm)
    forget = forget_threshold_tokens(n_s) if lm.family == "mamba2" else None
    trained = lm.training_context_tokens
    train = None
    if trained is not None:  # leave room for the instruction and the question inside that length
        train = max(MIN_CHUNK, trained - min(64, trained // 8))
    if forget is not None and train is not None:
        size, why = min(forget, train), (f"forget-threshold law gives {forget} tokens for a {n_s:.2f}M-float "
                                         f"state; capped by the {trained}-token training length "
                                         f"({train} after room for the prompt)")
    elif forget is not None:
        size, why = forget, f"forget-threshold law gives {forget} tokens for a {n_s:.2f}M-float state"
    elif train is not None:
        law = ("the forget-threshold law is fitted on Mamba-2" if lm.family != "mamba2"
               else f"the law gives no positive length for a {n_s:.3f}M-float state")
        size, why = train, f"{law}; using the {trained}-token training length ({train} after room for the prompt)"
    else:
        size, why = DEFAULT_CHUNK, "no state law or training length known; using the paper's 2K default"
    size = max(MIN_CHUNK, int(size))
    logger.info("chunk_tokens='auto' -> %d (%s)", size, why)
    return AutoChunk(size, why, n_s, forget, trained)
