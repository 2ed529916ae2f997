"""``OPRMSelector``: speculative prefill, entropy scoring, IDK filter, selective decoding.

For a question Q and documents cut into chunks C_1..C_N::

    S_P      = state after the instruction P                      (computed once)
    S_i      = state after [P, C_i]      from S_P                 (question-independent: cached)
    p_i, T_i = first-answer distribution and state after [P, C_i, Q] from S_i
    H_i      = entropy(p_i); drop i if argmax p_i starts the IDK word
    answer   = decode from T_{argmin H}                           (no second prefill)

Work streams over chunk batches bounded by ``max_batch_tokens`` and keeps only the
states that can still win (the best ``top_k``), so memory depends on batch and state
size, not on document length. Several questions share model batches (``select_many``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .cache import Claim, DocStates, DocumentStateCache, cache_key
from .chunking import Boundary, Chunk, DocumentTokens, chunk_document
from .generation import Generation, GenerationConfig
from .lm import RecurrentLM, TokenStream
from .prompts import PromptTemplate
from .scoring import (CandidatePool, ChunkScore, Criterion, Fallback, first_token_stats, idk_token_ids,
                      question_logprob)
from .state import RecurrentState

__all__ = ["OPRMSelector", "SelectionResult", "Answer", "AnswerStream"]

logger = logging.getLogger("oprm_rag")

_UNSET: Any = object()


@dataclass
class _Candidate:
    """A chunk that can still win, with the states needed to answer from it."""

    score: ChunkScore
    chunk: Chunk
    after_question: RecurrentState  # state after [P, C_i, Q]
    first_logits: torch.Tensor  # [v]
    after_chunk: RecurrentState  # state after [P, C_i]


@dataclass
class SelectionResult:
    """Every chunk scored (document order) and the chunks chosen.

    ``best`` is None when every chunk said IDK (``all_idk``) and no fallback was asked.
    """

    question: str
    chunks: list[ChunkScore]
    selected: list[ChunkScore]
    all_idk: bool
    idk_word: str
    usage: dict[str, int]
    _candidates: list[_Candidate] = field(default_factory=list, repr=False)
    _question_ids: list[int] = field(default_factory=list, repr=False)
    _prefix_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def best(self) -> ChunkScore | None:
        return self.selected[0] if self.selected else None

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "all_idk": self.all_idk, "usage": self.usage,
                "best": self.best.to_dict() if self.best else None,
                "chunks": [c.to_dict() for c in self.chunks]}


@dataclass
class Answer:
    """The answer, the chunk it came from, every chunk's score, and token counts."""

    text: str
    chunk: ChunkScore | None
    chunks: list[ChunkScore]
    selected: list[ChunkScore]
    usage: dict[str, int]
    finish_reason: str
    all_idk: bool = False
    input_ids: list[int] | None = None
    parts: list[str] | None = None  # summary mode: one part per chunk, document order

    def __str__(self) -> str:
        return self.text


class AnswerStream:
    """Iterate for text pieces; ``answer`` is complete once iteration ends.

    ``selection`` (every chunk's score, the winner) is available before the first piece.
    """

    def __init__(self, make: Callable[["AnswerStream"], Iterator[str]],
                 selection: SelectionResult | None = None) -> None:
        self.answer: Answer | None = None
        self.selection: SelectionResult | None = selection
        self._iter = make(self)

    def __iter__(self) -> Iterator[str]:
        return self._iter

    def text(self) -> str:
        for _ in self:
            pass
        assert self.answer is not None
        return self.answer.text


@dataclass
class _Question:
    text: str
    ids: list[int]
    doc_uids: list[int]
    pool: CandidatePool
    scores: list[ChunkScore] = field(default_factory=list)
    tokens: int = 0  # tokens the model actually ran for this question in this call
    nominal: int = 0  # tokens of all its [P, C_i, Q] inputs (plain OPRM's cost)
    cached_chunks: int = 0


@dataclass
class _Doc:
    uid: int
    tokens: DocumentTokens
    chunks: list[Chunk]
    key: str | None = None
    claim: Claim | None = None
    cached: DocStates | None = None
    collected: dict[int, tuple[RecurrentState, torch.Tensor | None]] = field(default_factory=dict)


