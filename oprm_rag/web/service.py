"""The model side of the web app: one lazily loaded selector, answers run off the event loop.

Scoring and decoding are seconds of CPU work inside torch; run on the event loop they
would freeze every other request (health checks, uploads, other pages). Each question
runs as :func:`ask_events` in a worker thread through the library's one async bridge
(:func:`oprm_rag.aio.aiter_in_thread`), which also stops the worker when the client
leaves. A semaphore bounds how many questions use the model at once, because parallel
runs on one CPU model only slow each other down.

Every event is a translation of the core result types (``SelectionResult.to_dict``,
``Answer.to_dict``); only the user's mistakes (:class:`~oprm_rag.errors.InputError`)
become 4xx answers, anything else is reported as an internal fault with its type.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ..engine import Engine
from ..engine.resolve import ModelLike, resolve
from ..errors import InputError, ModelLoadError, ServerError
from ..lm import RecurrentLM
from ..options import SelectorOptions
from ..selector import OPRMSelector

__all__ = ["SelectorService", "ask_events", "Event"]

logger = logging.getLogger("oprm_rag.web")

Event = dict[str, Any]


class SelectorService:
    """The model and its selector, loaded on first use and then shared by every request.

    ``model`` may be a loaded ``RecurrentLM`` or an ``Engine`` (the selector is built at
    once, so bad options fail at start-up) or a path (resolved on first use through
    ``oprm_rag.resolve``, whose process-wide memo lets an app and the CLI in one process
    share weights). A failed load is not remembered: the next request tries again.
    """

    def __init__(self, model: "ModelLike", options: SelectorOptions | None = None,
                 load_options: dict[str, Any] | None = None, max_concurrent: int = 1) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self._model = model
        self.options = options or SelectorOptions()
        self.load_options = dict(load_options or {})
        self._selector: OPRMSelector | None = None
        self._load_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(max_concurrent)
        if not isinstance(model, (str, Path)):
            self._selector = OPRMSelector(model, self.options)

    @property
    def model_name(self) -> str:
        if isinstance(self._model, (RecurrentLM, Engine)):
            return str(self._model.name)
        return str(self._model)

    @property
    def loaded(self) -> bool:
        return self._selector is not None

    def selector(self) -> OPRMSelector:
        """The shared selector, loading the model first if needed (blocking: call off the loop)."""
        if self._selector is not None:
            return self._selector
        with self._load_lock:
            if self._selector is None:
                try:
                    engine = resolve(self._model, **self.load_options)
                except Exception as exc:  # noqa: BLE001 - transformers/torch raise many kinds on a bad folder
                    raise ModelLoadError(f"could not load the model {self.model_name!r}: "
                                         f"{type(exc).__name__}: {exc}") from exc
                self._selector = OPRMSelector(engine, self.options)
            return self._selector

    def info(self) -> dict[str, Any]:
        sel = self._selector
        family = sel.engine.describe().family if sel is not None else None
        return {"model": self.model_name, "model_loaded": sel is not None, "family": family,
                "chunk_tokens": sel.chunk_tokens if sel is not None else None,
                "chunk_tokens_reason": sel.chunk.reason if sel is not None else None}


def model_server_error(exc: ServerError) -> str:
    """What a client is told when the model server failed (502): the cause, naming the server."""
    return f"the model server failed ({type(exc).__name__}): {exc}"


def ask_events(service: SelectorService, selector: OPRMSelector, question: str, text: str,
               max_new_tokens: int) -> Iterator[Event]:
    """One question's events, computed in the calling (worker) thread.

    In order: ``scores`` (every chunk and the winner), any number of ``piece`` (answer
    text as decoded), then ``done`` (final text and usage); or one ``error`` instead.
    An ``error`` before ``scores`` carries an HTTP ``status`` (422: the input was
    refused; 502: the model server failed; 500: an internal fault), so the app can still answer with a plain status.
    """
    with service.slots:
        t0 = time.perf_counter()
        try:
            result = selector.select(question, text)
        except InputError as exc:
            yield {"type": "error", "status": 422, "error": str(exc)}
            return
        except ServerError as exc:  # the model server failed (its message names it): 502 Bad Gateway
            logger.warning("scoring %r failed at the model server: %s", question, exc)
            yield {"type": "error", "status": 502, "error": model_server_error(exc)}
            return
        except Exception as exc:  # noqa: BLE001 - an internal fault: say so, with its type
            logger.exception("scoring %r failed", question)
            yield {"type": "error", "status": 500, "error": f"internal error: {type(exc).__name__}: {exc}"}
            return
        yield {"type": "scores", **result.to_dict(include_text=False),
               "scoring_seconds": round(time.perf_counter() - t0, 4)}
        stream = selector.stream_from(result, max_new_tokens=max_new_tokens)
        pieces = iter(stream)
        try:
            for piece in pieces:
                if piece:
                    yield {"type": "piece", "text": piece}
        except ServerError as exc:  # mid-stream, the model server failed: the page shows it
            logger.warning("decoding %r failed at the model server: %s", question, exc)
            yield {"type": "error", "error": model_server_error(exc)}
            return
        except Exception as exc:  # noqa: BLE001 - mid-stream: the page shows it
            logger.exception("decoding %r failed", question)
            yield {"type": "error", "error": f"internal error while decoding: {type(exc).__name__}: {exc}"}
            return
        finally:
            close = getattr(pieces, "close", None)  # the client left: stop decoding now
            if close is not None:
                close()
        assert stream.answer is not None
        yield {"type": "done", **stream.answer.to_dict(include_text=False),
               "seconds": round(time.perf_counter() - t0, 4)}
