"""The one seam between the OPRM selector and a model.

The selector needs four things from a model, whatever runs it (in the spirit of
``rerankers``' ``BaseRanker``):

1. **start** from a prefix (the instruction P; memoised by the engine);
2. **extend** a batch of states by token rows (the chunks C_i, then the question Q);
3. the **first-answer-token distribution** of each row (entropy, top token, IDK mass);
4. **decode** an answer from a state.

Two engines implement it:

* :class:`oprm_rag.context.ModelContext`: a ``RecurrentLM`` in this process. States are
  exact, fixed-size recurrent states (``RecurrentState``), so they can be cached per
  document, handed off to a chat wrapper, and decoded from without a second prefill.
* :class:`oprm_rag.served.OpenAICompatibleLM`: a model behind an OpenAI-compatible
  server (vLLM, llama.cpp, SGLang, Ollama). Its "states" are token prefixes; extending
  is concatenation, the distribution comes from the server's top-k log-probabilities, and
  decoding is a streamed completion of the prompt.

What a state *is* stays inside the engine: the selector only selects, expands and
concatenates state batches through the methods below, and passes ``Extension.logits``
back to the same engine without looking inside (``question_logprobs`` serves the
question-likelihood criterion on engines that have full logits).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Literal, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .cache import DocumentStateCache
    from .decoding.config import Generation, GenerationConfig
    from .prompts import PromptTemplate

from .decoding.stream import BaseTextStream

__all__ = ["Engine", "Extension", "FirstTokens", "ChunkSize", "BaseTextStream", "LogitsWanted",
           "TokenCounting"]

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


class Engine(ABC):
    """What the selector needs from a model. See the module docstring for the contract.

    Subclasses set ``stores_states``: True when states are exact and of fixed size, so
    that question-independent chunk states can be cached (``document_cache``), prepared
    ahead of questions, handed off to a chat wrapper and decoded from directly.
    """

    #: States are exact and fixed-size: caching, ``prepare()`` and the handoff work.
    stores_states: ClassVar[bool] = False
    #: ``extend`` takes rows of different lengths in one call (else equal lengths only).
    supports_left_padding: bool = False
    #: How this engine's token counts were obtained.
    token_counting: TokenCounting = "exact"
    #: Every position's full next-token distribution is available (the question-likelihood
    #: criterion needs it); False where only top-k log-probabilities come back.
    full_logits: ClassVar[bool] = True

    # ------------------------------------------------------------------ identity
    @property
    @abstractmethod
    def name(self) -> str:
        """The model's name or path, as a user would recognise it."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """A stable hash of everything a state depends on (cache keys include it)."""

    @property
    @abstractmethod
    def prompt(self) -> "PromptTemplate":
        """The model's own OPRM prompt (its folder's ``oprm_prompt.json``, or a default)."""

    @property
    def position_limit(self) -> int | None:
        """The most tokens one sequence may hold (absolute positions), or None (recurrent)."""
        return None

    @abstractmethod
    def auto_chunk(self) -> ChunkSize:
        """The model's chunk length for ``chunk_tokens="auto"``: the capacity law where it
        applies, else the training length recorded with the model, else the paper's 2000."""

    @property
    def vocab_size(self) -> int | None:
        """Size of the output distribution, where known."""
        return None

    # ------------------------------------------------------------------ tokens
    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""

    @abstractmethod
    def encode_with_offsets(self, text: str) -> tuple["np.ndarray", "np.ndarray"]:
        """Token ids [n] and their char spans [n, 2] (int64 arrays), without special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens skipped)."""

    def encode_prefix(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of the instruction prefix, the start of a sequence: special tokens as
        the model expects them there (``chat``: the text is a rendered chat turn, which
        carries its own)."""
        return self.encode(text)

    @abstractmethod
    def idk_token_ids(self, idk_word: str) -> frozenset[int]:
        """Ids of the tokens an answer that is the IDK word can start with."""

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        """The model's chat template applied to ``messages`` (generation prompt added),
        or None where the model has none."""
        return None

    # ------------------------------------------------------------------ running
    @abstractmethod
    def start(self, prefix_ids: Sequence[int]) -> Extension:
        """Batch-1 state after ``prefix_ids`` (memoised), with last-position logits."""

    def has_prefix(self, prefix_ids: Sequence[int]) -> bool:
        """Whether ``start(prefix_ids)`` is already memoised (then it costs no tokens)."""
        return False

    @abstractmethod
    def extend(self, states: Any, rows: Sequence[Sequence[int]], *,
               logits: LogitsWanted = "last") -> Extension:
        """Run ``rows[i]`` from ``states`` row ``i`` (a batch-1 ``states`` is expanded).

        Never mutates ``states``. Rows may differ in length only where
        ``supports_left_padding``.
        """

    @abstractmethod
    def select_states(self, states: Any, rows: Sequence[int] | int) -> Any:
        """The rows ``rows`` of a state batch (an int keeps a batch of one)."""

    @abstractmethod
    def cat_states(self, states: Sequence[Any]) -> Any:
        """Stack state batches along the batch."""

    @abstractmethod
    def first_tokens(self, extension: Extension, idk_ids: frozenset[int]) -> FirstTokens:
        """Summaries of the next-token distribution after each row of ``extension``
        (which was made with ``logits="last"``)."""

    def row_logits(self, extension: Extension, row: int) -> Any:
        """The part of ``extension.logits`` that belongs to ``row`` (to decode from it)."""
        logits = extension.logits
        return None if logits is None else logits[row]

    def question_logprobs(self, chunk_end_logits: Any, question: Extension,
                          rows: Sequence[Sequence[int]]) -> list[float]:
        """log p(Q | P, C_i) per row for the question-likelihood criterion, from the logits
        after each chunk (``extend(..., logits="last")`` of the chunks, stacked) and the
        question pass made with ``logits="all"``.

        Engines that only see top-k log-probabilities cannot compute it and raise.
        """
        from .errors import OptionError

        raise OptionError(f"criterion='question_likelihood' needs the model's full logits; {self.name} "
                          "does not give them. Use criterion='entropy'.")

    @abstractmethod
    def stream(self, state: Any, logits: Any, config: "GenerationConfig", *,
               prompt_tokens: int = 0) -> BaseTextStream:
        """Decode one answer from a batch-1 state whose next-token scores are ``logits``
        (as ``row_logits`` gave them)."""

    @abstractmethod
    def generate_batch(self, states: Any, logits: Sequence[Any], config: "GenerationConfig",
                       prompt_tokens: Sequence[int] | None = None) -> list["Generation"]:
        """Decode one answer per row of ``states`` (rows stop independently); ``logits``
        holds each row's next-token scores, as ``row_logits`` gave them."""

    # ------------------------------------------------------------------ optional features
    def document_cache(self) -> "DocumentStateCache | None":
        """The per-model document state cache, where states can be stored (else None)."""
        return None

    def remember(self, ids: Sequence[int], state: Any, logits: Any, text: str | None = None) -> None:
        """Offer a just-scored state to the handoff (engines without states ignore it)."""

    @property
    def state_nbytes(self) -> int:
        """Bytes of one sequence's state (0 where states are not held in this process)."""
        return 0
