"""``OpenAICompatibleLM``: OPRM over a model behind an OpenAI-compatible server.

The selector talks to every model through the :class:`~oprm_rag.engine.Engine` seam.
Over a server, a "state" is a **token prefix** (:class:`PromptRows`): extending it by a
chunk or a question is concatenation, and only when the selector asks for the
first-answer-token distribution (``logits="last"``) do the rows go out, as concurrent
``/v1/completions`` requests for one token with log-probabilities. Decoding the answer
is a streamed completion of the winning prompt.

What this engine cannot do that the in-process one does (it is no ``StatefulEngine``):

* **decode from a stored state**: the server prefills the winning ``[P, C, Q]`` again
  for the answer (llama.cpp may reuse its slot's state when the same prompt was the
  last one that slot ran; vLLM's prefix cache helps transformers, not recurrent models);
* **cache question-independent chunk states** (``DocumentStateCache``, ``prepare()``):
  every question sends every ``[P, C_i, Q]`` in full;
* **the handoff** to a chat wrapper (there is no state in this process to hand off);
* the **question-likelihood criterion** (it needs every position's full logits).

Entropy comes from the top-k log-probabilities the server returns: exact where the whole
vocabulary comes back (llama.cpp ``n_probs``), an estimate with (low, high) bounds
otherwise (:mod:`oprm_rag.served.entropy`); ``SelectionResult.usage.entropy_exact``
says which.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

from ..decoding.stream import BaseTextStream
from ..engine import ChunkSize, Engine, EngineInfo, Extension, FirstTokens, LogitsWanted
from ..errors import OptionError
from ..decoding.config import Generation, GenerationConfig
from .client import Completed, CompletionStream, Scored, ServedClient
from .entropy import Tail, first_tokens_from_top, ids_of_pieces
from .errors import ContextOverflowError, ServerError, ServerResponseError, TokenIdsRejectedError
from .tokens import LocalTokens, ServerTokens, TokenSource, token_source

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import numpy as np

    from ..prompts import PromptTemplate
    from .published import PublishedFormat

__all__ = ["OpenAICompatibleLM", "PromptRows", "ServedGeneration", "ServedStats"]

logger = logging.getLogger("oprm_rag")

#: Most log-probabilities asked per token when the caller leaves it to us: the whole
#: vocabulary of small models (exact entropy), a bounded response for large ones
#: (each entry is ~100 bytes of JSON: 8,192 entries ~ 0.8 MB per chunk).
DEFAULT_TOP_LOGPROBS = 8192
_SYNTHETIC = 1 << 40  # ids this engine gives to tokens a server named only by text
PromptFormat = Literal["auto", "ids", "text"]
#: How servers refuse a prompt they cannot parse (llama-cpp-python's server: 500).
_REFUSAL_STATUS = (400, 415, 422, 500)
_UNASKED = object()
#: vLLM's refusal of ``logprobs=-1`` (the whole vocabulary) over its cap names both numbers.
_VOCAB_REFUSAL = re.compile(r"logprobs of (\d+),? which is greater than max allowed:? (\d+)", re.I)


class PromptRows:
    """A batch of token prefixes: the served engine's "states" (never mutated)."""

    __slots__ = ("rows",)

    def __init__(self, rows: Sequence[Sequence[int]]) -> None:
        self.rows: list[tuple[int, ...]] = [tuple(int(i) for i in r) for r in rows]

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"PromptRows({len(self.rows)} rows, {sum(len(r) for r in self.rows)} tokens)"


@dataclass
class ServedGeneration(Generation):
    """A completion from the server; ``completion_tokens`` is the server's own count.
    ``context_room``: the tokens the server's context left for the answer when fewer than
    ``max_new_tokens`` (then ``finish_reason`` is "context" if the answer filled them)."""

    server_completion_tokens: int | None = None
    context_room: int | None = None

    @property
    def completion_tokens(self) -> int:  # type: ignore[override]
        if self.server_completion_tokens is not None:
            return self.server_completion_tokens
        return len(self.token_ids)


