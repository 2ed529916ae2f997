"""The values that cross the engine seam: what an engine says about itself, a batch of
states after some tokens, the first-answer-token summaries, a resolved chunk length.

They live apart from the protocol (:mod:`.base`) so that the modules computing them
(``scoring``, ``options``, the served entropy) need not import the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    from ..prompts import PromptTemplate

__all__ = ["ChunkSize", "EngineInfo", "Extension", "FirstTokens", "LogitsWanted", "TokenCounting"]

#: What ``extend`` must return besides the states: nothing (a lazy engine may then skip the
#: model entirely), the next-token scores after each row's last token, or after every token.
LogitsWanted = Literal["none", "last", "all"]

#: How token counts were obtained: the model's own tokenizer ("exact"), the server's
#: ``/tokenize`` endpoint ("server"), or an approximate counter ("approximate", tiktoken).
TokenCounting = Literal["exact", "server", "approximate"]


@dataclass(frozen=True)
class ChunkSize:
    """A resolved chunk length and why it was chosen (reported in every result's usage).

    ``tokens`` is None for plain (whole-document) inference.
    """

    tokens: int | None
    reason: str


@dataclass
class Extension:
    """A batch of states after some tokens, and what the engine returned with them.

    ``logits`` is engine-specific and is handed back to the same engine (``first_tokens``,
    ``stream``): float32 tensors [b, v] / [b, t, v] in process, top-k log-probabilities
    from a server. None when ``logits="none"`` was asked. ``pads`` is whatever the engine
    needs to remember about how it batched the rows (left padding in process).
    """

    states: Any
    logits: Any = None
    pads: Any = None


@dataclass
class FirstTokens:
    """The first-answer-token distribution of each row of an extension, summarised.

    ``entropy`` is in nats. Where the engine saw only the top-k of the distribution
    (``exact`` False), ``entropy`` is an estimate and ``entropy_bounds`` holds a
    (low, high) interval that the true entropy lies in, from the missing mass.
    ``finite`` is False for a row whose scores held NaN or infinity: such a row has no
    meaningful entropy (its ``entropy`` is NaN) and must never be selected.
    ``idk_prob`` is the probability of the IDK word's first tokens.
    """

    entropy: list[float]
    top_id: list[int]
    top_prob: list[float]
    idk_prob: list[float]
    finite: list[bool]
    exact: bool = True
    entropy_bounds: list[tuple[float, float]] | None = None

    def __len__(self) -> int:
        return len(self.entropy)

    def row_bounds(self, row: int) -> tuple[float, float]:
        """(low, high) for one row: the entropy itself when exact."""
        if self.entropy_bounds is None:
            return self.entropy[row], self.entropy[row]
        return self.entropy_bounds[row]


@dataclass(frozen=True)
class EngineInfo:
    """What an engine says about itself (``Engine.describe()``).

    ``auto_chunk`` is the model's chunk length for ``chunk_tokens="auto"``: the capacity
    law where it applies, else the training length recorded with the model, else the
    paper's 2000. ``can_pad``: ``extend`` takes rows of different lengths in one call
    (else equal lengths only). ``position_limit``: the most tokens one sequence may hold
    (absolute positions), None for a recurrent model. ``family``: the model family that
    runs in this process (``"mamba2"``, ``"replay"``...), or ``"served"``.
    """

    name: str
    identity: str
    prompt: "PromptTemplate"
    auto_chunk: ChunkSize
    vocab_size: int | None = None
    position_limit: int | None = None
    token_counting: TokenCounting = "exact"
    can_pad: bool = False
    family: str = "served"
