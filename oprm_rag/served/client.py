"""The HTTP layer: one OpenAI-compatible server, reached through the official ``openai`` client.

Why the official client: it builds requests the way the servers expect them, and parses
their streams (sync and async). This module adds what OPRM needs on top, and does itself
what the client does per attempt or per read where OPRM needs it per request:

* **one deadline per request** (:mod:`oprm_rag.served.deadline`): ``timeout`` bounds the
  whole request, retries and streams included, not each socket read (a server that
  trickles a byte at a time, or sends SSE comments forever, ends in
  :class:`ServerTimeoutError`);
* **retries** on 408, 409, 429, 5xx and dropped connections, with exponential backoff from
  0.5 s (jitter, at most 8 s), honouring ``Retry-After``/``retry-after-ms``, for every
  endpoint (``/v1/models`` too), and only while time is left;
* **bounded concurrency**: at most ``max_concurrency`` requests in flight from this client,
  whatever the thread (the pool's workers, first-use probes, streams, concurrent
  questions) or event loop they come from; one question's chunks go out concurrently so a
  load balancer spreads them over replicas;
* **token-id prompts** (vLLM and llama.cpp take ``prompt=[ids]``): chunk boundaries stay
  token-exact and the server's tokenizer never re-splits them;
* **log-probabilities in both dialects**: llama.cpp's ``n_probs`` (up to the whole
  vocabulary, keyed by token id, under ``logprobs.content``) and the OpenAI/vLLM
  ``logprobs=k`` (a dict per position keyed by token text, or ``token_id:N`` with vLLM's
  ``return_tokens_as_token_ids``), and the most the server allows (vLLM's
  ``--max-logprobs``: learnt from its refusal);
* **answers checked before use**: exactly the one choice asked for (matched by ``index``),
  log-probabilities a distribution can have (:func:`~oprm_rag.served.entropy.impossible_logprobs`;
  duplicate JSON keys are seen, not silently merged), a finish reason at the end of every
  completion and stream;
* the server's own endpoints outside ``/v1``: ``/tokenize``, ``/detokenize``, ``/props``,
  ``/apply-template``;
* **specific errors** (:mod:`oprm_rag.served.errors`) instead of transport exceptions, with
  response bodies clipped to a few hundred characters.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Sequence, TypeVar

from ..decoding.stream import BaseTextStream
from .deadline import bounded, http_client
from .entropy import TopLogprobs, _impossible, impossible_logprobs
from .errors import (
    ContextOverflowError,
    IncompleteAnswerError,
    ModelNotFoundError,
    NoLogprobsError,
    ServerError,
    ServerResponseError,
    ServerTimeoutError,
    ServerUnavailableError,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..decoding.config import GenerationConfig

__all__ = ["ServedClient", "ServerInfo", "Scored", "Completed", "CompletionStream", "RETRY_STATUS"]

logger = logging.getLogger("oprm_rag")

T = TypeVar("T")

_MAX_ALLOWED = re.compile(r"(?:max(?:imum)?(?: allowed)?|at most|<=)\D{0,20}?(\d+)", re.I)
_CONTEXT_WORDS = ("context length", "context size", "context_length", "exceed_context", "exceeds the available context",
                  "maximum context", "too long", "n_ctx")
#: TGI: "`inputs` tokens + `max_new_tokens` must be <= 2048. Given: ..." and
#: "`inputs` must have less than 1024 tokens. Given: 1500".
_CONTEXT_PATTERNS = (re.compile(r"inputs`?\s+tokens\s*\+\s*`?max_new_tokens`?\s+must\s+be\s*<=", re.I),
                     re.compile(r"inputs`?\s+must\s+have\s+less\s+than\s+\d+\s+tokens", re.I),
                     # vLLM, a prompt of exactly its context: it lowers max_tokens to the room left (#22, defect 4)
                     re.compile(r"max_tokens must be at least 1, got 0", re.I))
#: vLLM's answers once its engine process is gone (it exits right after): "EngineCore encountered an issue",
#: "EngineDeadError".
_ENGINE_DEAD = re.compile(r"EngineCore encountered an issue|EngineDeadError|engine (?:core )?(?:is )?dead", re.I)
#: HTTP statuses worth another attempt (the openai client's own choice).
RETRY_STATUS = frozenset({408, 409, 429})
_BACKOFF_START, _BACKOFF_MAX, _RETRY_AFTER_MAX = 0.5, 8.0, 60.0
#: Most characters of a server's answer quoted in an error message.
_QUOTE = 300


@dataclass(frozen=True)
class ServerInfo:
    """What the server says about itself (each field None where it does not say)."""

    kind: str  # "llama.cpp", "vllm", "sglang", "ollama" or "openai-compatible"
    models: tuple[str, ...]
    n_vocab: int | None = None
    n_ctx_train: int | None = None  # the context the model was trained on (llama.cpp: from the GGUF)
    slot_context: int | None = None  # most tokens one sequence may hold on this server
    total_slots: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class Scored:
    """One row scored: the next-token top log-probabilities and what the server reported."""

    top: TopLogprobs
    prompt_tokens: int | None = None  # usage.prompt_tokens
    evaluated_tokens: int | None = None  # llama.cpp timings.prompt_n: tokens it actually ran
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens


@dataclass
class Completed:
    """A finished completion (``finish_reason`` as the server said it: "stop", "length"...)."""

    text: str
    finish_reason: str
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    evaluated_tokens: int | None = None
    cached_tokens: int | None = None


def _root(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def clip(text: Any, limit: int = _QUOTE) -> str:
    """``text`` for an error message: at most ``limit`` characters, saying how long it was."""
    s = text if isinstance(text, str) else str(text)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s):,} characters in all)"


def _status_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return clip(err.get("message") or err)
        return clip(err)
    return clip(getattr(exc, "message", None) or exc)


def _check_options(timeout: Any, max_retries: Any, max_concurrency: Any) -> None:
    from ..errors import OptionError

    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise OptionError(f"max_concurrency must be a whole number >= 1, got {max_concurrency!r}")
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout)
            or timeout <= 0):
        raise OptionError(f"timeout must be a number of seconds > 0 (it bounds each whole request), got {timeout!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise OptionError(f"max_retries must be a whole number >= 0, got {max_retries!r}")


class ServedClient:
    """A model server at ``base_url`` (``http://host:port/v1``), for one ``model``.

    ``timeout`` is seconds per request, the whole of it (retries, waiting for a
    concurrency slot and streamed answers included); ``max_retries`` how often a failed
    attempt is retried (backoff 0.5 s doubling, with jitter, at most 8 s);
    ``max_concurrency`` the most requests in flight at once from this client.
    """

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 timeout: float = 120.0, max_retries: int = 2, max_concurrency: int = 8) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            from ..errors import OptionError

            raise OptionError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        _check_options(timeout, max_retries, max_concurrency)
        self.base_url = base_url.rstrip("/")
        self.root_url = _root(self.base_url)
        self.model = model
        self.api_key = api_key or "not-needed"  # local servers take any key; the client insists on one
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.max_concurrency = max_concurrency
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._client: Any = None
        self._aclient: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._info: ServerInfo | None = None
        self.max_top_logprobs: int | None = None  # learnt from the server's refusal (vLLM --max-logprobs)
        self.answered = False  # the server has listed its models (a refused connection after that: it died)
        #: llama.cpp ``cache_prompt``: let a slot reuse its state for a prompt that starts
        #: like the last one it ran (benchmarks turn it off to measure what it saves).
        self.cache_prompt = True

    @property
    def where(self) -> str:
        return f"the server at {self.base_url}"

    # ------------------------------------------------------------------ plumbing
    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    import openai
                except ImportError as exc:  # pragma: no cover - the [served] extra is missing
                    raise ServerError("served models need the 'openai' package: "
                                      "pip install 'oprm-rag[served]'") from exc
                # Retries are ours (one deadline across them); the socket operations honour it.
                self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout,
                                             max_retries=0, http_client=http_client(self.timeout))
            return self._client

    @property
    def aclient(self) -> Any:
        with self._lock:
            if self._aclient is None:
                import openai

                self._aclient = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key,
                                                   timeout=self.timeout, max_retries=0)
            return self._aclient

    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="oprm-served")
            return self._pool

    def close(self) -> None:
        """Close connections and the worker threads (the client can be used again after)."""
        with self._lock:
            pool, client, self._pool, self._client = self._pool, self._client, None, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if client is not None:
            client.close()

    def translate(self, exc: BaseException, what: str, attempts: int = 1) -> ServerError:
        """The specific :class:`ServerError` for a transport or HTTP failure."""
        import httpx
        import openai

        where = self.where
        if isinstance(exc, ServerError):
            return exc
        if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException, asyncio.TimeoutError, TimeoutError)):
            tries = f", {attempts} attempts" if attempts > 1 else ""
            return ServerTimeoutError(f"{where} did not finish {what} within {self.timeout:g} s (timeout= bounds the "
                                      f"whole request, streams included{tries}); raise timeout= or check the "
                                      "server's load")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            if self.answered:  # it was there and now is not (#22, defect 6)
                return ServerUnavailableError(
                    f"{where} answered before, but {what} found it gone ({type(cause).__name__}: {clip(cause)}): the "
                    "server has died or was stopped (vLLM exits when its engine process dies); check its log and "
                    "restart it")
            return ServerUnavailableError(f"cannot reach {where} ({type(cause).__name__}: {clip(cause)}); is the "
                                          "server running, and is base_url right (it ends in /v1)?")
        if isinstance(exc, httpx.TransportError):  # raised while a body or stream was being read
            return ServerResponseError(f"{where} broke off {what} ({type(exc).__name__}: {clip(exc)}); the answer "
                                       "is incomplete and was not used")
        if isinstance(exc, openai.APIStatusError):
            msg = _status_message(exc)
            low = msg.lower()
            err: ServerError
            if exc.status_code >= 500 and _ENGINE_DEAD.search(msg):  # vLLM, just before it exits (#22, defect 6)
                return ServerUnavailableError(f"{where} answered {what} with HTTP {exc.status_code}: its engine "
                                              f"process has died ({msg}); the server cannot answer any more: check "
                                              "its log and restart it")
            if exc.status_code == 404 and "model" in low:
                err = ModelNotFoundError(f"{where} does not serve model {self.model!r}: {msg}")
            elif any(w in low for w in _CONTEXT_WORDS) or any(p.search(msg) for p in _CONTEXT_PATTERNS):
                err = ContextOverflowError(f"{where} refused {what}: the prompt does not fit its context ({msg}). "
                                           "Use smaller chunk_tokens, or start the server with a larger context "
                                           "(llama.cpp: -c per slot x -np; vLLM: --max-model-len)")
            else:
                err = ServerResponseError(f"{where} answered {what} with HTTP {exc.status_code}: {msg}")
            err.status_code = exc.status_code  # type: ignore[attr-defined]
            return err
        return ServerResponseError(f"{where} failed on {what}: {type(exc).__name__}: {clip(exc)}")

    # ------------------------------------------------------------------ requests
    def _retry_delay(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds to wait before retrying after ``exc``, or None where a retry cannot help."""
        import httpx
        import openai

        if isinstance(exc, (ServerError, openai.APITimeoutError, httpx.TimeoutException)):
            return None  # our own verdicts, and timeouts (the deadline is spent)
        if isinstance(exc, openai.APIStatusError):
            if exc.status_code not in RETRY_STATUS and exc.status_code < 500:
                return None
            after = _retry_after(exc.response.headers if exc.response is not None else {})
            if after is not None:
                return after
        elif not isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
            return None
        return min(_BACKOFF_START * 2 ** attempt, _BACKOFF_MAX) * (1 - 0.25 * random.random())

    @contextmanager
    def _slot(self, deadline: float, what: str) -> Iterator[None]:
        """One of ``max_concurrency`` request slots, waited for until ``deadline``."""
        if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise self._no_slot(what)
        try:
            yield
        finally:
            self._slots.release()

    def _no_slot(self, what: str) -> ServerTimeoutError:
        return ServerTimeoutError(f"{what} for {self.base_url} waited {self.timeout:g} s (timeout=) for one of its "
                                  f"max_concurrency={self.max_concurrency} request slots; raise max_concurrency or "
                                  "timeout=")

    def _call(self, what: str, attempt_fn: Callable[[], T], *, deadline: float | None = None,
              take_slot: bool = True) -> T:
        """``attempt_fn()`` (one HTTP request) with retries, inside one deadline, each attempt
        holding a concurrency slot; failures as :class:`ServerError`."""
        _ = self.client  # made before the clock starts (it loads TLS certificates)
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        attempt = 0
        while True:
            try:
                with bounded(deadline):
                    if not take_slot:
                        return attempt_fn()
                    with self._slot(deadline, what):
                        return attempt_fn()
            except Exception as exc:
                delay = self._retry_delay(exc, attempt)
                if delay is None or attempt >= self.max_retries or delay >= deadline - time.monotonic():
                    raise self.translate(exc, what, attempt + 1) from exc
                logger.debug("%s: %s failed (%s); retrying in %.2f s", self.base_url, what, type(exc).__name__, delay)
                attempt += 1
                time.sleep(delay)

    async def _acall(self, what: str, attempt_fn: Callable[[], Any]) -> Any:
        """:meth:`_call` for async callers: ``attempt_fn()`` returns an awaitable."""
        _ = self.aclient  # made before the clock starts (it loads TLS certificates)
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            try:
                async with self._aslot(deadline, what):
                    return await asyncio.wait_for(attempt_fn(), max(1e-3, deadline - time.monotonic()))
            except Exception as exc:
                delay = self._retry_delay(exc, attempt)
                if delay is None or attempt >= self.max_retries or delay >= deadline - time.monotonic():
                    raise self.translate(exc, what, attempt + 1) from exc
                attempt += 1
                await asyncio.sleep(delay)

    @asynccontextmanager
    async def _aslot(self, deadline: float, what: str) -> AsyncIterator[None]:
        """A request slot for a coroutine: the same slots as sync callers use (polled, so the
        event loop never blocks and a cancelled wait takes nothing)."""
        while not self._slots.acquire(blocking=False):
            if time.monotonic() >= deadline:
                raise self._no_slot(what)
            await asyncio.sleep(0.002)
        try:
            yield
        finally:
            self._slots.release()

    # ------------------------------------------------------------------ server facts
    def _get_root(self, path: str) -> Any:
        """GET a server endpoint outside /v1 (JSON), or None where the server has none."""
        try:
            return self._call(f"GET {path}", lambda: self.client.with_options(base_url=self.root_url).get(
                path, cast_to=object))
        except ServerError as exc:
            if getattr(exc, "status_code", None) in (400, 404, 405, 501):
                return None
            raise

    def _post_root(self, path: str, body: dict[str, Any]) -> Any:
        return self._call(f"POST {path}", lambda: self.client.with_options(base_url=self.root_url).post(
            path, cast_to=object, body=body))

    def info(self, *, refresh: bool = False) -> ServerInfo:
        """The served models and limits (asked once, then remembered)."""
        if self._info is not None and not refresh:
            return self._info
        try:
            listing = self._call("GET /v1/models", lambda: self.client.get("/models", cast_to=object))
        except ServerError as exc:
            if getattr(exc, "status_code", None) not in (404, 405, 501):
                raise
            listing = None
        self.answered = True
        data = (listing or {}).get("data") or [] if isinstance(listing, dict) else []
        data = data if isinstance(data, list) else []
        models = tuple(str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id") is not None)
        first = next((m for m in data if isinstance(m, dict) and m.get("id") == self.model), data[0] if data else {})
        first = first if isinstance(first, dict) else {}
        owned = str(first.get("owned_by") or "").lower()
        meta = first.get("meta") if isinstance(first.get("meta"), dict) else {}
        props = self._get_root("/props") if (owned == "llamacpp" or meta) else None
        kind = ("llama.cpp" if (owned == "llamacpp" or props) else "vllm" if owned == "vllm" else
                "sglang" if owned == "sglang" else "ollama" if owned in ("library", "ollama") else "openai-compatible")
        slot = None
        total_slots = None
        if isinstance(props, dict):
            settings = props.get("default_generation_settings") or {}
            slot = settings.get("n_ctx") or props.get("n_ctx")
            total_slots = props.get("total_slots")
        slot = slot or first.get("max_model_len")
        info = ServerInfo(kind=kind, models=models, n_vocab=_int(meta.get("n_vocab")),
                          n_ctx_train=_int(meta.get("n_ctx_train")), slot_context=_int(slot),
                          total_slots=_int(total_slots), raw={"models": listing, "props": props})
        self._info = info
        return info

    def check_model(self) -> str:
        """The model name to send: the one given if the server serves it, else the only
        one it serves; a wrong name raises :class:`ModelNotFoundError` listing the others."""
        info = self.info()
        if self.model is None:
            if len(info.models) == 1:
                self.model = info.models[0]
            elif not info.models:
                raise ModelNotFoundError(f"the server at {self.base_url} lists no models and none was given; "
                                         "pass model=")
            else:
                raise ModelNotFoundError(f"the server at {self.base_url} serves {clip(list(info.models))}; pass "
                                         "model= with one of them")
        elif info.models and self.model not in info.models:
            raise ModelNotFoundError(f"the server at {self.base_url} does not serve model {self.model!r}; it serves "
                                     f"{clip(list(info.models))}")
        return self.model

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, *, add_special: bool = False, with_pieces: bool = False
                 ) -> tuple[list[int], list[bytes] | None] | None:
        """The server's token ids for ``text`` (and each token's bytes where it says), or
        None when it has no ``/tokenize`` endpoint."""
        body = {"content": text, "prompt": text, "add_special": add_special, "add_special_tokens": add_special,
                "with_pieces": with_pieces}
        if self.model:
            body["model"] = self.model
        try:
            out = self._post_root("/tokenize", body)
        except ServerError as exc:
            if getattr(exc, "status_code", None) in (404, 405, 501):
                return None
            raise
        tokens = out.get("tokens") if isinstance(out, dict) else None
        if not isinstance(tokens, list):
            raise ServerResponseError(f"the server at {self.base_url} answered /tokenize without a token list")
        try:
            if tokens and isinstance(tokens[0], dict):  # llama.cpp with_pieces: [{"id", "piece"}]
                ids = [_token_id(t["id"]) for t in tokens]
                pieces = [bytes(p) if isinstance(p, list) else str(p).encode("utf-8")
                          for p in (t["piece"] for t in tokens)]
                return ids, pieces
            return [_token_id(t) for t in tokens], None
        except (KeyError, TypeError, ValueError) as exc:
            raise ServerResponseError(f"the server at {self.base_url} answered /tokenize with an unreadable token "
                                      f"list ({type(exc).__name__}: {clip(exc)}): {clip(tokens)}") from None

    def detokenize(self, ids: Sequence[int]) -> str:
        body: dict[str, Any] = {"tokens": [int(i) for i in ids]}
        if self.model:
            body["model"] = self.model
        out = self._post_root("/detokenize", body)
        if isinstance(out, dict):
            for key in ("content", "prompt", "text"):
                if isinstance(out.get(key), str):
                    return out[key]
        raise ServerResponseError(f"the server at {self.base_url} answered /detokenize without text")

    def apply_template(self, messages: list[dict[str, str]]) -> str | None:
        """llama.cpp's ``/apply-template``: the chat template applied to ``messages``."""
        try:
            out = self._post_root("/apply-template", {"messages": messages})
        except ServerError as exc:
            if getattr(exc, "status_code", None) is not None:  # any refusal: no template there
                return None
            raise
        return out.get("prompt") if isinstance(out, dict) and isinstance(out.get("prompt"), str) else None

    # ------------------------------------------------------------------ scoring
    def _score_body(self, k: int) -> dict[str, Any]:
        # n_probs: llama.cpp (whole vocabulary allowed, keyed by id); logprobs=k: OpenAI/vLLM.
        # cache_prompt lets llama.cpp reuse a slot's state; return_tokens_as_token_ids makes
        # vLLM key its top tokens by id. Servers ignore the fields they do not know.
        return {"n_probs": k, "cache_prompt": self.cache_prompt, "return_tokens_as_token_ids": True,
                "post_sampling_probs": False}

    def _score_args(self, model: str, prompt: Sequence[int] | str, k: int) -> dict[str, Any]:
        return {"model": model, "prompt": prompt if isinstance(prompt, str) else [int(i) for i in prompt],
                "max_tokens": 1, "temperature": 0.0, "logprobs": k, "extra_body": self._score_body(k)}

    def _learn_cap(self, err: ServerError, k_now: int) -> bool:
        """True when ``err`` is a refusal of ``k_now`` log-probabilities that names a lower cap."""
        allowed = _allowed_logprobs(err.__cause__)
        if allowed is None or allowed >= k_now:
            return False
        if self.max_top_logprobs != allowed:
            logger.warning("%s allows at most %d log-probabilities per token (asked %d); entropies are estimates "
                           "with bounds", self.base_url, allowed, k_now)
        self.max_top_logprobs = allowed
        return True

    def score(self, prompt: Sequence[int] | str, k: int) -> Scored:
        """The top-``k`` next-token log-probabilities after ``prompt`` (one output token,
        temperature 0). Lowers ``k`` to what the server allows when it refuses more."""
        model = self.check_model()
        for _ in range(3):
            k_now = min(k, self.max_top_logprobs or k)
            args = self._score_args(model, prompt, k_now)

            def once() -> Scored:
                raw = self.client.completions.with_raw_response.create(**args)
                return _parse_scored(_loads(raw.text, self.base_url), self.base_url)

            try:
                return self._call("a scoring request", once)
            except ServerError as err:
                if not self._learn_cap(err, k_now):
                    raise
        raise ServerResponseError(f"the server at {self.base_url} kept refusing the number of log-probabilities")

    def score_many(self, prompts: Sequence[Sequence[int] | str], k: int) -> list[Scored]:
        """Score every prompt, at most ``max_concurrency`` in flight; the first failure
        cancels the rest and raises (no partial result)."""
        return self.map(lambda p: self.score(p, k), prompts, "scoring request")

    def map(self, fn: Any, items: Sequence[Any], what: str) -> list[Any]:
        """``fn`` over ``items`` on the bounded pool, in order; fail fast and say how far it got."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        futures: list[Future] = [self.pool.submit(fn, x) for x in items]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is None:
            return [f.result() for f in futures]
        for f in pending:
            f.cancel()
        finished = sum(1 for f in futures if f.done() and not f.cancelled() and f.exception() is None)
        exc = failed.exception()
        assert exc is not None
        err = exc if isinstance(exc, ServerError) else self.translate(exc, f"a {what}")
        raise _with_note(err, f" [{finished} of {len(items)} {what}s had finished; the batch was abandoned and "
                              "nothing was selected]") from exc

    # ------------------------------------------------------------------ completions
    def _completion_args(self, prompt: Sequence[int] | str, cfg: "GenerationConfig") -> dict[str, Any]:
        extra: dict[str, Any] = {"cache_prompt": self.cache_prompt}
        if cfg.top_k is not None:
            extra["top_k"] = cfg.top_k
        if not cfg.stop_at_eos:
            extra["ignore_eos"] = True
        args: dict[str, Any] = {"model": self.check_model(),
                                "prompt": prompt if isinstance(prompt, str) else [int(i) for i in prompt],
                                "max_tokens": cfg.max_new_tokens, "temperature": float(cfg.temperature),
                                "extra_body": extra}
        if cfg.top_p is not None:
            args["top_p"] = cfg.top_p
        if cfg.seed is not None:
            args["seed"] = cfg.seed
        if cfg.stop:
            args["stop"] = list(cfg.stop)
        return args

    def complete(self, prompt: Sequence[int] | str, cfg: "GenerationConfig") -> Completed:
        """One whole completion (summary mode)."""
        args = self._completion_args(prompt, cfg)

        def once() -> Completed:
            raw = self.client.completions.with_raw_response.create(**args)
            return _parse_completed(_loads(raw.text, self.base_url), self.base_url)

        return self._call("a completion request", once)

    def complete_many(self, prompts: Sequence[Sequence[int] | str], cfg: "GenerationConfig") -> list[Completed]:
        return self.map(lambda p: self.complete(p, cfg), prompts, "completion request")

    def stream(self, prompt: Sequence[int] | str, cfg: "GenerationConfig") -> "CompletionStream":
        """A streamed completion: iterate for text pieces; ``result`` at the end."""
        return CompletionStream(self, prompt, cfg)

    # ------------------------------------------------------------------ async
    async def ascore_many(self, prompts: Sequence[Sequence[int] | str], k: int) -> list[Scored]:
        """``score_many`` for async callers: ``AsyncOpenAI``, at most ``max_concurrency``
        requests in flight (shared with sync callers); the first failure cancels the rest."""
        model = self.check_model()

        async def one(prompt: Sequence[int] | str) -> Scored:
            for _ in range(3):
                k_now = min(k, self.max_top_logprobs or k)
                args = self._score_args(model, prompt, k_now)

                async def once() -> Scored:
                    raw = await self.aclient.completions.with_raw_response.create(**args)
                    return _parse_scored(_loads(raw.text, self.base_url), self.base_url)

                try:
                    return await self._acall("a scoring request", once)
                except ServerError as err:
                    if not self._learn_cap(err, k_now):
                        raise
            raise ServerResponseError(f"the server at {self.base_url} kept refusing the number of log-probabilities")

        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    async def astream(self, prompt: Sequence[int] | str, cfg: "GenerationConfig") -> Any:
        """Async iterator of text pieces of a streamed completion (one deadline for all of it)."""
        what = "a streamed completion"
        args = self._completion_args(prompt, cfg)
        _ = self.aclient  # made before the clock starts
        deadline = time.monotonic() + self.timeout
        finish = _Finish(self.base_url)
        async with self._aslot(deadline, what):
            stream = await self._acall(what, lambda: self.aclient.completions.create(stream=True, **args))
            try:
                it = stream.__aiter__()
                while True:
                    try:
                        chunk = await asyncio.wait_for(it.__anext__(), max(1e-3, deadline - time.monotonic()))
                    except StopAsyncIteration:
                        break
                    except ServerError:
                        raise
                    except Exception as exc:
                        raise self.translate(exc, what) from exc
                    for piece in finish.take(chunk):
                        yield piece
                finish.check()
            finally:
                await stream.close()


class _Finish:
    """What a stream said so far: its text, finish reason and counts; refuses chunks for
    choices other than the one asked for."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.result = Completed("", "")

    def take(self, chunk: Any) -> list[str]:
        out = []
        for choice in getattr(chunk, "choices", None) or []:
            index = getattr(choice, "index", None)
            if index != 0:
                raise ServerResponseError(f"the server at {self.base_url} streamed a piece for choice {index!r} "
                                          "where one prompt was sent (index 0 only); refused")
            text = getattr(choice, "text", None)
            if text:
                if not isinstance(text, str):
                    raise ServerResponseError(f"the server at {self.base_url} streamed a piece that is not text: "
                                              f"{clip(text)}")
                self.result.text += text
                out.append(text)
            if getattr(choice, "finish_reason", None):
                self.result.finish_reason = str(choice.finish_reason)
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self.result.completion_tokens = _int(getattr(usage, "completion_tokens", None))
            self.result.prompt_tokens = _int(getattr(usage, "prompt_tokens", None))
        extra = getattr(chunk, "model_extra", None) or {}
        timings = extra.get("timings")
        if isinstance(timings, dict):
            self.result.evaluated_tokens = _int(timings.get("prompt_n"))
            if self.result.completion_tokens is None:
                self.result.completion_tokens = _int(timings.get("predicted_n"))
        return out

    def check(self) -> None:
        """At the stream's end: it must have said why it stopped."""
        if not self.result.finish_reason:
            err = IncompleteAnswerError(
                f"the server at {self.base_url} ended a streamed answer without a finish reason after "
                f"{len(self.result.text):,} characters: the answer may be cut off (a dropped connection, a proxy "
                "timeout, a crashed server), so it is not passed off as complete")
            err.partial_text = self.result.text
            raise err


class CompletionStream(BaseTextStream):
    """A streamed completion of one prompt: iterate for text; ``result`` (a
    :class:`Completed`) once the stream ends. ``close()`` stops it early.

    The stream holds one of the client's request slots while it runs, and ``timeout``
    bounds it from its first request to its last byte. A stream that ends without a
    finish reason raises :class:`IncompleteAnswerError` (after yielding what arrived)."""

    def __init__(self, client: ServedClient, prompt: Sequence[int] | str, cfg: "GenerationConfig") -> None:
        self.client = client
        self.prompt = prompt
        self.cfg = cfg
        self._finish = _Finish(client.base_url)
        self._stream: Any = None

    @property
    def result(self) -> Completed:  # type: ignore[override]
        return self._finish.result

    def _pieces(self) -> Iterator[str]:
        c = self.client
        what = "a streamed completion"
        args = c._completion_args(self.prompt, self.cfg)
        _ = c.client  # made before the clock starts
        deadline = time.monotonic() + c.timeout
        with c._slot(deadline, what):
            try:
                self._stream = c._call(what, lambda: c.client.completions.create(
                    stream=True, stream_options={"include_usage": True}, **args), deadline=deadline, take_slot=False)
                it = iter(self._stream)
                while True:
                    try:
                        with bounded(deadline):
                            chunk = next(it)
                    except StopIteration:
                        break
                    except ServerError:
                        raise
                    except Exception as exc:
                        raise c.translate(exc, what) from exc
                    yield from self._finish.take(chunk)
                self._finish.check()
            finally:
                if self._stream is not None:
                    self._stream.close()


# ---------------------------------------------------------------------- parsing
def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _token_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"token id {value!r} is not a whole number")
    return value


