"""``OPRMSelector``: speculative prefill, entropy scoring, IDK filter, selective decoding.

For a question Q and documents cut into chunks C_1..C_N::

    S_P      = state after the instruction P                      (computed once)
    S_i      = state after [P, C_i]      from S_P                 (question-independent: cached)
    p_i, T_i = first-answer distribution and state after [P, C_i, Q] from S_i
    H_i      = entropy(p_i); drop i if argmax p_i starts the IDK word
    answer   = decode from T_{argmin H}                           (no second prefill)

The selector is a facade: options come from :class:`~oprm_rag.options.SelectorOptions`,
the pass over chunk batches is :class:`~oprm_rag.pipeline.ScoringRun`, the model is
resolved once into an :class:`~oprm_rag.engine.Engine` (``oprm_rag.resolve``: in
process, or ``oprm_rag.served.OpenAICompatibleLM`` for a server) and reached only
through it, and results are the types of :mod:`oprm_rag.results`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .engine import Engine, QuestionLikelihood, StatefulEngine
from .engine.resolve import ModelLike, resolve
from .errors import InputError, InputTypeError, OptionError
from .decoding.config import GENERATION_ALIASES, SELECTION_NAMES, SUMMARY_MAX_NEW_TOKENS, GenerationConfig
from .options import SelectorOptions
from .pipeline import Candidate, Question, ScoringRun, Winners, tokenize_document
from .results import Answer, AnswerStream, SelectionResult, Usage
from .scoring import CandidatePool

if TYPE_CHECKING:  # pragma: no cover
    from .storage.cache import DocumentStateCache
    from .lm import RecurrentLM

__all__ = ["OPRMSelector", "SelectionResult", "Answer", "AnswerStream"]

logger = logging.getLogger("oprm_rag")

#: ``answer()``/``stream()`` sampling keywords: the decoding aliases less the length (its own
#: argument) and the names that mean selection here (``top_k``).
_SAMPLING = {k: v for k, v in GENERATION_ALIASES.items()
             if k not in SELECTION_NAMES and v != "max_new_tokens"}


class OPRMSelector:
    """Retriever-free, model-scored context selection.

    Args:
        model: a ``RecurrentLM``, an ``Engine`` (``OpenAICompatibleLM`` for a served
            model), or a path / hub name loaded once per process.
        options: a :class:`SelectorOptions` (or a mapping); keywords override it. See
            ``SelectorOptions`` for every option and its default (``chunk_tokens="auto"``).
        cache: a ``DocumentStateCache`` to use instead of the model's shared one, or a
            bool (the ``cache`` option).
    """

    def __init__(self, model: "ModelLike", options: SelectorOptions | Mapping[str, Any] | None = None, /, *,
                 cache: "DocumentStateCache | bool | None" = None, **option_kwargs: Any) -> None:
        from .storage.cache import DocumentStateCache

        if isinstance(cache, bool):
            option_kwargs["cache"] = cache
        elif cache is not None and not isinstance(cache, DocumentStateCache):
            raise OptionError(f"cache must be a DocumentStateCache or a bool, got {type(cache).__name__}")
        self.options = SelectorOptions.build(options, **option_kwargs)
        self.engine: Engine = resolve(model)
        if self.options.criterion == "question_likelihood" and not isinstance(self.engine, QuestionLikelihood):
            raise OptionError(f"criterion='question_likelihood' needs every position's full logits; "
                              f"{self.engine.name} gives only top-k log-probabilities. Use criterion='entropy'.")
        prompt = self.options.prompt or self.engine.prompt
        if self.options.idk_word is not None:
            prompt = prompt.with_idk_word(self.options.idk_word)
        self.prompt = prompt
        self.chunk = self.options.chunk_size(self.engine.describe())
        self.cache: DocumentStateCache | None = None
        if isinstance(cache, DocumentStateCache):
            if not isinstance(self.engine, StatefulEngine):
                raise OptionError(f"{self.engine.name} keeps no states this process can store; drop cache=")
            self.cache = cache
        elif self.options.cache and isinstance(self.engine, StatefulEngine):
            self.cache = self.engine.document_cache()
        self._idk_ids = self.engine.idk_token_ids(self.prompt.idk_word)

    # ------------------------------------------------------------------ facts
    @property
    def chunk_tokens(self) -> int | None:
        """The resolved chunk length (None: whole documents)."""
        return self.chunk.tokens

    @property
    def lm(self) -> "RecurrentLM":
        """The in-process model (only for selectors over a ``RecurrentLM``)."""
        from .engine.local import InProcessEngine

        if not isinstance(self.engine, InProcessEngine):
            raise AttributeError(f"{self.engine.name} is not an in-process RecurrentLM")
        return self.engine.lm

    def prompt_text(self, question: str, chunk_text: str) -> str:
        """The exact text of ``[P, C, Q]``: what a chat model or LLM must receive for the handoff."""
        return self.prompt.render(question, chunk_text, self.engine)

    def __repr__(self) -> str:
        return f"OPRMSelector({self.engine.name!r}, chunk_tokens={self.chunk_tokens}, top_k={self.options.top_k})"

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _documents(documents: Any) -> list[str]:
        if isinstance(documents, str):
            documents = [documents]
        if documents is None or not isinstance(documents, (list, tuple)):
            raise InputTypeError("documents must be a string or a list of strings")
        if not documents:
            raise InputError("no documents were given: pass at least one non-empty text")
        out = []
        for i, d in enumerate(documents):
            if not isinstance(d, str):
                raise InputTypeError(f"document {i} is {type(d).__name__}, not str; pass the text itself")
            _check_text(d, f"document {i}")
            if not d.strip():
                raise InputError(f"document {i} is empty or only whitespace")
            out.append(d)
        return out

    @staticmethod
    def _question(question: Any) -> str:
        if not isinstance(question, str):
            raise InputTypeError(f"the question must be a string, got {type(question).__name__}")
        _check_text(question, "the question")
        if not question.strip():
            raise InputError("the question is empty")
        return question

    def _prefix_ids(self) -> list[int]:
        return self.engine.encode_prefix(self.prompt.prefix(self.engine), chat=self.prompt.use_chat_template)

    def _question_ids(self, question: str) -> list[int]:
        own = len(self.engine.encode(question))
        if self.chunk_tokens is not None and own >= self.chunk_tokens:
            raise InputError(f"the question takes {own} tokens, as many as a chunk ({self.chunk_tokens}); "
                             "shorten the question or raise chunk_tokens")
        return self.engine.encode(self.prompt.split(question, self.engine)[1])

    def _run(self, questions: list[Question], docs: list, *, return_inputs: bool = False,
             ordered: bool = False) -> ScoringRun:
        return ScoringRun(self.engine, self.options, self.chunk, self._idk_ids, self.cache, self._prefix_ids(),
                          docs, questions, return_inputs=return_inputs, ordered=ordered)

    # ------------------------------------------------------------------ selecting
    def select(self, question: str, documents: str | Sequence[str], *, return_inputs: bool = False,
               handoff: bool = False) -> SelectionResult:
        """Score every chunk of ``documents`` for ``question`` and choose.

        ``handoff=True`` leaves each chosen chunk's state after ``[P, C, Q]`` where a chat
        wrapper on the same model that receives ``prompt_text(question, chunk)`` resumes
        from it (instead of prefilling the chunk again).
        """
        return self.select_many([(question, documents)], return_inputs=return_inputs, handoff=handoff)[0]

    def select_many(self, items: Sequence[tuple[str, str | Sequence[str]]], *, return_inputs: bool = False,
                    handoff: bool = False) -> list[SelectionResult]:
        """Several (question, documents) pairs in shared model batches; documents shared
        between questions are chunked and prefilled once."""
        if not items:
            return []
        texts: dict[str, int] = {}
        docs: list = []
        questions: list[Question] = []
        for question, documents in items:
            self._question(question)
            uids = []
            for text in self._documents(documents):
                if text not in texts:
                    texts[text] = len(docs)
                    docs.append(tokenize_document(self.engine, text, len(docs), self.chunk, self.options))
                uids.append(texts[text])
            pool = CandidatePool(self.options.top_k, self.options.fallback is not None)
            questions.append(Question(question, self._question_ids(question), uids, pool))
        run = self._run(questions, docs, return_inputs=return_inputs)
        for _ in run.run():
            pass
        remember = self._remember if handoff else None
        return [run.finish(q, self.prompt.idk_word, remember) for q in questions]

    def _remember(self, cand: Candidate, q: Question, prefix_ids: list[int]) -> None:
        if not isinstance(self.engine, StatefulEngine):
            return  # no state in this process to hand off
        chunk = cand.score.chunk
        self.engine.remember(prefix_ids + chunk.ids + q.ids, cand.after_question, cand.first_logits,
                             text=self.prompt_text(q.text, chunk.text))

    def prepare(self, documents: str | Sequence[str]) -> int:
        """Compute and cache the chunk states of ``documents`` ahead of questions.

        Returns the number of chunks now cached. Needs a cache and a model whose states
        can be stored.
        """
        stateful = isinstance(self.engine, StatefulEngine)
        if self.cache is None or not stateful:
            raise OptionError(f"prepare() needs a document cache and a model whose states can be stored; "
                              f"{self.engine.name} " + ("has none" if stateful else "keeps no reusable states"))
        docs = [tokenize_document(self.engine, t, i, self.chunk, self.options)
                for i, t in enumerate(self._documents(documents))]
        for _ in self._run([], docs).run():
            pass
        return sum(len(d.chunks) for d in docs)

    # ------------------------------------------------------------------ answering
    def answer(self, question: str, documents: str | Sequence[str], *, max_new_tokens: int | None = None,
               return_inputs: bool = False, generation: GenerationConfig | None = None, **sampling: Any) -> Answer:
        """Select, then decode the answer from the winning chunk's stored state.

        Sampling: ``temperature``, ``top_p``, ``sample_top_k``, ``seed``, ``stop``,
        ``stop_at_eos`` (or a whole ``generation=GenerationConfig(...)``). Selection
        options (``top_k``...) belong to the selector, not here.
        """
        stream = self.stream(question, documents, max_new_tokens=max_new_tokens, return_inputs=return_inputs,
                             generation=generation, **sampling)
        stream.text()
        assert stream.answer is not None
        return stream.answer

    def stream(self, question: str, documents: str | Sequence[str], *, max_new_tokens: int | None = None,
               return_inputs: bool = False, generation: GenerationConfig | None = None,
               **sampling: Any) -> AnswerStream:
        """Like :meth:`answer`, as an iterator of text pieces (``.answer`` at the end)."""
        cfg = self._generation(max_new_tokens, generation, sampling)
        result = self.select(question, documents, return_inputs=return_inputs)
        return self._stream_from(result, cfg, return_inputs)

    def stream_from(self, result: SelectionResult, *, max_new_tokens: int | None = None, return_inputs: bool = False,
                    generation: GenerationConfig | None = None, **sampling: Any) -> AnswerStream:
        """Stream the answer from a selection you already hold (no re-scoring, no prefill)."""
        return self._stream_from(result, self._generation(max_new_tokens, generation, sampling), return_inputs)

    def answer_from(self, result: SelectionResult, *, max_new_tokens: int | None = None,
                    generation: GenerationConfig | None = None, **sampling: Any) -> Answer:
        """Decode from a selection you already hold (no re-scoring)."""
        holder = self.stream_from(result, max_new_tokens=max_new_tokens, generation=generation, **sampling)
        holder.text()
        assert holder.answer is not None
        return holder.answer

    def _stream_from(self, result: SelectionResult, cfg: GenerationConfig, return_inputs: bool) -> AnswerStream:
        if not isinstance(result, SelectionResult) or not isinstance(result._decode, Winners):
            raise InputError("stream_from() takes a SelectionResult made by this selector's select()")
        return AnswerStream(lambda holder: self._answer_from(result, cfg, holder, return_inputs), selection=result)

    @staticmethod
    def _generation(max_new_tokens: int | None, generation: GenerationConfig | None,
                    sampling: dict[str, Any]) -> GenerationConfig:
        """The decoding configuration (``None``: ``GenerationConfig``'s default); selection
        options here are a named mistake."""
        if "top_k" in sampling:
            raise OptionError("top_k selects chunks: set it on the selector (OPRMSelector(..., top_k=3)); "
                              "for sampling from the k most likely tokens pass sample_top_k=")
        unknown = sorted(set(sampling) - set(_SAMPLING))
        if unknown:
            raise OptionError(f"unexpected argument(s) {unknown}; decoding takes max_new_tokens, "
                              f"{sorted(_SAMPLING)} or generation=GenerationConfig(...)")
        if generation is not None:
            if sampling or max_new_tokens is not None:
                raise OptionError("pass decoding options either in generation=GenerationConfig(...) or as "
                                  "keywords, not both")
            return generation
        return GenerationConfig.make(max_new_tokens=max_new_tokens,
                                     **{_SAMPLING[k]: v for k, v in sampling.items()})

    def _answer_from(self, result: SelectionResult, cfg: GenerationConfig, holder: AnswerStream,
                     return_inputs: bool) -> Iterator[str]:
        usage = Usage(**result.usage.__dict__)
        winners: Winners = result._decode
        cands = winners.candidates
        if not cands:
            holder.answer = Answer(result.idk_word, None, result.chunks, [], usage, "idk", all_idk=result.all_idk,
                                   no_answer_reason=result.no_answer_reason)
            yield result.idk_word
            return
        if len(cands) == 1:
            state, logits = cands[0].after_question, cands[0].first_logits
            input_ids = winners.prefix_ids + cands[0].score.chunk.ids + winners.question_ids
        else:
            state, logits, input_ids, extra = self._rejoin(cands, winners)
            usage.input_tokens += extra
        stream = self.engine.stream(state, logits, cfg, prompt_tokens=len(input_ids))
        yield from stream
        gen = stream.result
        usage.output_tokens = gen.completion_tokens
        holder.answer = Answer(gen.text, result.best, result.chunks, result.selected, usage, gen.finish_reason,
                               all_idk=result.all_idk, no_answer_reason=result.no_answer_reason,
                               input_ids=input_ids if return_inputs else None)

    def _rejoin(self, cands: list[Candidate], winners: Winners) -> tuple[Any, Any, list[int], int]:
        """top_k > 1: continue the first chunk's [P, C] state with the others, in document
        order (adjacent chunks run on; others after a blank line), then Q."""
        ordered = sorted(cands, key=lambda c: (c.score.doc_index, c.score.token_start))
        sep = self.engine.encode("\n\n")
        tail: list[int] = []
        prev = ordered[0].score.chunk
        for c in ordered[1:]:
            chunk = c.score.chunk
            adjacent = chunk.doc_index == prev.doc_index and chunk.char_start == prev.char_end
            tail += ([] if adjacent else sep) + chunk.ids
            prev = chunk
        tail += winners.question_ids
        ext = self.engine.extend(ordered[0].after_chunk, [tail], logits="last")
        ids = winners.prefix_ids + ordered[0].score.chunk.ids + tail
        return ext.states, self.engine.row_logits(ext, 0), ids, len(tail)

    # ------------------------------------------------------------------ summaries
    def summarize(self, documents: str | Sequence[str], question: str | None = None, *,
                  max_new_tokens: int | None = None, generation: GenerationConfig | None = None,
                  **sampling: Any) -> Answer:
        """The paper's summary mode: decode from every chunk, join the parts in document order."""
        stream = self.stream_summary(documents, question, max_new_tokens=max_new_tokens, generation=generation,
                                     **sampling)
        stream.text()
        assert stream.answer is not None
        return stream.answer

    def stream_summary(self, documents: str | Sequence[str], question: str | None = None, *,
                       max_new_tokens: int | None = None, generation: GenerationConfig | None = None,
                       **sampling: Any) -> AnswerStream:
        if max_new_tokens is None and generation is None:
            max_new_tokens = SUMMARY_MAX_NEW_TOKENS
        cfg = self._generation(max_new_tokens, generation, sampling)
        q = question or self.prompt.summary_question
        self._question(q)
        texts = self._documents(documents)
        return AnswerStream(lambda holder: self._summarize(q, texts, cfg, holder))

    def _summarize(self, question: str, texts: list[str], cfg: GenerationConfig,
                   holder: AnswerStream) -> Iterator[str]:
        docs = [tokenize_document(self.engine, t, i, self.chunk, self.options) for i, t in enumerate(texts)]
        q = Question(question, self._question_ids(question), [d.uid for d in docs], CandidatePool(1, True))
        run = self._run([q], docs, ordered=True)
        parts: list[tuple[tuple[int, int], str]] = []
        out_tokens = 0
        first = True
        # Batches follow document order, so the parts stream out in order.
        for rows in run.run():
            if not rows:
                continue
            gens = self.engine.generate_batch(self.engine.cat_states([r.state for r in rows]),
                                              [r.logits for r in rows], cfg)
            for row, g in zip(rows, gens):
                text = g.text.strip()
                parts.append(((row.score.doc_index, row.score.token_start), text))
                out_tokens += g.completion_tokens
                if text:
                    yield ("" if first else "\n\n") + text
                    first = False
        pieces = [t for _, t in sorted(parts)]
        result = run.finish(q, self.prompt.idk_word)
        holder.selection = result
        usage = Usage(**result.usage.__dict__)
        usage.output_tokens = out_tokens
        holder.answer = Answer("\n\n".join(p for p in pieces if p), None, result.chunks, result.chunks, usage,
                               "summary", parts=pieces)


def _check_text(text: str, what: str) -> None:
    """Text must be valid Unicode: a lone surrogate (from a bad decode upstream) is refused
    here, with a message, rather than deep inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} holds a character that is not valid Unicode (a lone surrogate at position "
                         f"{exc.start}); decode the text with errors='replace' first") from None