@dataclass
class ServedStats:
    """What the server reported for the requests this engine sent (llama.cpp's own
    ``timings``/``usage``; None-valued fields of a server are counted as 0)."""

    scoring_requests: int = 0
    completion_requests: int = 0
    prompt_tokens: int = 0  # tokens sent in prompts
    evaluated_tokens: int = 0  # tokens the server actually ran (llama.cpp timings.prompt_n)
    cached_tokens: int = 0  # tokens the server reused from its prefix cache
    reported_evaluation: bool = False  # the server reported evaluated tokens at all

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ServedTextStream(BaseTextStream):
    """A streamed answer: iterate for text pieces; ``result`` is a :class:`ServedGeneration`."""

    def __init__(self, engine: "OpenAICompatibleLM", stream: CompletionStream, config: GenerationConfig,
                 prompt_tokens: int, room: int | None = None) -> None:
        self.engine = engine
        self._stream = stream
        self.config = config
        self.result = ServedGeneration("", [], "length", prompt_tokens, None, room)

    def _pieces(self) -> Iterator[str]:
        if self.config.max_new_tokens == 0:
            return
        try:
            for piece in self._stream:
                self.result.text += piece
                yield piece
        finally:
            done = self._stream.result
            self.result.text = done.text
            self.result.finish_reason = self.engine._finish(done.finish_reason, self.config, self.result.context_room,
                                                            done.completion_tokens)
            self.result.server_completion_tokens = done.completion_tokens
            self.engine._count(done, scoring=False)


