"""What a selection and an answer are: the one set of result types.

``Chunk`` (a slice of a document), ``ChunkScore`` (a chunk and what the model made of
it: it *holds* its ``Chunk``), ``SelectionResult``, ``Answer`` and a typed ``Usage``.
Every outside shape is a translation of these: the CLI's ``--json`` and the web API use
``to_dict()``; LangChain document metadata and LlamaIndex node metadata use
:meth:`ChunkScore.metadata`; LlamaIndex node scores and LangChain's ``relevance_score``
use :attr:`ChunkScore.relevance_score`.

``doc_index`` means one thing everywhere: the position of the chunk's document in the
list of documents the caller passed with the question.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import numpy as np

from .decoding.stream import BaseTextStream

if TYPE_CHECKING:  # pragma: no cover
    pass

__all__ = ["Chunk", "ChunkScore", "Usage", "SelectionResult", "Answer", "AnswerStream", "DropReason",
           "METADATA_KEYS", "join_chunk_texts"]

#: Why a scored chunk could not be selected (None: it could).
DropReason = Literal["idk", "idk_threshold", "entropy_threshold", "nonfinite"]


@dataclass(frozen=True, eq=False)
class Chunk:
    """A slice of one document: ``token_ids`` are ``document_ids[token_start:token_end]``
    and ``text`` is ``document[char_start:char_end]``. Both are views of the document
    (its token array, its text), taken when asked: chunking a long document copies no
    tokens and no text, so memory does not grow with the number of chunks."""

    doc_index: int
    index: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    source: str = field(repr=False)  # the whole document's text
    token_ids: np.ndarray = field(repr=False)

    @property
    def text(self) -> str:
        return self.source[self.char_start:self.char_end]

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def ids(self) -> list[int]:
        """The token ids as plain Python ints."""
        return self.token_ids.tolist()

    def at(self, doc_index: int) -> "Chunk":
        """This chunk as seen from a document list where its document sits at ``doc_index``."""
        return self if doc_index == self.doc_index else replace(self, doc_index=doc_index)


#: The keys :meth:`ChunkScore.metadata` writes (integrations hide them from prompts).
METADATA_KEYS: tuple[str, ...] = (
    "oprm_relevance", "oprm_entropy", "oprm_top_token", "oprm_is_idk", "oprm_rank", "oprm_doc_index",
    "oprm_chunk_index", "oprm_char_start", "oprm_char_end", "oprm_token_start", "oprm_token_end",
    "oprm_question_logprob", "oprm_chunk_tokens", "oprm_chunk_tokens_reason",
)


def _json_float(x: float | None) -> float | None:
    """JSON has no NaN or infinity: they become null."""
    return x if x is not None and math.isfinite(x) else None


@dataclass
class ChunkScore:
    """One scored chunk: where it is (``chunk``), what the model made of it, and why it
    was or was not selectable.

    ``relevance_score`` is what the selection ranked by, higher is better: the negative
    entropy (criterion ``"entropy"``) or the question's log-likelihood
    (``"question_likelihood"``).
    """

    chunk: Chunk
    entropy: float
    top_token_id: int
    top_token: str
    top_prob: float
    is_idk: bool
    idk_prob: float = 0.0
    finite: bool = True
    criterion: str = "entropy"
    question_logprob: float | None = None
    entropy_bounds: tuple[float, float] | None = None
    dropped_by: DropReason | None = None
    input_ids: list[int] | None = None
    selected: bool = False
    rank: int | None = None

    # where the chunk is (read through, never copied)
    @property
    def doc_index(self) -> int:
        return self.chunk.doc_index

    @property
    def index(self) -> int:
        return self.chunk.index

    @property
    def text(self) -> str:
        return self.chunk.text

    @property
    def char_start(self) -> int:
        return self.chunk.char_start

    @property
    def char_end(self) -> int:
        return self.chunk.char_end

    @property
    def token_start(self) -> int:
        return self.chunk.token_start

    @property
    def token_end(self) -> int:
        return self.chunk.token_end

    @property
    def eligible(self) -> bool:
        return self.dropped_by is None

    @property
    def relevance_score(self) -> float:
        """Higher is better: what the selection ranked by (``-inf`` for a non-finite chunk)."""
        if not self.finite:
            return -math.inf
        if self.criterion == "question_likelihood" and self.question_logprob is not None:
            return float(self.question_logprob)
        return -float(self.entropy)

    def to_dict(self, include_text: bool = True) -> dict[str, Any]:
        """JSON-safe: everything about the chunk and its score (NaN and infinity as null).

        ``include_text=False`` leaves the chunk's text out (a client that holds the
        document draws it from the char span)."""
        c = self.chunk
        out: dict[str, Any] = {
            "doc_index": c.doc_index, "index": c.index, "char_start": c.char_start, "char_end": c.char_end,
            "token_start": c.token_start, "token_end": c.token_end,
            "entropy": _json_float(self.entropy), "relevance_score": _json_float(self.relevance_score),
            "top_token_id": self.top_token_id, "top_token": self.top_token, "top_prob": _json_float(self.top_prob),
            "is_idk": self.is_idk, "idk_prob": _json_float(self.idk_prob), "finite": self.finite,
            "dropped_by": self.dropped_by, "question_logprob": _json_float(self.question_logprob),
            "selected": self.selected, "rank": self.rank,
        }
        if include_text:
            out["text"] = c.text
        if self.entropy_bounds is not None:
            out["entropy_bounds"] = [_json_float(b) for b in self.entropy_bounds]
        if self.input_ids is not None:
            out["input_ids"] = list(self.input_ids)
        return out

    def metadata(self, usage: "Usage | None" = None) -> dict[str, Any]:
        """The flat ``oprm_*`` keys that framework documents and nodes carry (``METADATA_KEYS``);
        with the selection's ``usage``, also the resolved chunk size and why."""
        c = self.chunk
        meta: dict[str, Any] = {
            "oprm_relevance": float(self.relevance_score), "oprm_entropy": float(self.entropy),
            "oprm_top_token": self.top_token, "oprm_is_idk": bool(self.is_idk),
            "oprm_rank": self.rank, "oprm_doc_index": int(c.doc_index), "oprm_chunk_index": int(c.index),
            "oprm_char_start": int(c.char_start), "oprm_char_end": int(c.char_end),
            "oprm_token_start": int(c.token_start), "oprm_token_end": int(c.token_end),
        }
        if self.question_logprob is not None:
            meta["oprm_question_logprob"] = float(self.question_logprob)
        if usage is not None:
            meta["oprm_chunk_tokens"] = usage.chunk_tokens
            meta["oprm_chunk_tokens_reason"] = usage.chunk_tokens_reason
        return meta


