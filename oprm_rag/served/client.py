"""The HTTP layer: one OpenAI-compatible server, reached through the official ``openai`` client.

Why the official client: it already does what a production caller needs, the way the
servers expect it (timeouts; retries with exponential backoff and jitter on 408, 409,
429 and 5xx, honouring ``Retry-After``; streaming; sync and async). This module adds
what OPRM needs on top:

* **bounded concurrency**: one question's chunks go out as concurrent requests, at most
  ``max_concurrency`` at a time (a thread pool for sync callers, a semaphore for async
  ones), so a deployment with several replicas behind a load balancer spreads them;
* **token-id prompts** (vLLM and llama.cpp take ``prompt=[ids]``): chunk boundaries stay
  token-exact and the server's tokenizer never re-splits them;
* **log-probabilities in both dialects**: llama.cpp's ``n_probs`` (up to the whole
  vocabulary, keyed by token id, under ``logprobs.content``) and the OpenAI/vLLM
  ``logprobs=k`` (a dict per position keyed by token text, or ``token_id:N`` with vLLM's
  ``return_tokens_as_token_ids``), and the most the server allows (vLLM's
  ``--max-logprobs``: learnt from its refusal);
* the server's own endpoints outside ``/v1``: ``/tokenize``, ``/detokenize``, ``/props``,
  ``/apply-template``;
* **specific errors** (:mod:`oprm_rag.served.errors`) instead of transport exceptions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from .entropy import TopLogprobs
from .errors import (
    ContextOverflowError,
    ModelNotFoundError,
    NoLogprobsError,
    ServerError,
    ServerResponseError,
    ServerTimeoutError,
    ServerUnavailableError,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..generation import GenerationConfig

__all__ = ["ServedClient", "ServerInfo", "Scored", "Completed", "CompletionStream"]

logger = logging.getLogger("oprm_rag")

_MAX_ALLOWED = re.compile(r"(?:max(?:imum)?(?: allowed)?|at most|<=)\D{0,20}?(\d+)", re.I)
_CONTEXT_WORDS = ("context length", "context size", "context_length", "exceed_context", "exceeds the available context",
                  "maximum context", "too long", "n_ctx")


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
    """A finished completion."""

    text: str
    finish_reason: str
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    evaluated_tokens: int | None = None
    cached_tokens: int | None = None


def _root(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _status_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(getattr(exc, "message", None) or exc)


class ServedClient:
    """A model server at ``base_url`` (``http://host:port/v1``), for one ``model``.

    ``timeout`` is seconds per request; ``max_retries`` how often the openai client
    retries a failed one (backoff 0.5 s doubling, with jitter, at most 8 s).
    """

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 timeout: float = 120.0, max_retries: int = 2, max_concurrency: int = 8) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            from ..errors import OptionError

            raise OptionError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            from ..errors import OptionError

            raise OptionError(f"max_concurrency must be a whole number >= 1, got {max_concurrency!r}")
        self.base_url = base_url.rstrip("/")
        self.root_url = _root(self.base_url)
        self.model = model
        self.api_key = api_key or "not-needed"  # local servers take any key; the client insists on one
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.max_concurrency = max_concurrency
        self._lock = threading.Lock()
        self._client: Any = None
        self._aclient: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._info: ServerInfo | None = None
        self.max_top_logprobs: int | None = None  # learnt from the server's refusal (vLLM --max-logprobs)
        #: llama.cpp ``cache_prompt``: let a slot reuse its state for a prompt that starts
        #: like the last one it ran (benchmarks turn it off to measure what it saves).
        self.cache_prompt = True

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
                self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout,
                                             max_retries=self.max_retries)
            return self._client

    @property
    def aclient(self) -> Any:
        with self._lock:
            if self._aclient is None:
                import openai

                self._aclient = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key,
                                                   timeout=self.timeout, max_retries=self.max_retries)
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

    def translate(self, exc: BaseException, what: str) -> ServerError:
        """The specific :class:`ServerError` for a transport or HTTP failure."""
        import openai

        where = f"the server at {self.base_url}"
        if isinstance(exc, ServerError):
            return exc
        if isinstance(exc, openai.APITimeoutError):
            return ServerTimeoutError(f"{where} did not answer {what} within {self.timeout:g} s (after "
                                      f"{self.max_retries} retries); raise timeout= or check the server's load")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return ServerUnavailableError(f"cannot reach {where} ({type(cause).__name__}: {cause}); is the server "
                                          f"running, and is base_url right (it ends in /v1)?")
        if isinstance(exc, openai.APIStatusError):
            msg = _status_message(exc)
            low = msg.lower()
            if exc.status_code == 404 and "model" in low:
                return ModelNotFoundError(f"{where} does not serve model {self.model!r}: {msg}")
            if any(w in low for w in _CONTEXT_WORDS):
                return ContextOverflowError(f"{where} refused {what}: the prompt does not fit its context ({msg}). "
                                            "Use smaller chunk_tokens, or start the server with a larger context "
                                            "(llama.cpp: -c per slot x -np; vLLM: --max-model-len)")
            err = ServerResponseError(f"{where} answered {what} with HTTP {exc.status_code}: {msg}")
            err.status_code = exc.status_code
            return err
        return ServerResponseError(f"{where} failed on {what}: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ server facts
    def _get_root(self, path: str) -> Any:
        """GET a server endpoint outside /v1 (JSON), or None where the server has none."""
        import openai

        try:
            return self.client.with_options(base_url=self.root_url, max_retries=0).get(path, cast_to=object)
        except openai.NotFoundError:
            return None
        except openai.APIStatusError as exc:
            if exc.status_code in (400, 404, 405, 501):
                return None
            raise self.translate(exc, f"GET {path}") from exc
        except Exception as exc:
            raise self.translate(exc, f"GET {path}") from exc

    def _post_root(self, path: str, body: dict[str, Any]) -> Any:
        try:
            return self.client.with_options(base_url=self.root_url).post(path, cast_to=object, body=body)
        except Exception as exc:
            raise self.translate(exc, f"POST {path}") from exc

    def info(self, *, refresh: bool = False) -> ServerInfo:
        """The served models and limits (asked once, then remembered)."""
        if self._info is not None and not refresh:
            return self._info
        try:
            listing = self.client.with_options(max_retries=0).get("/models", cast_to=object)
        except Exception as exc:
            import openai

            if isinstance(exc, openai.APIStatusError) and exc.status_code in (404, 405, 501):
                listing = None
            else:
                raise self.translate(exc, "GET /v1/models") from exc
        data = (listing or {}).get("data") or [] if isinstance(listing, dict) else []
        models = tuple(str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id") is not None)
        first = next((m for m in data if isinstance(m, dict) and m.get("id") == self.model), data[0] if data else {})
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
                raise ModelNotFoundError(f"the server at {self.base_url} serves {list(info.models)}; pass model= "
                                         "with one of them")
        elif info.models and self.model not in info.models:
            raise ModelNotFoundError(f"the server at {self.base_url} does not serve model {self.model!r}; it serves "
                                     f"{list(info.models)}")
        return self.model

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, *, add_special: bool = False, with_pieces: bool = False
                 ) -> tuple[list[int], list[bytes] | None] | None:
        """The server's token ids for ``text`` (and each token's bytes where it says), or
        None when it has no ``/tokenize`` endpoint."""
        import openai

        body = {"content": text, "prompt": text, "add_special": add_special, "add_special_tokens": add_special,
                "with_pieces": with_pieces}
        if self.model:
            body["model"] = self.model
        try:
            out = self.client.with_options(base_url=self.root_url).post("/tokenize", cast_to=object, body=body)
        except openai.APIStatusError as exc:
            if exc.status_code in (404, 405, 501):
                return None
            raise self.translate(exc, "POST /tokenize") from exc
        except Exception as exc:
            raise self.translate(exc, "POST /tokenize") from exc
        tokens = out.get("tokens") if isinstance(out, dict) else None
        if not isinstance(tokens, list):
            raise ServerResponseError(f"the server at {self.base_url} answered /tokenize without a token list")
        if tokens and isinstance(tokens[0], dict):  # llama.cpp with_pieces: [{"id", "piece"}]
            ids = [int(t["id"]) for t in tokens]
            pieces = [bytes(p) if isinstance(p, list) else str(p).encode("utf-8") for p in (t["piece"] for t in tokens)]
            return ids, pieces
        return [int(t) for t in tokens], None

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
        import openai

        try:
            out = self.client.with_options(base_url=self.root_url, max_retries=0).post(
                "/apply-template", cast_to=object, body={"messages": messages})
        except openai.APIStatusError:
            return None
        except Exception as exc:
            raise self.translate(exc, "POST /apply-template") from exc
        return out.get("prompt") if isinstance(out, dict) and isinstance(out.get("prompt"), str) else None

    # ------------------------------------------------------------------ scoring
    def _score_body(self, k: int) -> dict[str, Any]:
        # n_probs: llama.cpp (whole vocabulary allowed, keyed by id); logprobs=k: OpenAI/vLLM.
        # cache_prompt lets llama.cpp reuse a slot's state; return_tokens_as_token_ids makes
        # vLLM key its top tokens by id. Servers ignore the fields they do not know.
        return {"n_probs": k, "cache_prompt": self.cache_prompt, "return_tokens_as_token_ids": True,
                "post_sampling_probs": False}

    def score(self, prompt: Sequence[int] | str, k: int) -> Scored:
        """The top-``k`` next-token log-probabilities after ``prompt`` (one output token,
        temperature 0). Lowers ``k`` to what the server allows when it refuses more."""
        import openai

        model = self.check_model()
        prompt = prompt if isinstance(prompt, str) else [int(i) for i in prompt]
        for attempt in range(3):
            k_now = min(k, self.max_top_logprobs or k)
            try:
                raw = self.client.completions.with_raw_response.create(
                    model=model, prompt=prompt, max_tokens=1, temperature=0.0, logprobs=k_now,
                    extra_body=self._score_body(k_now))
                return _parse_scored(json.loads(raw.text), self.base_url)
            except openai.APIStatusError as exc:
                allowed = _allowed_logprobs(exc)
                if allowed is not None and allowed < k_now and attempt < 2:
                    logger.warning("%s allows at most %d log-probabilities per token (asked %d); entropies are "
                                   "estimates with bounds", self.base_url, allowed, k_now)
                    self.max_top_logprobs = allowed
                    continue
                raise self.translate(exc, "a scoring request") from exc
            except ServerError:
                raise
            except Exception as exc:
                raise self.translate(exc, "a scoring request") from exc
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
        raise type(err)(f"{err} [{finished} of {len(items)} {what}s had finished; the batch was abandoned and "
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
        try:
            raw = self.client.completions.with_raw_response.create(**self._completion_args(prompt, cfg))
            data = json.loads(raw.text)
        except Exception as exc:
            raise self.translate(exc, "a completion request") from exc
        return _parse_completed(data, self.base_url)

    def complete_many(self, prompts: Sequence[Sequence[int] | str], cfg: "GenerationConfig") -> list[Completed]:
        return self.map(lambda p: self.complete(p, cfg), prompts, "completion request")

    def stream(self, prompt: Sequence[int] | str, cfg: "GenerationConfig") -> "CompletionStream":
        """A streamed completion: iterate for text pieces; ``result`` at the end."""
        return CompletionStream(self, prompt, cfg)

    # ------------------------------------------------------------------ async
    async def ascore_many(self, prompts: Sequence[Sequence[int] | str], k: int) -> list[Scored]:
        """``score_many`` for async callers: ``AsyncOpenAI``, at most ``max_concurrency``
        requests in flight; the first failure cancels the rest and raises."""
        import openai

        model = self.check_model()
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(prompt: Sequence[int] | str) -> Scored:
            k_now = min(k, self.max_top_logprobs or k)
            async with gate:
                try:
                    raw = await self.aclient.completions.with_raw_response.create(
                        model=model, prompt=prompt if isinstance(prompt, str) else [int(i) for i in prompt],
                        max_tokens=1, temperature=0.0, logprobs=k_now, extra_body=self._score_body(k_now))
                except openai.APIStatusError as exc:
                    allowed = _allowed_logprobs(exc)
                    if allowed is not None and allowed < k_now:
                        self.max_top_logprobs = allowed
                        return await one(prompt)
                    raise self.translate(exc, "a scoring request") from exc
                except Exception as exc:
                    raise self.translate(exc, "a scoring request") from exc
            return _parse_scored(json.loads(raw.text), self.base_url)

        tasks = [asyncio.ensure_future(one(p)) for p in prompts]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    async def astream(self, prompt: Sequence[int] | str, cfg: "GenerationConfig") -> Any:
        """Async iterator of text pieces of a streamed completion."""
        try:
            stream = await self.aclient.completions.create(stream=True, **self._completion_args(prompt, cfg))
            async for chunk in stream:
                for choice in chunk.choices or []:
                    if choice.text:
                        yield choice.text
        except ServerError:
            raise
        except Exception as exc:
            raise self.translate(exc, "a streamed completion") from exc


class CompletionStream:
    """A streamed completion of one prompt: iterate for text; ``result`` (a
    :class:`Completed`) once the stream ends. ``close()`` stops it early."""

    def __init__(self, client: ServedClient, prompt: Sequence[int] | str, cfg: "GenerationConfig") -> None:
        self.client = client
        self.prompt = prompt
        self.cfg = cfg
        self.result = Completed("", "length")
        self._stream: Any = None
        self._iter: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        if self._iter is None:
            self._iter = self._pieces()
        return self._iter

    def _pieces(self) -> Iterator[str]:
        c = self.client
        try:
            self._stream = c.client.completions.create(stream=True, stream_options={"include_usage": True},
                                                       **c._completion_args(self.prompt, self.cfg))
            for chunk in self._stream:
                for choice in chunk.choices or []:
                    if choice.text:
                        self.result.text += choice.text
                        yield choice.text
                    if choice.finish_reason:
                        self.result.finish_reason = choice.finish_reason
                usage = getattr(chunk, "usage", None)
                if usage is not None:
                    self.result.completion_tokens = usage.completion_tokens
                    self.result.prompt_tokens = usage.prompt_tokens
                extra = getattr(chunk, "model_extra", None) or {}
                timings = extra.get("timings")
                if isinstance(timings, dict):
                    self.result.evaluated_tokens = _int(timings.get("prompt_n"))
                    if self.result.completion_tokens is None:
                        self.result.completion_tokens = _int(timings.get("predicted_n"))
        except ServerError:
            raise
        except GeneratorExit:
            raise
        except Exception as exc:
            raise c.translate(exc, "a streamed completion") from exc
        finally:
            if self._stream is not None:
                self._stream.close()

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- parsing
def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


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


def _usage_numbers(data: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    timings = data.get("timings") if isinstance(data.get("timings"), dict) else {}
    return _int(usage.get("prompt_tokens")), _int(timings.get("prompt_n")), _int(details.get("cached_tokens"))


def _parse_scored(data: Any, where: str) -> Scored:
    """The first generated position's top log-probabilities, in either dialect."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise ServerResponseError(f"the server at {where} answered a completion without choices: {str(data)[:200]}")
    lp = choices[0].get("logprobs")
    missing = NoLogprobsError(
        f"the server at {where} returned no log-probabilities, so chunks cannot be scored. It must support "
        "`logprobs` on /v1/completions (vLLM: start it with --max-logprobs; llama.cpp's llama-server does; "
        "llama-cpp-python's server needs --logits_all)")
    if not isinstance(lp, dict):
        raise missing
    ids: list[int] | None
    if isinstance(lp.get("content"), list):  # llama.cpp: [{id, token, logprob, top_logprobs: [{id, token, logprob}]}]
        if not lp["content"]:
            raise missing
        tops = lp["content"][0].get("top_logprobs") or []
        tops = [t for t in tops if isinstance(t, dict) and "logprob" in t]
        if not tops:
            raise missing
        tops.sort(key=lambda t: -float(t["logprob"]))
        ids = [int(t["id"]) for t in tops] if all("id" in t for t in tops) else None
        pieces = [_piece(t) for t in tops]
        values = [float(t["logprob"]) for t in tops]
    elif isinstance(lp.get("top_logprobs"), list):  # OpenAI legacy / vLLM: [{token: logprob}]
        if not lp["top_logprobs"] or not isinstance(lp["top_logprobs"][0], dict) or not lp["top_logprobs"][0]:
            raise missing
        items = sorted(lp["top_logprobs"][0].items(), key=lambda kv: -float(kv[1]))
        keyed = [k.startswith("token_id:") and k[9:].lstrip("-").isdigit() for k, _ in items]
        ids = [int(k[9:]) for k, _ in items] if all(keyed) else None
        pieces = ["" if ids is not None else k for k, _ in items]
        values = [float(v) for _, v in items]
    else:
        raise missing
    prompt_tokens, evaluated, cached = _usage_numbers(data)
    return Scored(TopLogprobs(ids, pieces, values), prompt_tokens, evaluated, cached)


def _piece(entry: dict[str, Any]) -> str:
    raw = entry.get("bytes")
    if isinstance(raw, list):
        return bytes(raw).decode("utf-8", errors="replace")
    return str(entry.get("token", ""))


def _parse_completed(data: Any, where: str) -> Completed:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise ServerResponseError(f"the server at {where} answered a completion without choices: {str(data)[:200]}")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt_tokens, evaluated, cached = _usage_numbers(data)
    return Completed(str(choices[0].get("text") or ""), str(choices[0].get("finish_reason") or "length"),
                     _int(usage.get("completion_tokens")), prompt_tokens, evaluated, cached)