class OpenAICompatibleLM(Engine):
    """A model behind an OpenAI-compatible server (vLLM, llama.cpp's llama-server,
    SGLang, Ollama), as an OPRM engine: ``OPRMSelector(OpenAICompatibleLM(...))``.

    Args:
        base_url: the server's OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model's name (None: the only one the server lists).
        api_key: sent as a bearer token (local servers take anything).
        tokenizer: a transformers tokenizer or a model/tokenizer folder with the model's
            own tokenizer: exact chunks, no tokenising round trips. Without it the
            server's ``/tokenize`` is used, else tiktoken approximately.
        max_concurrency: most requests in flight at once (one question's chunks are
            scored concurrently; spread over replicas by a load balancer).
        timeout: seconds for each whole request (its retries, its wait for a slot and a
            streamed answer's every byte included); max_retries: retries on 408/409/429/5xx
            and connection errors, with exponential backoff, while the timeout leaves time.
        top_logprobs: log-probabilities asked per token; None: the whole vocabulary
            where the server allows it, at most ``DEFAULT_TOP_LOGPROBS``.
        prompt: a ``PromptTemplate`` (default: the tokenizer folder's
            ``oprm_prompt.json``, else the chat or plain default).
        training_context: the context the model was trained on, for
            ``chunk_tokens="auto"`` (default: what the server reports).
        prompt_format: ``"ids"`` (token ids; fail clearly if refused), ``"text"``, or
            ``"auto"`` (ids, falling back to text with a warning if the server refuses
            them; ``usage.token_counting`` then says "approximate").
        entropy_tail: the estimate inside the top-k bounds (``"mid"``, ``"low"``, ``"high"``).
        cache_prompt: let llama.cpp resume a slot's state for a prompt that starts like one
            it ran (faster follow-ups and answers; on quantized models the resumed numbers
            can differ slightly from a full computation, see ``docs/served.md``).
    """

    # Not a StatefulEngine (states live on the server) nor a QuestionLikelihood (only the
    # next token's top log-probabilities come back); rows of any lengths: each is a request.

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 tokenizer: Any = None, max_concurrency: int = 8, timeout: float = 120.0, max_retries: int = 2,
                 top_logprobs: int | None = None, prompt: "PromptTemplate | str | Path | None" = None,
                 training_context: int | None = None, prompt_format: PromptFormat = "auto",
                 entropy_tail: Tail = "mid", cache_prompt: bool = True) -> None:
        if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int)
                                         or top_logprobs < 1):
            raise OptionError(f"top_logprobs must be a whole number >= 1 or None, got {top_logprobs!r}")
        if training_context is not None and (isinstance(training_context, bool)
                                             or not isinstance(training_context, int) or training_context < 1):
            raise OptionError(f"training_context must be a whole number >= 1 or None, got {training_context!r}")
        if prompt_format not in ("auto", "ids", "text"):
            raise OptionError(f"prompt_format must be 'auto', 'ids' or 'text', got {prompt_format!r}")
        if entropy_tail not in ("mid", "low", "high"):
            raise OptionError(f"entropy_tail must be 'mid', 'low' or 'high', got {entropy_tail!r}")
        self.client = ServedClient(base_url, model, api_key=api_key, timeout=timeout, max_retries=max_retries,
                                   max_concurrency=max_concurrency)
        self.client.cache_prompt = bool(cache_prompt)
        self.top_logprobs = top_logprobs
        self.training_context = training_context
        self.prompt_format: PromptFormat = prompt_format
        self.entropy_tail: Tail = entropy_tail
        # a tokenizer folder is loaded now: a wrong path fails here, not on the first question
        self._tokenizer_arg = (tokenizer if tokenizer is None or isinstance(tokenizer, TokenSource)
                               else LocalTokens(tokenizer))
        self._prompt_arg = prompt
        self._tokens: TokenSource | None = None
        self._prompt: "PromptTemplate | None" = None
        self._lock = threading.RLock()
        self._ids_accepted: bool | None = None if prompt_format != "text" else False
        self._text_fallback = False
        self._idk_words: dict[int, str] = {}
        self._synthetic: dict[str, int] = {}
        self._synthetic_text: dict[int, str] = {}
        self._pieces: dict[int, str] = {}  # id -> text, learnt from scoring answers
        self._published: Any = _UNASKED
        self._vocab_learnt: int | None = None  # the model's vocabulary, from the server's answers
        self._vocab_asked = False
        self._vocab_lock = threading.Lock()
        self.stats = ServedStats()

    # ------------------------------------------------------------------ identity
    def describe(self) -> EngineInfo:
        """The served model's facts as of now (vocabulary, limits and training length may be
        learned from the server on first use)."""
        return EngineInfo(name=self.name, identity=self.identity, prompt=self.prompt, auto_chunk=self.auto_chunk(),
                          vocab_size=self.vocab_size, position_limit=self.position_limit,
                          token_counting=self.token_counting, can_pad=True)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return self.client.model or self.client.base_url

    @property
    def tokens(self) -> TokenSource:
        """Where token ids come from (decided on first use: it may ask the server)."""
        with self._lock:
            if self._tokens is None:
                self._tokens = token_source(self._tokenizer_arg, self.client)
            return self._tokens

    @property
    def token_counting(self) -> str:  # type: ignore[override]
        if self._text_fallback:
            return "approximate"
        return self.tokens.counting

    @property
    def identity(self) -> str:
        key = f"{self.client.root_url}|{self.client.check_model()}|{self.tokens.fingerprint}"
        return "served-" + hashlib.blake2b(key.encode("utf-8"), digest_size=16).hexdigest()

    @property
    def prompt(self) -> "PromptTemplate":
        from ..prompts import PromptTemplate

        with self._lock:
            if self._prompt is None:
                arg = self._prompt_arg
                if isinstance(arg, PromptTemplate):
                    self._prompt = arg
                elif arg is not None:
                    self._prompt = PromptTemplate.from_file(arg)
                elif self.published_format is not None:
                    self._prompt = self.published_format.prompt
                else:
                    folder = getattr(self.tokens, "folder", None)
                    tok = getattr(self.tokens, "tokenizer", None)
                    if tok is None and self.apply_chat_template([{"role": "user", "content": "?"}]) is not None:
                        tok = _HasChatTemplate()  # the server renders chats (llama.cpp, vLLM)
                    self._prompt = PromptTemplate.for_model(folder, tok)
            return self._prompt

    @property
    def published_format(self) -> "PublishedFormat | None":
        """The OPRM prompt and training length the model's chat template publishes
        (:mod:`oprm_rag.served.published`), asked once: through the local tokenizer where
        one is given, else through the server. A ``tokenizer=`` folder's own
        ``oprm_prompt.json`` comes first."""
        from ..prompts import PROMPT_FILE
        from .published import PROBE_MESSAGES, PUBLISH_KWARG, parse_published

        with self._lock:
            if self._published is _UNASKED:
                folder = getattr(self.tokens, "folder", None)
                if folder is not None and (folder / PROMPT_FILE).is_file():
                    from .published import folder_format

                    self._published = folder_format(folder)
                else:
                    try:
                        rendered = self.tokens.chat_template(PROBE_MESSAGES, **{PUBLISH_KWARG: True})
                    except ServerResponseError as exc:  # an HTTP error after retries: the template, not the link
                        logger.warning("the server at %s failed to render its chat template's OPRM prompt (%s); "
                                       "using the chat or plain default prompt", self.client.base_url, exc)
                        rendered = None
                    except ServerError:
                        raise  # unreachable or timed out: a default prompt now could be the wrong one
                    except Exception as exc:  # a local template that cannot render the probe publishes nothing
                        logger.debug("the chat template did not render the OPRM prompt probe: %s", exc)
                        rendered = None
                    self._published = parse_published(rendered)
                    if self._published is not None:
                        logger.info("the model at %s publishes its OPRM prompt through its chat template",
                                    self.client.base_url)
            return self._published  # type: ignore[return-value]

    @property
    def position_limit(self) -> int | None:
        """The server's per-sequence context (llama.cpp: per slot; vLLM: max_model_len)."""
        return self.client.info().slot_context

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary: what the server lists (llama.cpp), the local tokenizer's,
        else learnt from the server on the first scoring request (vLLM's answer to
        ``logprobs=-1``, or its refusal, which names the size)."""
        return self.client.info().n_vocab or self.tokens.vocab_size or self._vocab_learnt

    def auto_chunk(self) -> ChunkSize:
        from ..capacity import DEFAULT_CHUNK, MIN_CHUNK

        trained, source = self.training_context, "training_context= (given)"
        folder = getattr(self.tokens, "folder", None)
        if trained is None and folder is not None:
            from .published import training_length

            trained, source = training_length(folder), f"the tokenizer= folder {folder}"
        if trained is None:
            trained, source = self.client.info().n_ctx_train, "the server's n_ctx_train"
        if trained is None and self.published_format is not None:
            trained = self.published_format.train_context_tokens
            source = "the model's chat template on the server"
        if trained:
            size = max(MIN_CHUNK, trained - min(64, trained // 8))
            return ChunkSize(size, f"served model: the state law needs the model's state size, which a server does not "
                                   f"report; using the {trained}-token training length from {source} ({size} after "
                                   "room for the prompt)")
        return ChunkSize(DEFAULT_CHUNK, "served model: no training length known (pass training_context=); using the "
                                        "paper's 2K default")

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        return self.tokens.encode(text)

    def encode_prefix(self, text: str, *, chat: bool = False) -> list[int]:
        return self.tokens.encode(text, add_special_tokens=not chat)

    def encode_with_offsets(self, text: str) -> tuple["np.ndarray", "np.ndarray"]:
        return self.tokens.encode_with_offsets(text)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if any(i >= _SYNTHETIC for i in ids):
            return "".join(self._synthetic_text.get(i, "") for i in ids)
        if len(ids) == 1 and ids[0] in self._pieces and not isinstance(self.tokens, LocalTokens):
            return self._pieces[ids[0]]  # the top token's text, as the server sent it: no round trip
        return self.tokens.decode(ids)

    def idk_token_ids(self, idk_word: str) -> frozenset[int]:
        if self.tokens.model_ids:
            from ..scoring import idk_token_ids

            return idk_token_ids(self.tokens, idk_word)
        # Approximate counting: the server's ids are unknown here, so IDK is decided on the
        # top token's text (a piece the IDK word starts with), under one id of our own.
        with self._lock:
            for sid, word in self._idk_words.items():
                if word == idk_word:
                    return frozenset({sid})
            sid = _SYNTHETIC + len(self._synthetic) + len(self._idk_words)
            self._idk_words[sid] = idk_word
            self._synthetic_text[sid] = idk_word
            return frozenset({sid})

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        return self.tokens.chat_template(messages)

    # ------------------------------------------------------------------ states
    def start(self, prefix_ids: Sequence[int]) -> Extension:
        return Extension(PromptRows([prefix_ids]), None)

    def extend(self, states: PromptRows, rows: Sequence[Sequence[int]], *,
               logits: LogitsWanted = "last") -> Extension:
        if not rows:
            raise ValueError("extend needs at least one row")
        if states is None:
            states = PromptRows([()])  # a sequence's start
        if not isinstance(states, PromptRows):
            raise TypeError(f"states of a served model are PromptRows, got {type(states).__name__}")
        if states.batch_size not in (1, len(rows)):
            raise ValueError(f"{states.batch_size} states for {len(rows)} rows")
        if any(len(r) == 0 for r in rows):
            raise ValueError("every row needs at least one token")
        base = states.rows * len(rows) if states.batch_size == 1 else states.rows
        new = PromptRows([b + tuple(int(i) for i in r) for b, r in zip(base, rows)])
        if logits == "none":
            return Extension(new, None)
        if logits == "all":
            raise OptionError(f"criterion='question_likelihood' needs every position's full logits; the served model "
                              f"{self.name} gives only the next token's top log-probabilities. "
                              "Use criterion='entropy'.")
        return Extension(new, self._score(new.rows))

    def select_states(self, states: PromptRows, rows: Sequence[int] | int) -> PromptRows:
        if isinstance(rows, int):
            return PromptRows([states.rows[rows]])
        return PromptRows([states.rows[int(i)] for i in rows])

    def cat_states(self, states: Sequence[PromptRows]) -> PromptRows:
        return PromptRows([r for s in states for r in s.rows])

    def row_logits(self, extension: Extension, row: int) -> Any:
        return None if extension.logits is None else extension.logits[row]

    def first_tokens(self, extension: Extension, idk_ids: frozenset[int]) -> FirstTokens:
        scored: list[Scored] = extension.logits
        if scored is None:
            raise ValueError("first_tokens needs an extension made with logits='last'")
        ids = [self._row_ids(s, idk_ids) for s in scored]
        return first_tokens_from_top([s.top for s in scored], ids, idk_ids, self.vocab_size, tail=self.entropy_tail,
                                     where=f"the server at {self.client.base_url}")

    # ------------------------------------------------------------------ scoring
    def _k(self) -> int:
        if self.top_logprobs is not None:
            return self.top_logprobs
        vocab = self.vocab_size
        k = min(vocab, DEFAULT_TOP_LOGPROBS) if vocab else DEFAULT_TOP_LOGPROBS
        return min(k, self.client.max_top_logprobs or k)  # the server's cap, where learnt

    def _wire(self, ids: Sequence[int]) -> list[int] | str:
        """A prompt as the server gets it: token ids, or text where ids cannot go."""
        if self._ids_accepted is False or not self.tokens.model_ids:
            return self.tokens.text_of(ids)
        return list(ids)

    def _score(self, rows: list[tuple[int, ...]]) -> list[Scored]:
        self._check_fits(rows, 1, "a scoring request")
        prompts = [self._wire(r) for r in rows]
        out: list[Scored] = []
        if rows and self._needs_vocab():
            first = self._learn_vocab(prompts[0])
            if first is not None:
                out.append(first)
                rows, prompts = rows[1:], prompts[1:]
        k = self._k()
        if self._ids_accepted is None and prompts and not isinstance(prompts[0], str):
            out.append(self._probe_ids(rows[0], prompts[0], k))
            rows, prompts = rows[1:], [self._wire(r) for r in rows[1:]]
        out += self.client.score_many(prompts, k)
        for s in out:
            self._count(s, scoring=True)
        return out

    def _needs_vocab(self) -> bool:
        return self.top_logprobs is None and not self._vocab_asked and self.vocab_size is None

    def _learn_vocab(self, prompt: list[int] | str) -> Scored | None:
        """Ask for the whole distribution once (``logprobs=-1``, vLLM's "all of it"), when
        nothing else says how large the vocabulary is. Accepted: the answer holds every
        token (it sums to 1), so its length is the vocabulary and it is this row's score.
        Refused over the cap: vLLM's message names the vocabulary and the cap
        ("Requested sample logprobs of 3072, which is greater than max allowed: 20").
        Refused otherwise: nothing learnt, and the usual request follows."""
        with self._vocab_lock:  # concurrent first questions wait for the one probe
            if self._vocab_asked:
                return None
            self._vocab_asked = True
            return self._ask_whole_vocabulary(prompt)

    def _ask_whole_vocabulary(self, prompt: list[int] | str) -> Scored | None:
        try:
            scored = self.client.score(prompt, -1)
        except ServerResponseError as exc:
            found = _VOCAB_REFUSAL.search(str(exc))
            if found and int(found.group(2)) < int(found.group(1)):
                with self._lock:
                    self._vocab_learnt = int(found.group(1))
                self.client.max_top_logprobs = int(found.group(2))
                logger.warning("%s allows at most %s of the model's %s log-probabilities per token; entropies are "
                               "estimates with bounds (start vLLM with --max-logprobs %s for exact ones)",
                               self.client.base_url, found.group(2), found.group(1), found.group(1))
            return None
        values = scored.top.logprobs
        distinct = len(set(scored.top.ids)) if scored.top.ids is not None else len(set(scored.top.pieces))
        mass = math.fsum(math.exp(v) for v in values) if values else 0.0
        if distinct != len(values) or len(values) < 2 or abs(mass - 1.0) > 1e-3:
            return None  # not the whole distribution: this server does not read -1 as vLLM does
        with self._lock:
            self._vocab_learnt = len(values)
            if not isinstance(prompt, str):
                self._ids_accepted = True
        if isinstance(self.tokens, ServerTokens):
            self.tokens.learnt_vocab_size = len(values)
        return scored

    def _check_fits(self, rows: Sequence[Sequence[int]], room: int, what: str) -> None:
        """Refuse, before sending, a prompt that leaves fewer than ``room`` positions of
        the server's per-sequence context (vLLM answers a prompt of exactly its context
        with "max_tokens must be at least 1": a context overflow, said as one)."""
        limit = self.position_limit
        if not limit or not self.tokens.model_ids or self._ids_accepted is False:
            return  # text prompts: the server's count is not ours
        longest = max((len(r) for r in rows), default=0)
        if longest + room > limit:
            raise ContextOverflowError(
                f"the server at {self.client.base_url} holds {limit} tokens per sequence; {what} of {longest} prompt "
                f"tokens leaves no room for {room} generated token{'s' if room != 1 else ''}. Use smaller "
                "chunk_tokens, or start the server with a larger context (llama.cpp: -c per slot x -np; vLLM: "
                "--max-model-len)")

    def _probe_ids(self, row: tuple[int, ...], prompt: list[int], k: int) -> Scored:
        """The first id prompt this engine sends: if the server refuses it but takes the
        same prompt as text, it does not take token ids."""
        try:
            scored = self.client.score(prompt, k)
        except ServerResponseError as exc:
            if exc.status_code not in _REFUSAL_STATUS:
                raise  # rate limits, overload: not a verdict on token ids
            try:
                scored = self.client.score(self.tokens.text_of(row), k)
            except Exception:
                raise exc from None
            if self.prompt_format == "ids":
                raise TokenIdsRejectedError(
                    f"the server at {self.client.base_url} refuses prompts given as token ids ({exc}) but takes "
                    "text; chunk boundaries can only be token-exact with ids. Pass prompt_format='auto' to send "
                    "text (approximate boundaries), or use a server that takes ids (vLLM, llama.cpp's "
                    "llama-server)") from exc
            logger.warning("the server at %s refuses token-id prompts; sending text instead: the server re-tokenises "
                           "each [P, C, Q], so chunk boundaries are approximate (usage.token_counting='approximate')",
                           self.client.base_url)
            with self._lock:
                self._ids_accepted = False
                self._text_fallback = True
            return scored
        with self._lock:
            self._ids_accepted = True
        return scored

    def _row_ids(self, scored: Scored, idk_ids: frozenset[int]) -> list[int]:
        """Each returned token's id in this engine's id space."""
        top = scored.top
        if self.tokens.model_ids and top.ids is not None:
            with self._lock:
                for i, piece in zip(top.ids[:1], top.pieces[:1]):
                    self._pieces.setdefault(i, piece)
            return top.ids
        if top.ids is None and isinstance(self.tokens, LocalTokens):  # text keys: the model's ids, or refused
            return ids_of_pieces(top.pieces, self.tokens.tokenizer, f"the server at {self.client.base_url}")
        if top.ids is None and self.tokens.model_ids:
            # Keyed by text only (a server without vLLM's return_tokens_as_token_ids): the top
            # token's id through the tokenizer, IDK tokens by their text, the rest need none.
            idk_text = {self.decode([i]): i for i in idk_ids}
            first = self.tokens.encode(top.pieces[0]) if top.pieces else []
            ids = [first[0] if len(first) == 1 else self._synthetic_id(top.pieces[0])] if top.pieces else []
            ids += [idk_text[p] if p in idk_text else self._synthetic_id(p) for p in top.pieces[1:]]
            return ids
        return [self._synthetic_id(p) for p in top.pieces]

    def _synthetic_id(self, piece: str) -> int:
        with self._lock:
            stripped = piece.strip()
            if stripped:
                for sid, word in self._idk_words.items():
                    if word.startswith(stripped):
                        return sid
            sid = self._synthetic.get(piece)
            if sid is None:
                sid = _SYNTHETIC + len(self._synthetic) + len(self._idk_words)
                self._synthetic[piece] = sid
                self._synthetic_text[sid] = piece
            return sid

    def _count(self, result: Scored | Completed, *, scoring: bool) -> None:
        with self._lock:
            st = self.stats
            if scoring:
                st.scoring_requests += 1
            else:
                st.completion_requests += 1
            st.prompt_tokens += result.prompt_tokens or 0
            if result.evaluated_tokens is not None:
                st.reported_evaluation = True
                st.evaluated_tokens += result.evaluated_tokens
            st.cached_tokens += result.cached_tokens or 0

    def reset_stats(self) -> ServedStats:
        """Return the counters so far and start new ones."""
        with self._lock:
            old, self.stats = self.stats, ServedStats()
        return old

    # ------------------------------------------------------------------ decoding
    def _finish(self, reason: str, config: GenerationConfig, room: int | None = None,
                completion_tokens: int | None = None) -> str:
        if reason == "stop":
            return "stop" if config.stop else "eos"  # the server does not say which; without stop strings, EOS
        if reason == "length" and room is not None and (completion_tokens is None or completion_tokens >= room):
            return "context"  # the server's context filled up before max_new_tokens
        return "length" if reason == "length" else reason

    def _room(self, row: Sequence[int], config: GenerationConfig) -> int | None:
        """The tokens the server can still generate after ``row`` when that is fewer than
        ``max_new_tokens`` (vLLM then shortens ``max_tokens`` without saying so; the
        answer's ``finish_reason`` is "context" if it ends there), else None."""
        limit = self.position_limit
        if not limit or not self.tokens.model_ids or self._ids_accepted is False:
            return None
        self._check_fits([row], 1, "the answer request")
        room = limit - len(row)
        if room >= config.max_new_tokens:
            return None
        logger.warning("the server at %s holds %d tokens per sequence: after the %d-token prompt the answer can have "
                       "at most %d of the %d tokens asked (finish_reason='context' if it gets there)",
                       self.client.base_url, limit, len(row), room, config.max_new_tokens)
        return room

    def stream(self, state: PromptRows, logits: Any, config: GenerationConfig, *,
               prompt_tokens: int = 0) -> ServedTextStream:
        if state.batch_size != 1:
            raise ValueError("stream decodes one sequence; use generate_batch for several")
        row = state.rows[0]
        room = self._room(row, config) if config.max_new_tokens else None
        return ServedTextStream(self, self.client.stream(self._wire(row), config), config, prompt_tokens or len(row),
                                room)

    def generate_batch(self, states: PromptRows, logits: Sequence[Any], config: GenerationConfig,
                       prompt_tokens: Sequence[int] | None = None) -> list[Generation]:
        if config.max_new_tokens == 0:
            return [ServedGeneration("", [], "length", len(r)) for r in states.rows]
        rooms = [self._room(r, config) for r in states.rows]
        done = self.client.complete_many([self._wire(r) for r in states.rows], config)
        out: list[Generation] = []
        for i, (row, c, room) in enumerate(zip(states.rows, done, rooms)):
            self._count(c, scoring=False)
            n = int(prompt_tokens[i]) if prompt_tokens is not None else len(row)
            out.append(ServedGeneration(c.text, [], self._finish(c.finish_reason, config, room, c.completion_tokens),
                                        n, c.completion_tokens, room))
        return out

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the HTTP connections and worker threads."""
        self.client.close()

    def __enter__(self) -> "OpenAICompatibleLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenAICompatibleLM({self.client.base_url!r}, model={self.client.model!r})"


class _HasChatTemplate:
    """Stands in for a tokenizer with a chat template when the server renders chats."""

    chat_template = "server"
