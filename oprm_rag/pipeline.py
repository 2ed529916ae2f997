"""One pass of speculative prefill over chunk batches: the work behind every selection.

For a set of questions over a set of documents, a :class:`ScoringRun` streams over
batches of chunks (bounded by ``max_batch_tokens``):

    S_i      = state after [P, C_i]     from the prefix state, or the document cache
    T_i, p_i = state after [P, C_i, Q]  and the first-answer distribution, per question
    score    = entropy, top token, IDK mass, why (not) eligible
    pool     keeps only the best ``top_k`` candidates' states per question

so memory depends on the batch and the state size, not on the document's length.
Everything the pass needs travels in the run object (the idea of mamba-ssm's
``InferenceParams``), and everything model-specific goes through the engine seam.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from .storage.cache import DocumentSession, cache_key
from .chunking import DocumentTokens, chunk_document
from .engine import Engine, EngineInfo, Extension, QuestionLikelihood, StatefulEngine
from .memory import release_free_memory
from .errors import InputError, NonFiniteScoresError, StateFormatError
from .results import Chunk, ChunkScore, SelectionResult, Usage
from .scoring import CandidatePool, confirm_idk, drop_reason

if TYPE_CHECKING:  # pragma: no cover
    from .storage.cache import DocumentStateCache
    from .engine import ChunkSize
    from .options import SelectorOptions

__all__ = ["ScoringRun", "ScoredRow", "Candidate", "Winners", "Document", "Question", "plan_batches"]

logger = logging.getLogger("oprm_rag")

#: Bytes of states one batch of cached chunk rows may hold (their question pass is all
#: that runs for them, so more rows fit a batch than when chunks are computed).
CACHED_BATCH_STATE_BYTES = 256 * 2**20


@dataclass
class Candidate:
    """A chunk that can still win, with the states needed to answer from it."""

    score: ChunkScore
    after_question: Any  # state after [P, C_i, Q] (batch 1)
    first_logits: Any  # the engine's next-token scores after Q
    after_chunk: Any  # state after [P, C_i] (batch 1), for re-joining top_k chunks


@dataclass
class Winners:
    """What answering from a selection needs (kept on the ``SelectionResult``)."""

    candidates: list[Candidate]
    prefix_ids: list[int]
    question_ids: list[int]


@dataclass
class ScoredRow:
    """One chunk scored for one question; its state and logits (to decode from, in
    summaries) are taken from the batch only when asked for."""

    question: "Question"
    score: ChunkScore
    _engine: Engine = field(repr=False)
    _batch: Extension = field(repr=False)
    _row: int = 0

    @property
    def state(self) -> Any:
        return self._engine.select_states(self._batch.states, self._row)

    @property
    def logits(self) -> Any:
        return self._engine.row_logits(self._batch, self._row)


@dataclass(eq=False)
class Document:
    """A document as the run sees it: its tokens, its chunks, and where its chunk states
    come from and go to (its cache session; None without a cache)."""

    uid: int
    token_ids: "np.ndarray"  # the whole document's (its offsets are not kept once it is chunked)
    chunks: list[Chunk]
    source: DocumentSession | None = None

    @property
    def cached(self) -> bool:
        """Its chunk states come from the cache."""
        return self.source is not None and self.source.ready


@dataclass
class Question:
    """A question and what its pass over the chunks found."""

    text: str
    ids: list[int]
    doc_uids: list[int]
    pool: CandidatePool
    scores: list[ChunkScore] = field(default_factory=list)
    tokens: int = 0  # tokens the model ran for this question in this call
    nominal: int = 0  # tokens of all its [P, C_i, Q] inputs (plain OPRM's cost)
    cached_chunks: int = 0
    exact: bool = True  # every entropy came from the full distribution


def plan_batches(lengths: Sequence[int], max_tokens: int, can_pad: bool, ordered: bool = False) -> list[list[int]]:
    """Row indices grouped into batches of at most ``max_tokens`` (rows x width).

    Rows of different lengths share a batch only where the engine takes padding;
    otherwise (and for ``ordered`` runs, which keep document order) rows are taken in
    the given order, else sorted by length to waste little padding.
    """
    order = list(range(len(lengths))) if ordered else sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, lengths[i])
        same = not cur or can_pad or lengths[i] == lengths[cur[0]]
        if cur and (not same or w * (len(cur) + 1) > max_tokens):
            batches.append(cur)
            cur, w = [], lengths[i]
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


@dataclass
class ScoringRun:
    """Everything one pass over the chunks needs, in one typed object."""

    engine: Engine
    options: "SelectorOptions"
    chunk: "ChunkSize"
    idk_ids: frozenset[int]
    cache: "DocumentStateCache | None"
    prefix_ids: list[int]
    docs: list[Document]
    questions: list[Question]
    return_inputs: bool = False
    ordered: bool = False
    prefix: Extension | None = None
    _of: dict[int, list[tuple[Question, int]]] = field(default_factory=dict)
    _token_text: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        #: The engine's facts and whether its states are exact and held here (asked once).
        self.info: EngineInfo = self.engine.describe()
        self.stateful: StatefulEngine | None = self.engine if isinstance(self.engine, StatefulEngine) else None

    @property
    def need_logits(self) -> bool:
        """The question-likelihood criterion needs every position's logits."""
        return self.options.criterion == "question_likelihood"

    @property
    def chunking(self) -> dict[str, Any]:
        """Everything about chunking that a cached chunk state depends on."""
        o = self.options
        return {"chunk_tokens": self.chunk.tokens, "overlap": o.chunk_overlap, "boundary": o.boundary,
                "tolerance": o.boundary_tolerance}

    # ------------------------------------------------------------------ the pass
    def run(self) -> Iterator[list[ScoredRow]]:
        """Stream over chunk batches, yielding each batch's scored rows. Consume it fully:
        the questions' pools and scores fill in as it goes."""
        engine = self.engine
        stores = self.stateful is not None
        known = self.stateful is not None and self.stateful.has_prefix(self.prefix_ids)
        self.prefix = engine.start(self.prefix_ids)
        for q in self.questions:
            for pos, uid in enumerate(q.doc_uids):
                self._of.setdefault(uid, []).append((q, pos))
            q.tokens += 0 if (known or not stores) else len(self.prefix_ids)
        progress = self._progress(sum(len(d.chunks) for d in self.docs))
        try:
            self._open_sources()  # inside the try: a failure part-way abandons what was claimed
            pending = [d for d in self.docs if d.source is not None and d.source.waiting]
            ready = [d for d in self.docs if d not in pending]
            yield from self._process(ready, progress)
            for d in pending:  # another thread was computing these: take its result, or compute
                assert d.source is not None
                d.source.wait()
                yield from self._process([d], progress)
        except BaseException:
            for d in self.docs:
                if d.source is not None:
                    d.source.abort()
            raise
        finally:
            if progress is not None:
                progress.close()

    def _progress(self, total: int) -> Any:
        if not self.options.show_progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="OPRM scoring", unit="chunk", leave=False)

    def _open_sources(self) -> None:
        """Each document's cache session: its rows where cached, else the job of storing them."""
        if self.cache is None or self.stateful is None:
            return
        per_chunk = self._row_state_bytes() + 4 * (self.info.vocab_size or 0)
        for d in self.docs:
            if not self.cache.fits(per_chunk * len(d.chunks)):
                continue  # too big to keep: stream it, memory stays bounded
            key = cache_key(self.engine.identity, self.prefix_ids, self.chunking, d.token_ids)
            d.source = self.cache.session(key, self.engine.identity, [(c.token_start, c.token_end) for c in d.chunks],
                                          {"chunking": str(self.chunking)})

    def _row_state_bytes(self) -> int:
        """Bytes of one row's state after [P, C_i, Q] at the longest chunk and question here
        (attention keys make a state grow with its tokens; fixed-size states do not)."""
        longest = max((c.num_tokens for d in self.docs for c in d.chunks), default=0)
        asked = max((len(q.ids) for q in self.questions), default=0)
        assert self.stateful is not None, "only exact states are cached"
        return self.stateful.state_nbytes_at(len(self.prefix_ids) + longest + asked)

    def _process(self, docs: list[Document], progress: Any) -> Iterator[list[ScoredRow]]:
        items = [(d, c) for d in docs for c in d.chunks]
        for part in self._batches(items):
            states, end_logits, computed = self._chunk_states(part)
            release_free_memory()
            for r, (d, c) in enumerate(part):
                for q, _ in self._of.get(d.uid, []):
                    if computed[r] and self.stateful is not None:
                        q.tokens += c.num_tokens
                    elif not computed[r]:
                        q.cached_chunks += 1
            self._store(part, states, end_logits, computed)
            rows = self._question_pass(part, states, end_logits)
            del states, end_logits
            release_free_memory()  # peak memory must not creep up with the number of batches
            if progress is not None:
                progress.update(len(part))
            yield rows

    def _batches(self, items: list[tuple[Document, Chunk]]) -> Iterator[list[tuple[Document, Chunk]]]:
        """Chunk rows to run together.

        Rows whose chunk must be computed are batched by chunk length (``max_batch_tokens``).
        Rows whose state comes from the cache cost only the question pass, so they batch
        by the questions' tokens, capped by the state bytes a batch may hold: a follow-up
        question over thousands of cached chunks is a few model calls, not one per
        chunk-sized batch. Ordered runs (summaries) keep document order.
        """
        budget, can_pad = self.options.max_batch_tokens, self.info.can_pad
        if self.ordered:
            for batch in plan_batches([c.num_tokens for _, c in items], budget, can_pad, ordered=True):
                yield [items[i] for i in batch]
            return
        fresh = [it for it in items if not it[0].cached]
        cached = [it for it in items if it[0].cached]
        for batch in plan_batches([c.num_tokens for _, c in fresh], budget, can_pad):
            yield [fresh[i] for i in batch]
        if not cached:
            return
        cap = max(1, CACHED_BATCH_STATE_BYTES // max(1, self._row_state_bytes()))
        part: list[tuple[Document, Chunk]] = []
        cost = 0
        for d, c in cached:
            row = sum(len(q.ids) for q, _ in self._of.get(d.uid, [])) or 1
            if part and (cost + row > budget or len(part) >= cap):
                yield part
                part, cost = [], 0
            part.append((d, c))
            cost += row
        if part:
            yield part

    def _store(self, part: list[tuple[Document, Chunk]], states: Any, end_logits: Any, computed: list[bool]) -> None:
        """Stream this batch's computed chunk states into their documents' cache sessions:
        memory with a cache stays within its budget plus one batch, whatever the document."""
        by_doc: dict[int, list[int]] = {}
        for r, (d, _) in enumerate(part):
            if d.source is not None and not d.source.ready and computed[r]:
                by_doc.setdefault(d.uid, []).append(r)
        for rows in by_doc.values():
            d = part[rows[0]][0]
            assert d.source is not None
            d.source.store([part[r][1].index for r in rows], self.engine.select_states(states, rows),
                           end_logits[rows] if end_logits is not None else None)

    def _chunk_states(self, part: list[tuple[Document, Chunk]]) -> tuple[Any, Any, list[bool]]:
        """States after [P, C_i] for a batch of chunks: from the cache, or one model call.

        Returns the states (one batch, rows in ``part``'s order), the logits after each
        chunk (a stacked tensor, or None when the engine did not compute them), and which
        rows were computed now. Each source (a cached document's rows, the model call)
        arrives as one batch; they are joined with one concatenation and one reordering,
        never row by row.
        """
        import torch

        engine = self.engine
        sources: list[tuple[Any, Any, list[int]]] = []  # (states, stacked logits or None, rows of part)
        covered: set[int] = set()
        for d, rows in _rows_by_document(part).items():
            if not d.cached:
                continue
            assert d.source is not None
            try:
                st, lg = d.source.rows([part[r][1].index for r in rows])
            except StateFormatError as exc:  # the file changed under us: compute these chunks
                logger.warning("cached chunk states unreadable (%s); computing them", exc)
                continue
            sources.append((st, lg, rows))
            covered.update(rows)
        todo = [r for r in range(len(part)) if r not in covered]
        if todo:
            want = "last" if (self.stateful is not None or self.need_logits) else "none"
            assert self.prefix is not None
            ext = engine.extend(self.prefix.states, [part[r][1].token_ids for r in todo], logits=want)
            lg = ext.logits
            if lg is not None and not (isinstance(lg, torch.Tensor) and lg.dim() == 2):
                lg = torch.stack([engine.row_logits(ext, j) for j in range(len(todo))])
            sources.append((ext.states, lg, todo))
        order = [r for _, _, rows in sources for r in rows]
        if len(sources) == 1:
            states, end = sources[0][0], sources[0][1]
        else:
            states = engine.cat_states([st for st, _, _ in sources])
            logits = [lg for _, lg, _ in sources]
            end = None if any(lg is None for lg in logits) else torch.cat([lg.to(logits[-1].device) for lg in logits])
        if order != list(range(len(part))):
            back = sorted(range(len(order)), key=order.__getitem__)  # position of each row of part
            states = engine.select_states(states, back)
            end = end[back] if end is not None else None
        return states, end, [r in set(todo) for r in range(len(part))]

    def _question_pass(self, part: list[tuple[Document, Chunk]], states: Any, end_logits: Any) -> list[ScoredRow]:
        """Run Q from each chunk's state; score; offer to each question's pool."""
        engine, opts = self.engine, self.options
        rows = [(q, pos, r) for r, (d, _) in enumerate(part) for q, pos in self._of.get(d.uid, [])]
        scored: list[ScoredRow] = []
        for batch in plan_batches([len(rows[i][0].ids) for i in range(len(rows))], opts.max_batch_tokens,
                                  self.info.can_pad):
            sel = [rows[i] for i in batch]
            st = engine.select_states(states, [r for _, _, r in sel])
            q_rows = [q.ids for q, _, _ in sel]
            ext = engine.extend(st, q_rows, logits="all" if self.need_logits else "last")
            first = engine.first_tokens(ext, self.idk_ids)
            idk = confirm_idk(engine, ext, first, self.idk_ids)  # an IDK word of several tokens: spelled out
            qlp = None
            if self.need_logits:
                if end_logits is None:
                    raise InputError("criterion='question_likelihood' needs the logits after each chunk, "
                                     "which this model does not give")
                assert isinstance(engine, QuestionLikelihood)  # the selector refuses the criterion otherwise
                qlp = engine.question_logprobs(end_logits[[r for _, _, r in sel]], ext, q_rows)
            for j, (q, pos, r) in enumerate(sel):
                d, c = part[r]
                full = len(self.prefix_ids) + c.num_tokens + len(q.ids)
                q.nominal += full
                q.tokens += len(q.ids) if self.stateful is not None else full
                q.exact = q.exact and first.exact
                score = self._score(first, j, c.at(pos), qlp[j] if qlp is not None else None, q, idk[j])
                q.scores.append(score)
                # States are copied out of the batch only for a candidate the pool keeps.
                q.pool.offer(score, pos * 1e9 + c.token_start,
                             lambda j=j, r=r, score=score: Candidate(
                                 score, engine.select_states(ext.states, j), engine.row_logits(ext, j),
                                 engine.select_states(states, r)))
                scored.append(ScoredRow(q, score, engine, ext, j))
        return scored

    def _score(self, first: Any, j: int, chunk: Chunk, qlp: float | None, q: Question, is_idk: bool) -> ChunkScore:
        tid = int(first.top_id[j])
        finite = bool(first.finite[j])
        score = ChunkScore(
            chunk=chunk, entropy=float(first.entropy[j]), top_token_id=tid,
            top_token=self._token(tid) if finite else "", top_prob=float(first.top_prob[j]),
            is_idk=finite and is_idk, idk_prob=float(first.idk_prob[j]), finite=finite,
            criterion=self.options.criterion, question_logprob=qlp,
            entropy_bounds=None if first.entropy_bounds is None else tuple(first.entropy_bounds[j]),
            input_ids=(self.prefix_ids + chunk.ids + q.ids) if self.return_inputs else None)
        score.dropped_by = drop_reason(score, self.options)
        return score

    def _token(self, tid: int) -> str:
        text = self._token_text.get(tid)
        if text is None:
            text = self._token_text[tid] = self.engine.decode([tid])
        return text

    # ------------------------------------------------------------------ results
    def finish(self, q: Question, idk_word: str, remember: Any = None) -> SelectionResult:
        """The selection for ``q`` once the pass is over; ``remember(candidate, question,
        prefix_ids)`` is called for each chosen candidate (the handoff, on request)."""
        scores = sorted(q.scores, key=lambda s: (s.doc_index, s.token_start))
        finite = [s for s in scores if s.finite]
        if scores and not finite:
            raise NonFiniteScoresError(
                f"every chunk's first-answer scores were NaN or infinite ({len(scores)} chunks): the model "
                "overflowed. Load it in float32 or bfloat16 (dtype=...) instead of float16.")
        if len(finite) < len(scores):
            logger.warning("%d of %d chunks had NaN or infinite scores and cannot be selected (a float16 "
                           "overflow?); they are flagged finite=False", len(scores) - len(finite), len(scores))
        cands: list[Candidate] = q.pool.best()
        all_idk = not cands and bool(finite) and all(s.dropped_by == "idk" for s in finite)
        fallback_used = False
        if not cands and self.options.fallback == "min_entropy":
            fb = q.pool.fallback()
            if fb is not None:
                cands, fallback_used = [fb], True
        for rank, cand in enumerate(cands):
            cand.score.selected = True
            cand.score.rank = rank
            if remember is not None:
                remember(cand, q, self.prefix_ids)
        # token counting as of now: a served engine that found its server refusing token ids
        # during this run sent text, and its boundaries are approximate from then on
        usage = Usage(input_tokens=q.tokens, nominal_input_tokens=q.nominal, chunks=len(scores),
                      cached_chunks=q.cached_chunks, chunk_tokens=self.chunk.tokens,
                      chunk_tokens_reason=self.chunk.reason,
                      token_counting=self.engine.describe().token_counting, entropy_exact=q.exact)
        return SelectionResult(q.text, scores, [c.score for c in cands], all_idk, idk_word, usage,
                               fallback_used, Winners(cands, list(self.prefix_ids), list(q.ids)))


def _rows_by_document(part: list[tuple[Document, Chunk]]) -> dict[Document, list[int]]:
    out: dict[Document, list[int]] = {}
    for r, (d, _) in enumerate(part):
        out.setdefault(d, []).append(r)
    return out


def tokenize_document(engine: Engine, text: str, uid: int, chunk: "ChunkSize", options: "SelectorOptions") -> Document:
    """A document's tokens and chunks (the engine memoises the tokenisation)."""
    ids, offsets = engine.encode_with_offsets(text)
    if not len(ids):
        raise InputError(f"document {uid} has no tokens")
    toks = DocumentTokens(text, ids, offsets)
    del ids, offsets
    chunks = chunk_document(toks, uid, chunk.tokens, options.chunk_overlap, options.boundary,
                            options.boundary_tolerance)
    return Document(uid, toks.token_ids, chunks)