def join_chunk_texts(chunks: Sequence[Any]) -> str:
    """Chunks' text in document order: adjacent chunks of one document run on, others
    are separated by a blank line. The one way text is re-joined (``top_k`` > 1, the
    integrations' prompts, tools). Takes ``Chunk``/``ChunkScore`` objects or anything
    with ``doc_index``, ``char_start``, ``char_end`` and ``text``."""
    ordered = sorted(chunks, key=lambda c: (c.doc_index, c.char_start))
    out = ""
    prev: Any = None
    for c in ordered:
        adjacent = prev is not None and c.doc_index == prev.doc_index and c.char_start == prev.char_end
        out += ("" if prev is None or adjacent else "\n\n") + c.text
        prev = c
    return out


@dataclass
class Usage:
    """Token counts and the chunking behind one selection or answer.

    ``input_tokens``: tokens the model ran for this question in this call (cached
    chunk states and the memoised instruction cost nothing); ``nominal_input_tokens``:
    the tokens of all its ``[P, C_i, Q]`` inputs (what plain OPRM would run).
    """

    input_tokens: int = 0
    nominal_input_tokens: int = 0
    output_tokens: int = 0
    chunks: int = 0
    cached_chunks: int = 0
    chunk_tokens: int | None = None
    chunk_tokens_reason: str = ""
    token_counting: str = "exact"
    entropy_exact: bool = True

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "nominal_input_tokens": self.nominal_input_tokens,
                "output_tokens": self.output_tokens, "total_tokens": self.total_tokens, "chunks": self.chunks,
                "cached_chunks": self.cached_chunks, "chunk_tokens": self.chunk_tokens,
                "chunk_tokens_reason": self.chunk_tokens_reason, "token_counting": self.token_counting,
                "entropy_exact": self.entropy_exact}