class OPRMSelector:
    """Retriever-free, model-scored context selection over one shared ``RecurrentLM``.

    Args:
        lm: the shared model (``RecurrentLM``), or a path / hub name to load once.
        chunk_tokens: chunk length in model tokens; ``None`` = whole documents (plain
            inference); ``"auto"`` = from the model's state capacity (see ``capacity.py``).
        chunk_overlap: tokens repeated from the previous chunk.
        boundary: prefer ending chunks at a ``"paragraph"`` or ``"sentence"`` end within
            ``boundary_tolerance`` of the chunk length.
        top_k: how many chunks to select (re-joined in document order to answer).
        entropy_threshold: also drop chunks whose entropy is above this.
        criterion: ``"entropy"`` (lowest wins) or ``"question_likelihood"`` (the paper's
            other criterion: highest log p(Q | P, C_i) wins).
        idk_filter: drop chunks whose top first token starts the IDK word.
        idk_word: the IDK word (default: the prompt template's, "Error").
        fallback: ``"min_entropy"`` picks the lowest-entropy chunk when all say IDK.
        max_batch_tokens: rows x tokens per model call.
        cache: a ``DocumentStateCache``; True (default) uses the model's shared in-memory
            cache (``lm.document_cache()``); False turns caching off.
        prompt: a ``PromptTemplate`` (default: the model's own, see ``prompts.py``).
    """

    def __init__(
        self,
        lm: RecurrentLM | str,
        chunk_tokens: int | str | None = 2000,
        *,
        chunk_overlap: int = 0,
        boundary: Boundary | None = None,
        boundary_tolerance: float = 0.15,
        top_k: int = 1,
        entropy_threshold: float | None = None,
        criterion: Criterion = "entropy",
        idk_filter: bool = True,
        idk_word: str | None = None,
        fallback: Fallback = None,
        max_batch_tokens: int = 16384,
        cache: DocumentStateCache | bool | None = True,
        prompt: PromptTemplate | None = None,
        show_progress: bool = False,
    ) -> None:
        if not isinstance(lm, RecurrentLM):
            from .registry import resolve_lm

            lm = resolve_lm(lm)  # a path: the process-wide shared model
        self.lm = lm
        self.prompt = prompt or lm.prompt
        if idk_word is not None:
            self.prompt = self.prompt.with_idk_word(idk_word)
        self.chunk_overlap = int(chunk_overlap)
        self.boundary = boundary
        self.boundary_tolerance = float(boundary_tolerance)
        self.top_k = int(top_k)
        self.entropy_threshold = entropy_threshold
        self.criterion = criterion
        self.idk_filter = bool(idk_filter)
        self.fallback = fallback
        self.max_batch_tokens = int(max_batch_tokens)
        self.show_progress = show_progress
        self._validate_options()
        self.chunk_tokens = self._resolve_chunk_tokens(chunk_tokens)
        if cache is True or cache is None:
            cache = lm.document_cache()  # the model's shared cache: follow-ups hit across selectors
        self.cache: DocumentStateCache | None = cache if isinstance(cache, DocumentStateCache) else None
        self._idk_ids = idk_token_ids(lm.tokenizer, self.prompt.idk_word)

    # ------------------------------------------------------------------ options
    def _validate_options(self) -> None:
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.criterion not in ("entropy", "question_likelihood"):
            raise ValueError("criterion must be 'entropy' or 'question_likelihood'")
        if self.fallback not in (None, "min_entropy"):
            raise ValueError("fallback must be None or 'min_entropy'")
        if self.boundary not in (None, "paragraph", "sentence"):
            raise ValueError("boundary must be None, 'paragraph' or 'sentence'")
        if self.max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1")
        if self.chunk_overlap < 0:
            raise ValueError("chunk_overlap must be >= 0")

    def _resolve_chunk_tokens(self, chunk_tokens: int | str | None) -> int | None:
        if chunk_tokens == "auto":
            from .capacity import auto_chunk_tokens

            return auto_chunk_tokens(self.lm).chunk_tokens
        if chunk_tokens is None:
            return None
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int):
            raise TypeError(f"chunk_tokens must be an int, None or 'auto', got {chunk_tokens!r}")
        if chunk_tokens < 8:
            raise ValueError(f"chunk_tokens={chunk_tokens} is too small; use at least 8 tokens")
        limit = self._position_limit()
        if limit is not None and chunk_tokens >= limit:
            raise ValueError(f"chunk_tokens={chunk_tokens} does not fit this model's {limit} positions; "
                             f"use a smaller chunk_tokens")
        if chunk_tokens <= self.chunk_overlap:
            raise ValueError("chunk_overlap must be smaller than chunk_tokens")
        return chunk_tokens

    def _position_limit(self) -> int | None:
        """Hard position limits exist only for non-recurrent models (absolute positions)."""
        if self.lm.backend.exact_continuation:
            return None
        value = getattr(self.lm.model.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    @property
    def chunking(self) -> dict[str, Any]:
        """Everything about chunking that a cached chunk state depends on."""
        return {"chunk_tokens": self.chunk_tokens, "overlap": self.chunk_overlap,
                "boundary": self.boundary, "tolerance": self.boundary_tolerance}

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _as_documents(documents: Any) -> list[str]:
        if isinstance(documents, str):
            documents = [documents]
        if documents is None or not isinstance(documents, (list, tuple)):
            raise TypeError("documents must be a string or a list of strings")
        if not documents:
            raise ValueError("no documents were given: pass at least one non-empty text")
        out = []
        for i, d in enumerate(documents):
            if not isinstance(d, str):
                raise TypeError(f"document {i} is {type(d).__name__}, not str; pass the text itself")
            if not d.strip():
                raise ValueError(f"document {i} is empty or only whitespace")
            out.append(d)
        return out

    @staticmethod
    def _check_question(question: Any) -> str:
        if not isinstance(question, str):
            raise TypeError(f"the question must be a string, got {type(question).__name__}")
        if not question.strip():
            raise ValueError("the question is empty")
        return question

    def prompt_text(self, question: str, chunk_text: str) -> str:
        """The exact text of ``[P, C, Q]``: what a chat model or LLM must receive for the handoff."""
        p, q = self.prompt.split(question, self.lm.tokenizer)
        return p + chunk_text + q

    def _prefix_ids(self) -> list[int]:
        p = self.prompt.prefix(self.lm.tokenizer)
        return self.lm.encode(p, add_special_tokens=not self.prompt.use_chat_template)

    def _question_ids(self, question: str) -> list[int]:
        own = len(self.lm.encode(question))
        if self.chunk_tokens is not None and own >= self.chunk_tokens:
            raise ValueError(f"the question takes {own} tokens, as many as a chunk ({self.chunk_tokens}); "
                             "shorten the question or raise chunk_tokens")
        return self.lm.encode(self.prompt.split(question, self.lm.tokenizer)[1])

    def _tokenize(self, text: str, uid: int) -> _Doc:
        ids, offsets = self.lm.encode_with_offsets(text)
        if not len(ids):
            raise ValueError(f"document {uid} has no tokens")
        toks = DocumentTokens(text, ids, offsets)
        chunks = chunk_document(toks, uid, self.chunk_tokens, self.chunk_overlap, self.boundary,
                                self.boundary_tolerance)
        return _Doc(uid, toks, chunks)

    # ------------------------------------------------------------------ public API
    def select(self, question: str, documents: str | Sequence[str], *, return_inputs: bool = False) -> SelectionResult:
        """Score every chunk of ``documents`` for ``question`` and choose."""
        return self.select_many([(question, documents)], return_inputs=return_inputs)[0]

    def select_many(self, items: Sequence[tuple[str, str | Sequence[str]]], *,
                    return_inputs: bool = False) -> list[SelectionResult]:
        """Several (question, documents) pairs in shared model batches; documents
        shared between questions are chunked and prefilled once."""
        if not items:
            return []
        texts: dict[str, int] = {}
        docs: list[_Doc] = []
        questions: list[_Question] = []
        for question, documents in items:
            self._check_question(question)
            uids = []
            for text in self._as_documents(documents):
                if text not in texts:
                    texts[text] = len(docs)
                    docs.append(self._tokenize(text, len(docs)))
                uids.append(texts[text])
            ids = self._question_ids(question)
            questions.append(_Question(question, ids, uids, CandidatePool(self.top_k, self.fallback is not None)))
        prefix_ids = self._prefix_ids()
        for _ in self._run(prefix_ids, docs, questions, return_inputs):
            pass
        return [self._finish(q, docs, prefix_ids) for q in questions]

    def prepare(self, documents: str | Sequence[str]) -> int:
        """Compute and cache the chunk states of ``documents`` ahead of questions.

        Returns the number of chunks now cached. Needs a cache and an exact backend.
        """
        if self.cache is None or not self.lm.backend.exact_continuation:
            raise RuntimeError("prepare() needs a DocumentStateCache and a model with exact state continuation")
        docs = [self._tokenize(t, i) for i, t in enumerate(self._as_documents(documents))]
        prefix_ids = self._prefix_ids()
        for _ in self._run(prefix_ids, docs, [], False):
            pass
        return sum(len(d.chunks) for d in docs)

    def answer(self, question: str, documents: str | Sequence[str], *, max_new_tokens: int = 64,
               return_inputs: bool = False, **generation: Any) -> Answer:
        """Select, then decode the answer from the winning chunk's stored state."""
        stream = self.stream(question, documents, max_new_tokens=max_new_tokens,
                             return_inputs=return_inputs, **generation)
        stream.text()
        assert stream.answer is not None
        return stream.answer

    def stream(self, question: str, documents: str | Sequence[str], *, max_new_tokens: int = 64,
               return_inputs: bool = False, **generation: Any) -> AnswerStream:
        """Like :meth:`answer`, as an iterator of text pieces (``.answer`` at the end)."""
        result = self.select(question, documents, return_inputs=return_inputs)
        return self.stream_from(result, max_new_tokens=max_new_tokens, return_inputs=return_inputs, **generation)

    def stream_from(self, result: SelectionResult, *, max_new_tokens: int = 64, return_inputs: bool = False,
                    **generation: Any) -> AnswerStream:
        """Stream the answer from a selection you already hold (no re-scoring, no prefill)."""
        cfg = GenerationConfig.make(max_new_tokens=max_new_tokens, **generation)
        return AnswerStream(lambda h: self._answer_from(result, cfg, h, return_inputs), selection=result)

    def answer_from(self, result: SelectionResult, *, max_new_tokens: int = 64, **generation: Any) -> Answer:
        """Decode from a selection you already hold (no re-scoring)."""
        holder = self.stream_from(result, max_new_tokens=max_new_tokens, **generation)
        holder.text()
        assert holder.answer is not None
        return holder.answer

    def summarize(self, documents: str | Sequence[str], question: str | None = None, *,
                  max_new_tokens: int = 96, **generation: Any) -> Answer:
        """The paper's summary mode: decode from every chunk, join the parts in document order."""
        stream = self.stream_summary(documents, question, max_new_tokens=max_new_tokens, **generation)
        stream.text()
        assert stream.answer is not None
        return stream.answer

    def stream_summary(self, documents: str | Sequence[str], question: str | None = None, *,
                       max_new_tokens: int = 96, **generation: Any) -> AnswerStream:
        cfg = GenerationConfig.make(max_new_tokens=max_new_tokens, **generation)
        q = question or self.prompt.summary_question

        def run(holder: AnswerStream) -> Iterator[str]:
            yield from self._summarize(q, documents, cfg, holder)

        return AnswerStream(run)

    # ------------------------------------------------------------------ the pipeline
    def _run(self, prefix_ids: list[int], docs: list[_Doc], questions: list[_Question],
             return_inputs: bool, ordered: bool = False) -> Iterator[list[tuple]]:
        """Stream over chunk batches; yields each batch's (question, score, state after Q,
        first-answer logits) events. Consume it fully for the side effects on ``questions``."""
        lm = self.lm
        prefix_known = lm.has_prefix_state(prefix_ids)
        prefix = lm.prefix_state(prefix_ids)
        exact = lm.backend.exact_continuation
        need_logits = self.criterion == "question_likelihood"
        # uid -> (question, position of that document in the question's list); a text given
        # twice is prefilled once but reported at both positions.
        questions_of: dict[int, list[tuple[_Question, int]]] = {}
        for q in questions:
            for pos, uid in enumerate(q.doc_uids):
                questions_of.setdefault(uid, []).append((q, pos))
        for q in questions:
            q.tokens += 0 if prefix_known else len(prefix_ids)

        progress = self._progress(sum(len(d.chunks) for d in docs))
        try:
            self._claim(docs, prefix_ids)  # inside: a failure part-way abandons what was claimed
            pending = [d for d in docs if d.claim is not None and d.claim.status == "wait"]
            ready = [d for d in docs if d not in pending]
            yield from self._process(ready, prefix, prefix_ids, questions_of, return_inputs, need_logits, exact,
                                     progress, ordered)
            for d in pending:  # another thread was computing these: take its result, or compute
                assert d.claim is not None and self.cache is not None
                d.claim = self.cache.wait(d.claim, lm.identity)
                d.cached = d.claim.entry
                yield from self._process([d], prefix, prefix_ids, questions_of, return_inputs, need_logits, exact,
                                         progress, ordered)
        except BaseException:
            for d in docs:
                if d.claim is not None and d.claim.status == "own" and self.cache is not None:
                    self.cache.abandon(d.claim.key)
            raise
        finally:
            if progress is not None:
                progress.close()

    def _claim(self, docs: list[_Doc], prefix_ids: list[int]) -> None:
        if self.cache is None or not self.lm.backend.exact_continuation:
            return
        per_chunk = self.lm.state_nbytes + 4 * self._vocab_size()
        for d in docs:
            if not self.cache.fits(per_chunk * len(d.chunks)):
                continue  # too big to keep: stream it, memory stays bounded
            d.key = cache_key(self.lm.identity, prefix_ids, self.chunking, d.tokens.token_ids)
            d.claim = self.cache.claim(d.key, self.lm.identity)
            if d.claim.status == "hit":
                assert d.claim.entry is not None
                if [tuple(s) for s in d.claim.entry.spans] != [(c.token_start, c.token_end) for c in d.chunks]:
                    logger.warning("cached chunk spans differ from this chunking; recomputing")
                    d.claim = Claim("own", d.key)
                else:
                    d.cached = d.claim.entry

    def _vocab_size(self) -> int:
        head = self.lm.model.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else int(self.lm.model.config.vocab_size)

    def _progress(self, total: int):
        if not self.show_progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="OPRM scoring", unit="chunk", leave=False)

    def _process(self, docs, prefix, prefix_ids, questions_of, return_inputs, need_logits, exact, progress,
                 ordered) -> Iterator[list[tuple]]:
        items = [(d, c) for d in docs for c in d.chunks]
        for batch in self._plan([c.num_tokens for _, c in items], ordered=ordered):
            part = [items[i] for i in batch]
            states, end_logits, computed = self._chunk_states(part, prefix, need_logits, exact)
            for r, (d, c) in enumerate(part):
                for q, _ in questions_of.get(d.uid, []):
                    if computed[r]:
                        q.tokens += c.num_tokens
                    else:
                        q.cached_chunks += 1
            for (d, c), row in zip(part, range(len(part))):
                if d.claim is not None and d.claim.status == "own":
                    d.collected[c.index] = (states.select(row), end_logits[row] if end_logits is not None else None)
                    if len(d.collected) == len(d.chunks):
                        self._store(d)
            rows = [(qp, r) for r, (d, _) in enumerate(part) for qp in questions_of.get(d.uid, [])]
            events = self._question_pass(rows, part, states, end_logits, prefix_ids, return_inputs, need_logits)
            if progress is not None:
                progress.update(len(part))
            yield events

    def _store(self, d: _Doc) -> None:
        assert self.cache is not None and d.key is not None
        rows = [d.collected[i] for i in range(len(d.chunks))]  # chunk order, whatever the batch order was
        states = RecurrentState.cat([s for s, _ in rows])
        logits = torch.stack([lg for _, lg in rows]) if rows[0][1] is not None else torch.zeros(0)
        self.cache.put(d.key, DocStates(states, logits, [(c.token_start, c.token_end) for c in d.chunks]),
                       self.lm.identity, {"chunking": str(self.chunking)})
        d.collected = {}
        d.claim = Claim("hit", d.key)

    def _plan(self, lengths: list[int], ordered: bool = False) -> list[list[int]]:
        """Batches of row indices within ``max_batch_tokens``; pads only where exact."""
        can_pad = self.lm.backend.supports_left_padding
        order = list(range(len(lengths))) if ordered else sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches: list[list[int]] = []
        cur: list[int] = []
        width = 0
        for i in order:
            w = max(width, lengths[i])
            same = not cur or can_pad or lengths[i] == lengths[cur[0]]
            if cur and (not same or w * (len(cur) + 1) > self.max_batch_tokens):
                batches.append(cur)
                cur, w = [], lengths[i]
            cur.append(i)
            width = w
        if cur:
            batches.append(cur)
        return batches

    def _padded(self, seqs: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        width = max(len(s) for s in seqs)
        pad_id = self.lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        pads = torch.tensor([width - len(s) for s in seqs], dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        return ids, (pads if bool((pads > 0).any()) else None)

    def _chunk_states(self, part, prefix, need_logits, exact
                      ) -> tuple[RecurrentState, torch.Tensor | None, list[bool]]:
        """States after [P, C_i] for a batch of chunks: from the cache, or one model call."""
        # Cached entries live on the CPU: move what this batch takes to the model's device.
        device = self.lm.device
        have = [d.cached.states.select(c.index).to(device) if d.cached is not None else None for d, c in part]
        logits: list[torch.Tensor | None] = [d.cached.chunk_end_logits[c.index].to(device) if d.cached is not None
                                             and d.cached.chunk_end_logits.numel() else None for d, c in part]
        todo = [r for r, s in enumerate(have) if s is None]
        if todo:
            if not exact and not need_logits:
                # Token replay: the "state" is the prefix itself; the question pass re-runs it.
                st = prefix.state.expand(len(todo))
                ids = torch.as_tensor(np.stack([part[r][1].token_ids for r in todo]), dtype=torch.long)
                new_state = RecurrentState(st.family, {
                    "position": st.tensors["position"] + ids.shape[1],
                    "tokens": torch.cat([st.tensors["tokens"], ids.to(st.device)], dim=1)})
                out_logits = None
            else:
                ids, pads = self._padded([part[r][1].token_ids for r in todo])
                out = self.lm.forward(ids, prefix.state.expand(len(todo)), pad_left=pads)
                new_state, out_logits = out.state, out.logits
            for j, r in enumerate(todo):
                have[r] = new_state.select(j)
                logits[r] = out_logits[j] if out_logits is not None else None
        states = RecurrentState.cat(have)  # type: ignore[arg-type]
        end = torch.stack(logits) if all(lg is not None for lg in logits) else None  # type: ignore[arg-type]
        computed = [r in todo for r in range(len(part))]
        if not exact and not need_logits:
            computed = [False] * len(part)  # replay: the question pass runs these tokens
        return states, end, computed

    def _question_pass(self, rows, part, states, end_logits, prefix_ids, return_inputs, need_logits):
        """Run Q from each chunk's state; score; offer to each question's pool."""
        events = []
        exact = self.lm.backend.exact_continuation
        for batch in self._plan([len(q.ids) for (q, _), _ in rows]):
            sel = [rows[i] for i in batch]
            ids, pads = self._padded([q.ids for (q, _), _ in sel])
            st = states.select([r for _, r in sel])
            out = self.lm.forward(ids, st, all_logits=need_logits, pad_left=pads)
            last = out.logits[:, -1] if need_logits else out.logits
            entropy, top, top_p = first_token_stats(last)
            qlp = None
            if need_logits:
                assert end_logits is not None
                qlp = question_logprob(end_logits[[r for _, r in sel]], out.logits, ids, pads)
            for j, ((q, pos), r) in enumerate(sel):
                d, c = part[r]
                q.nominal += len(prefix_ids) + c.num_tokens + len(q.ids)
                q.tokens += len(q.ids) if exact else len(prefix_ids) + c.num_tokens + len(q.ids)
                tid = int(top[j])
                score = ChunkScore(
                    doc_index=pos, index=c.index, text=c.text, char_start=c.char_start,
                    char_end=c.char_end, token_start=c.token_start, token_end=c.token_end,
                    entropy=float(entropy[j]), top_token_id=tid, top_token=self.lm.decode([tid]),
                    top_prob=float(top_p[j]), is_idk=tid in self._idk_ids,
                    question_logprob=float(qlp[j]) if qlp is not None else None,
                    input_ids=(prefix_ids + c.ids + q.ids) if return_inputs else None)
                q.scores.append(score)
                eligible = not (self.idk_filter and score.is_idk)
                if self.entropy_threshold is not None and score.entropy > self.entropy_threshold:
                    eligible = False
                badness = score.entropy if self.criterion == "entropy" else -float(score.question_logprob)
                order = score.doc_index * 1e9 + score.token_start
                after_q = out.state.select(j)
                q.pool.offer(badness, eligible, score.entropy, order,
                             _Candidate(score, c, after_q, out.logits[j, -1] if need_logits else out.logits[j],
                                        states.select(r)))
                events.append((q, score, after_q, last[j]))
        return events

    def _finish(self, q: _Question, docs: list[_Doc], prefix_ids: list[int]) -> SelectionResult:
        scores = sorted(q.scores, key=lambda s: (s.doc_index, s.token_start))
        cands = q.pool.best()
        all_idk = not cands
        if all_idk and self.fallback == "min_entropy":
            fb = q.pool.fallback()
            cands = [fb] if fb is not None else []
        for rank, cand in enumerate(cands):
            cand.score.selected = True
            cand.score.rank = rank
            self.lm.handoff.remember(prefix_ids + cand.chunk.ids + q.ids, cand.after_question,
                                     cand.first_logits, text=self.prompt_text(q.text, cand.chunk.text))
        usage = {"input_tokens": q.tokens, "nominal_input_tokens": q.nominal, "chunks": len(scores),
                 "cached_chunks": q.cached_chunks}
        return SelectionResult(q.text, scores, [c.score for c in cands], all_idk, self.prompt.idk_word, usage,
                               cands, q.ids, prefix_ids)

    # ------------------------------------------------------------------ answering
    def _answer_from(self, result: SelectionResult, cfg: GenerationConfig, holder: AnswerStream,
                     return_inputs: bool) -> Iterator[str]:
        usage = dict(result.usage)
        if not result._candidates:
            holder.answer = Answer(result.idk_word, None, result.chunks, [], {**usage, "output_tokens": 0},
                                   "idk", all_idk=True)
            yield result.idk_word
            return
        cands = result._candidates
        if len(cands) == 1:
            state, logits = cands[0].after_question, cands[0].first_logits
            input_ids = result._prefix_ids + cands[0].chunk.ids + result._question_ids
        else:
            state, logits, input_ids, extra = self._rejoin(cands, result)
            usage["input_tokens"] += extra
        stream: TokenStream = self.lm.stream_from(state, logits, cfg, prompt_tokens=len(input_ids))
        yield from stream
        gen: Generation = stream.result
        usage["output_tokens"] = gen.completion_tokens
        holder.answer = Answer(gen.text, result.best, result.chunks, result.selected, usage, gen.finish_reason,
                               all_idk=result.all_idk, input_ids=input_ids if return_inputs else None)

    def _rejoin(self, cands: list[_Candidate], result: SelectionResult):
        """top_k > 1: continue from the first chunk's [P, C] state with the others, in document order."""
        ordered = sorted(cands, key=lambda c: (c.score.doc_index, c.chunk.token_start))
        sep = self.lm.encode("\n\n")
        state = ordered[0].after_chunk
        ids: list[int] = list(result._prefix_ids) + ordered[0].chunk.ids
        tail: list[int] = []
        prev = ordered[0]
        for c in ordered[1:]:
            adjacent = c.score.doc_index == prev.score.doc_index and c.chunk.token_start == prev.chunk.token_end
            tail += ([] if adjacent else sep) + c.chunk.ids
            prev = c
        tail += result._question_ids
        out = self.lm.prefill(tail, state)
        return out.state, out.logits, ids + tail, len(tail)

    def _summarize(self, question: str, documents, cfg: GenerationConfig, holder: AnswerStream) -> Iterator[str]:
        self._check_question(question)
        docs = [self._tokenize(t, i) for i, t in enumerate(self._as_documents(documents))]
        q_ids = self._question_ids(question)
        q = _Question(question, q_ids, [d.uid for d in docs], CandidatePool(1, True))
        prefix_ids = self._prefix_ids()
        parts: list[tuple[tuple[int, int], str]] = []
        out_tokens = 0
        first = True
        # Batches follow document order, so the parts stream out in order.
        for events in self._run(prefix_ids, docs, [q], False, ordered=True):
            if not events:
                continue
            gens = self.lm.generate_batch_from(RecurrentState.cat([e[2] for e in events]),
                                               torch.stack([e[3] for e in events]), cfg)
            for (_, score, _, _), g in zip(events, gens):
                text = g.text.strip()
                parts.append(((score.doc_index, score.token_start), text))
                out_tokens += g.completion_tokens
                if text:
                    yield ("" if first else "\n\n") + text
                    first = False
        pieces = [t for _, t in sorted(parts)]
        result = self._finish(q, docs, prefix_ids)
        holder.answer = Answer("\n\n".join(p for p in pieces if p), None, result.chunks, result.chunks,
                               {**result.usage, "output_tokens": out_tokens}, "summary", parts=pieces)