def _with_note(err: ServerError, note: str) -> ServerError:
    """``err`` again with ``note`` added to its message (same class and fields)."""
    new = type(err)(f"{err}{note}")
    new.__dict__.update(err.__dict__)
    return new


def _retry_after(headers: Any) -> float | None:
    """Seconds a server asked to wait (``retry-after-ms`` or ``Retry-After`` in seconds or as
    a date), at most a minute; None where it did not say."""
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return min(max(float(ms) / 1000, 0.0), _RETRY_AFTER_MAX)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            seconds = when.timestamp() - time.time()
        return min(max(seconds, 0.0), _RETRY_AFTER_MAX)
    except (TypeError, ValueError, OverflowError):
        return None


def _allowed_logprobs(exc: Any) -> int | None:
    """The most log-probabilities a server allows, from its refusal (vLLM: "... greater
    than max allowed: 20"), or None when the refusal is about something else."""
    if getattr(exc, "status_code", None) not in (400, 422):
        return None
    msg = _status_message(exc)
    if "logprob" not in msg.lower():
        return None
    found = _MAX_ALLOWED.search(msg)
    return int(found.group(1)) if found else None


class _Pairs(dict):
    """A JSON object that had a key more than once (``duplicates``): ``json`` would keep the
    last silently, so a top list with a token twice would look like a valid one."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    dup = _Pairs(out)
    seen: set[str] = set()
    dup.duplicates = [k for k, _ in pairs if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
    return dup


def _duplicate_key(obj: Any) -> str | None:
    """A key that some JSON object inside ``obj`` had twice, or None."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, _Pairs):
            return item.duplicates[0]
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_object)
    except ValueError as exc:
        raise ServerResponseError(f"the server at {where} answered with something that is not JSON ({exc}): "
                                  f"{clip(text)}") from None