def _no_answer_reason(chunks: Sequence[ChunkScore]) -> str:
    counts: dict[str, int] = {}
    for c in chunks:
        if c.dropped_by is not None:
            counts[c.dropped_by] = counts.get(c.dropped_by, 0) + 1
    words = {"idk": "answered the IDK word", "idk_threshold": "were above the IDK-probability threshold",
             "entropy_threshold": "were above the entropy threshold", "nonfinite": "had non-finite scores"}
    return "; ".join(f"{n} {words[k]}" for k, n in counts.items()) or "no chunk was scored"


def _chunk_dict(score: ChunkScore | None, sources: Sequence[str] | None, include_text: bool) -> dict[str, Any] | None:
    if score is None:
        return None
    d = score.to_dict(include_text)
    if sources is not None:
        d["source"] = sources[score.doc_index]
    return d


@dataclass
class SelectionResult:
    """Every chunk scored (document order) and the chunks chosen (best first).

    ``best`` is None when no chunk could be selected and no fallback was asked;
    ``no_answer_reason`` then says why (every chunk said IDK, a threshold removed them,
    non-finite scores). ``all_idk`` is True only when every chunk answered the IDK word.
    """

    question: str
    chunks: list[ChunkScore]
    selected: list[ChunkScore]
    all_idk: bool
    idk_word: str
    usage: Usage
    fallback_used: bool = False
    _decode: Any = field(default=None, repr=False)  # the engine's handles to answer from (selector-private)

    @property
    def best(self) -> ChunkScore | None:
        return self.selected[0] if self.selected else None

    @property
    def no_answer_reason(self) -> str | None:
        """Why nothing was selected (None when something was)."""
        return None if self.selected and not self.fallback_used else _no_answer_reason(self.chunks)

    def to_dict(self, sources: Sequence[str] | None = None, include_text: bool = True) -> dict[str, Any]:
        """JSON-safe; ``sources`` (one name per document) adds each chunk's ``source``."""
        return {"question": self.question, "all_idk": self.all_idk, "idk_word": self.idk_word,
                "no_answer_reason": self.no_answer_reason, "fallback_used": self.fallback_used,
                "usage": self.usage.to_dict(),
                "winner": _chunk_dict(self.best, sources, include_text),
                "chunks": [_chunk_dict(c, sources, include_text) for c in self.chunks]}


@dataclass
class Answer:
    """The answer, the chunk it came from, every chunk's score, and the usage.

    ``parts`` (summary mode) holds one decoded part per chunk in document order.
    """

    text: str
    chunk: ChunkScore | None
    chunks: list[ChunkScore]
    selected: list[ChunkScore]
    usage: Usage
    finish_reason: str
    all_idk: bool = False
    no_answer_reason: str | None = None
    input_ids: list[int] | None = None
    parts: list[str] | None = None

    def __str__(self) -> str:
        return self.text

    def to_dict(self, sources: Sequence[str] | None = None, include_text: bool = True) -> dict[str, Any]:
        """JSON-safe; ``sources`` (one name per document) adds each chunk's ``source``."""
        out: dict[str, Any] = {
            "answer": self.text, "finish_reason": self.finish_reason, "all_idk": self.all_idk,
            "no_answer_reason": self.no_answer_reason, "usage": self.usage.to_dict(),
            "winner": _chunk_dict(self.chunk, sources, include_text),
            "chunks": [_chunk_dict(c, sources, include_text) for c in self.chunks],
        }
        if self.parts is not None:
            out["parts"] = list(self.parts)
        if self.input_ids is not None:
            out["input_ids"] = list(self.input_ids)
        return out


class AnswerStream(BaseTextStream):
    """Iterate for text pieces; ``answer`` is complete once iteration ends.

    ``selection`` (every chunk's score, the winner) is available before the first piece
    for answers; summaries fill it in as the parts are decoded. ``close()`` stops decoding
    early (the rest of the answer is not computed).
    """

    def __init__(self, make: Callable[["AnswerStream"], Iterator[str]],
                 selection: SelectionResult | None = None) -> None:
        self.answer: Answer | None = None
        self.selection: SelectionResult | None = selection
        self._make = make

    def _pieces(self) -> Iterator[str]:
        return self._make(self)

    def _final_text(self) -> str:
        assert self.answer is not None
        return self.answer.text
