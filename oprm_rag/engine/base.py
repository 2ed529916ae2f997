"""The one seam between the OPRM selector and a model: a small required protocol and
optional capabilities.

Every engine, whatever runs the model, does four things (in the spirit of ``rerankers``'
``BaseRanker``), which are its six abstract methods:

1. **describe itself** (``describe``: name, identity, prompt, vocabulary, limits, the
   ``"auto"`` chunk length, how tokens were counted);
2. **tokenise with offsets** (``encode_with_offsets``, ``decode``);
3. **score a batch of rows** (``extend`` a batch of states by token rows, from nothing or
   from states it made; ``first_tokens``: the first-answer-token distribution per row);
4. **decode a stream** (``stream`` one answer from a state).

Everything else has a default here that an engine may override for speed. What an engine
can do beyond that is a capability, asked with ``isinstance``, never a flag:

* :class:`StatefulEngine`: states are exact, fixed-size and held in this process, so chunk
  states can be cached per document, prepared ahead of questions, handed off to a chat
  wrapper and decoded from directly (the in-process engine over an exact backend);
* :class:`QuestionLikelihood`: every position's full logits, for the paper's
  question-likelihood criterion (in-process engines; a server returns only top-k).

Two engine families implement it: :mod:`oprm_rag.engine.local` (a ``RecurrentLM`` in this
process) and :mod:`oprm_rag.served` (a model behind an OpenAI-compatible server, whose
"states" are token prefixes). What a state *is* stays inside the engine: callers select,
expand and concatenate state batches through the methods below and pass
``Extension.logits`` back to the same engine without looking inside.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Sequence

from ..decoding.stream import BaseTextStream
from .types import ChunkSize, EngineInfo, Extension, FirstTokens, LogitsWanted, TokenCounting

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..decoding.config import Generation, GenerationConfig
    from ..prompts import PromptTemplate
    from ..storage.cache import DocumentStateCache

__all__ = ["Engine", "EngineInfo", "StatefulEngine", "QuestionLikelihood", "Extension", "FirstTokens", "ChunkSize",
           "LogitsWanted", "TokenCounting"]

class Engine(ABC):
    """What the selector needs from a model. See the module docstring for the contract."""

    # ------------------------------------------------------------------ required
    @abstractmethod
    def describe(self) -> EngineInfo:
        """The engine's facts, as of now (a served engine learns some on first use)."""

    @abstractmethod
    def encode_with_offsets(self, text: str) -> tuple["np.ndarray", "np.ndarray"]:
        """Token ids [n] and their char spans [n, 2] (int64 arrays), without special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens skipped)."""

    @abstractmethod
    def extend(self, states: Any, rows: Sequence[Sequence[int]], *,
               logits: LogitsWanted = "last") -> Extension:
        """Run ``rows[i]`` from ``states`` row ``i`` (a batch-1 ``states`` is expanded;
        ``None``: from the empty state, as a sequence starts).

        Never mutates ``states``. Rows may differ in length only where ``describe().can_pad``.
        """

    @abstractmethod
    def first_tokens(self, extension: Extension, idk_ids: frozenset[int]) -> FirstTokens:
        """Summaries of the next-token distribution after each row of ``extension``
        (which was made with ``logits="last"``)."""

    @abstractmethod
    def stream(self, state: Any, logits: Any, config: "GenerationConfig", *,
               prompt_tokens: int = 0) -> BaseTextStream:
        """Decode one answer from a batch-1 state whose next-token scores are ``logits``
        (as ``row_logits`` gave them)."""

    # ------------------------------------------------------------------ facts (from describe)
    @property
    def name(self) -> str:
        """The model's name or path, as a user would recognise it."""
        return self.describe().name

    @property
    def identity(self) -> str:
        """A stable hash of everything a state depends on (cache keys include it)."""
        return self.describe().identity

    @property
    def prompt(self) -> "PromptTemplate":
        """The model's own OPRM prompt (its folder's ``oprm_prompt.json``, or a default)."""
        return self.describe().prompt

    # ------------------------------------------------------------------ defaults
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return [int(i) for i in self.encode_with_offsets(text)[0]]

    def encode_prefix(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of the instruction prefix, the start of a sequence: special tokens as
        the model expects them there (``chat``: the text is a rendered chat turn, which
        carries its own)."""
        return self.encode(text)

    def idk_token_ids(self, idk_word: str) -> frozenset[int]:
        """Ids of the tokens an answer that is the IDK word can start with."""
        from ..idk import idk_token_ids

        return idk_token_ids(_EncoderView(self), idk_word)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        """The model's chat template applied to ``messages`` (generation prompt added),
        or None where the model has none."""
        return None

    def start(self, prefix_ids: Sequence[int]) -> Extension:
        """Batch-1 state after ``prefix_ids`` with last-position logits (an engine may memoise it)."""
        return self.extend(None, [prefix_ids], logits="last")

    def select_states(self, states: Any, rows: Sequence[int] | int) -> Any:
        """The rows ``rows`` of a state batch (an int keeps a batch of one)."""
        return states.select(rows)

    def cat_states(self, states: Sequence[Any]) -> Any:
        """Stack state batches along the batch."""
        return type(states[0]).cat(list(states))

    def row_logits(self, extension: Extension, row: int) -> Any:
        """The part of ``extension.logits`` that belongs to ``row`` (to decode from it)."""
        logits = extension.logits
        return None if logits is None else logits[row]

    def generate_batch(self, states: Any, logits: Sequence[Any], config: "GenerationConfig",
                       prompt_tokens: Sequence[int] | None = None) -> list["Generation"]:
        """Decode one answer per row of ``states`` (rows stop independently); ``logits``
        holds each row's next-token scores, as ``row_logits`` gave them. By default one
        stream after another; an engine that decodes rows together overrides it."""
        out = []
        for i, row_logits in enumerate(logits):
            stream = self.stream(self.select_states(states, i), row_logits, config,
                                 prompt_tokens=int(prompt_tokens[i]) if prompt_tokens is not None else 0)
            stream.text()
            out.append(stream.result)
        return out


class StatefulEngine(ABC):
    """Capability: exact, fixed-size states held in this process.

    Question-independent chunk states can then be cached per document (``document_cache``),
    prepared ahead of questions, handed off to a chat wrapper (``remember``) and decoded
    from directly. Asked as ``isinstance(engine, StatefulEngine)``.
    """

    @abstractmethod
    def document_cache(self) -> "DocumentStateCache":
        """The per-model document state cache (made on first use)."""

    @abstractmethod
    def remember(self, ids: Sequence[int], state: Any, logits: Any, text: str | None = None) -> None:
        """Offer a just-scored state to the handoff."""

    @abstractmethod
    def has_prefix(self, prefix_ids: Sequence[int]) -> bool:
        """Whether ``start(prefix_ids)`` is already memoised (then it costs no tokens)."""

    @property
    @abstractmethod
    def state_nbytes(self) -> int:
        """Bytes of one sequence's state."""

    def state_nbytes_at(self, tokens: int) -> int:
        """Bytes of one sequence's state after ``tokens`` tokens: ``state_nbytes`` for fixed-size
        states, more where states hold attention keys (a transformer, a hybrid), which grow."""
        return self.state_nbytes


class QuestionLikelihood(ABC):
    """Capability: every position's full next-token distribution, for the
    question-likelihood criterion (``criterion="question_likelihood"``)."""

    @abstractmethod
    def question_logprobs(self, chunk_end_logits: Any, question: Extension,
                          rows: Sequence[Sequence[int]]) -> list[float]:
        """log p(Q | P, C_i) per row, from the logits after each chunk (``extend(...,
        logits="last")`` of the chunks, stacked) and the question pass made with
        ``logits="all"``."""


class _EncoderView:
    """An engine seen through the two tokenizer calls ``scoring.idk_token_ids`` makes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self._engine.encode(text)}

    def decode(self, ids: Sequence[int]) -> str:
        return self._engine.decode(ids)