def _usage_numbers(data: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    timings = data.get("timings") if isinstance(data.get("timings"), dict) else {}
    return _int(usage.get("prompt_tokens")), _int(timings.get("prompt_n")), _int(details.get("cached_tokens"))


def _only_choice(data: Any, where: str, what: str) -> dict[str, Any]:
    """The choice of the one prompt sent: exactly one choice, with ``index`` 0. A proxy that
    reorders choices, drops one or adds one would otherwise hand over another prompt's answer."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ServerResponseError(f"the server at {where} answered {what} without choices: {clip(data)}")
    indexes = [c.get("index") if isinstance(c, dict) else None for c in choices]
    if len(choices) != 1 or indexes != [0] or isinstance(indexes[0], bool):
        raise ServerResponseError(f"the server at {where} answered {what} with choices of index {clip(indexes)} "
                                  "where one prompt was sent (exactly one choice, index 0, was asked for); refused, "
                                  "since it may be another prompt's answer")
    return choices[0]


def _parse_scored(data: Any, where: str) -> Scored:
    """The first generated position's top log-probabilities, in either dialect, checked."""
    choice = _only_choice(data, where, "a scoring request")
    lp = choice.get("logprobs")
    missing = NoLogprobsError(
        f"the server at {where} returned no log-probabilities, so chunks cannot be scored. It must support "
        "`logprobs` on /v1/completions (vLLM: start it with --max-logprobs; llama.cpp's llama-server does; "
        "llama-cpp-python's server needs --logits_all)")
    if not isinstance(lp, dict):
        raise missing
    server = f"the server at {where}"
    twice = _duplicate_key(choice)
    if twice is not None:
        raise _impossible(server, f"the key {clip(twice, 60)!r} twice in one JSON object (a top list with a token "
                                  "twice, or an entry with two values: which one counts?)")
    try:
        ids: list[int] | None
        if isinstance(lp.get("content"), list):  # llama.cpp: [{id, token, logprob, top_logprobs: [{id, ...}]}]
            if not lp["content"] or not isinstance(lp["content"][0], dict):
                raise missing
            tops = lp["content"][0].get("top_logprobs") or []
            if not isinstance(tops, list) or not tops:
                raise missing
            if not all(isinstance(t, dict) and "logprob" in t for t in tops):
                raise ValueError("a top_logprobs entry without a logprob")
            values = [_logprob(t["logprob"]) for t in tops]
            with_id = sum("id" in t for t in tops)
            if 0 < with_id < len(tops):
                raise ValueError(f"{with_id} of {len(tops)} top_logprobs entries have an id")
            ids = [_token_id(t["id"]) for t in tops] if with_id else None
            pieces = [_piece(t) for t in tops]
        elif isinstance(lp.get("top_logprobs"), list):  # OpenAI legacy / vLLM: [{token: logprob}]
            first = lp["top_logprobs"][0] if lp["top_logprobs"] else None
            if not isinstance(first, dict) or not first:
                raise missing
            items = list(first.items())
            values = [_logprob(v) for _, v in items]
            keyed = [k.startswith("token_id:") and k[9:].lstrip("-").isdigit() for k, _ in items]
            if any(keyed) and not all(keyed):
                raise ValueError(f"{sum(keyed)} of {len(keyed)} top tokens keyed token_id:N, the rest by text")
            ids = [int(k[9:]) for k, _ in items] if all(keyed) else None
            pieces = ["" if ids is not None else k for k, _ in items]
        else:
            raise missing
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ServerResponseError(f"{server} answered a scoring request with unreadable log-probabilities "
                                  f"({type(exc).__name__}: {clip(exc)})") from None
    top = TopLogprobs(ids, pieces, values)
    problem = impossible_logprobs(top)
    if problem is not None:
        raise _impossible(server, problem)
    order = sorted(range(len(values)), key=lambda i: -values[i])
    top = TopLogprobs(None if ids is None else [ids[i] for i in order], [pieces[i] for i in order],
                      [values[i] for i in order])
    prompt_tokens, evaluated, cached = _usage_numbers(data)
    return Scored(top, prompt_tokens, evaluated, cached)


def _logprob(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"log-probability {value!r} is not a number")
    return float(value)


def _piece(entry: dict[str, Any]) -> str:
    raw = entry.get("bytes")
    if isinstance(raw, list):
        return bytes(raw).decode("utf-8", errors="replace")
    return str(entry.get("token", ""))


def _parse_completed(data: Any, where: str) -> Completed:
    choice = _only_choice(data, where, "a completion request")
    reason = choice.get("finish_reason")
    text = choice.get("text")
    if not reason or not isinstance(text, (str, type(None))):
        err = IncompleteAnswerError(f"the server at {where} answered a completion request without a finish reason "
                                    f"(or without text): {clip(data)}; the answer may be cut off, so it was not used")
        err.partial_text = text if isinstance(text, str) else ""
        raise err
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt_tokens, evaluated, cached = _usage_numbers(data)
    return Completed(text or "", str(reason), _int(usage.get("completion_tokens")), prompt_tokens, evaluated, cached)
