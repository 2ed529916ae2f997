"""The model side of the web app: one lazily loaded selector, and answers run off the event loop.

Scoring and decoding are seconds of CPU work inside torch; run on the event loop they
would freeze every other request (health checks, uploads, other pages). Each question
therefore runs in its own worker thread that drives ``OPRMSelector.stream`` and hands
events to the event loop through an ``asyncio.Queue``. A semaphore bounds how many
questions use the model at once, because parallel runs on one CPU model only slow each
other down.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ..lm import RecurrentLM
from ..scoring import ChunkScore
from ..selector import Answer, AnswerStream, OPRMSelector, SelectionResult

__all__ = ["Engine", "ModelUnavailable", "AskRun", "Event"]

logger = logging.getLogger("oprm_rag.web")

Event = dict[str, Any]

#: What the selector is built with unless ``create_app`` is told otherwise (as the CLI does).
DEFAULT_SELECTOR_KWARGS: dict[str, Any] = {"chunk_tokens": "auto", "boundary": "sentence"}


class ModelUnavailable(Exception):
    """The model could not be loaded; the message says which and why."""


def _finite(x: float | None) -> float | None:
    """JSON has no NaN or infinity (``JSON.parse`` rejects them): send null instead."""
    return x if x is not None and math.isfinite(x) else None


def chunk_event(c: ChunkScore) -> dict[str, Any]:
    """What the page needs per chunk: its span, its score and why it was or was not chosen."""
    return {"doc_index": c.doc_index, "index": c.index, "char_start": c.char_start, "char_end": c.char_end,
            "entropy": _finite(c.entropy), "top_token": c.top_token, "top_prob": _finite(c.top_prob),
            "is_idk": c.is_idk, "selected": c.selected}


def span_of(c: ChunkScore | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {"index": c.index, "char_start": c.char_start, "char_end": c.char_end, "entropy": _finite(c.entropy)}


def scores_event(sel: SelectionResult, chunk_tokens: int | None, seconds: float) -> Event:
    return {"type": "scores", "chunks": [chunk_event(c) for c in sel.chunks], "winner": span_of(sel.best),
            "all_idk": sel.all_idk, "idk_word": sel.idk_word, "chunk_tokens": chunk_tokens,
            "scoring_seconds": round(seconds, 4)}


def done_event(ans: Answer, seconds: float) -> Event:
    return {"type": "done", "answer": ans.text, "finish_reason": ans.finish_reason, "all_idk": ans.all_idk,
            "winner": span_of(ans.chunk), "usage": ans.usage, "seconds": round(seconds, 4)}


class Engine:
    """The model and its selector, loaded on first use and then shared by every request.

    ``model`` may be a loaded ``RecurrentLM`` (the selector is built at once, so bad
    selector options fail at start-up) or a path (loaded on first use through the
    process-wide registry, so an app and the CLI in one process share weights). A failed
    load is not remembered: the next request tries again, which lets a server started
    before the demo model finished training pick it up once it is there.
    """

    def __init__(self, model: RecurrentLM | str | Path, selector_kwargs: dict[str, Any] | None = None,
                 load_options: dict[str, Any] | None = None, max_concurrent: int = 1) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self._model = model
        self.selector_kwargs = {**DEFAULT_SELECTOR_KWARGS, **(selector_kwargs or {})}
        self.load_options = dict(load_options or {})
        self._selector: OPRMSelector | None = None
        self._load_lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(max_concurrent)
        if isinstance(model, RecurrentLM):
            self._selector = OPRMSelector(model, **self.selector_kwargs)

    @property
    def model_name(self) -> str:
        return self._model.name if isinstance(self._model, RecurrentLM) else str(self._model)

    @property
    def loaded(self) -> bool:
        return self._selector is not None

    def selector(self) -> OPRMSelector:
        """The shared selector, loading the model first if needed (blocking: call off the loop)."""
        if self._selector is not None:
            return self._selector
        with self._load_lock:
            if self._selector is None:
                from ..registry import resolve_lm

                try:
                    lm = resolve_lm(self._model, **self.load_options)
                except Exception as exc:  # noqa: BLE001 - transformers/torch raise many kinds on a bad folder
                    raise ModelUnavailable(f"could not load the model {self.model_name!r}: {exc}") from exc
                self._selector = OPRMSelector(lm, **self.selector_kwargs)
            return self._selector

    def info(self) -> dict[str, Any]:
        sel = self._selector
        return {"model": self.model_name, "model_loaded": sel is not None,
                "family": sel.lm.family if sel is not None else None,
                "chunk_tokens": sel.chunk_tokens if sel is not None else None}


class AskRun:
    """One question answered in a worker thread; events arrive on ``next_event``.

    Events, in order: ``scores`` (every chunk's entropy and the winner's span), any
    number of ``piece`` (answer text as decoded), then ``done`` (final text and usage);
    or a single ``error`` instead. An ``error`` before ``scores`` carries an HTTP
    ``status`` (the question or document was rejected by the engine), so the app can
    still answer with a plain 4xx instead of a stream.
    """

    def __init__(self, engine: Engine, selector: OPRMSelector, question: str, text: str,
                 max_new_tokens: int, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.selector = selector
        self.question = question
        self.text = text
        self.max_new_tokens = max_new_tokens
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._work, name="oprm-web-ask", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """Stop decoding at the next piece (the client went away)."""
        self._cancel.set()

    async def next_event(self) -> Event:
        return await self._queue.get()

    # ------------------------------------------------------------------ worker thread
    def _emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self._cancel.set()

    def _work(self) -> None:
        with self.engine.slots:
            if self._cancel.is_set():
                return
            try:
                self._answer()
            except Exception as exc:  # noqa: BLE001 - report any model failure to the page, then log it
                logger.exception("answering %r failed", self.question)
                self._emit({"type": "error", "status": 500, "error": f"the model failed: {exc}"})

    def _answer(self) -> None:
        t0 = time.perf_counter()
        try:
            stream: AnswerStream = self.selector.stream(self.question, self.text,
                                                        max_new_tokens=self.max_new_tokens)
        except (ValueError, TypeError) as exc:  # the engine's input checks (e.g. a question longer than a chunk)
            self._emit({"type": "error", "status": 422, "error": str(exc)})
            return
        pieces: Iterator[str] = iter(stream)
        # Send the scores before any decoding where the stream carries its selection from the
        # start; an engine that attaches it only when iteration begins needs the first piece.
        ahead: list[str] = []
        if stream.selection is None:
            first = next(pieces, None)
            ahead = [] if first is None else [first]
        assert stream.selection is not None
        self._emit(scores_event(stream.selection, self.selector.chunk_tokens, time.perf_counter() - t0))
        for piece in itertools.chain(ahead, pieces):
            if piece:
                self._emit({"type": "piece", "text": piece})
            if self._cancel.is_set():
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
                return
        assert stream.answer is not None
        self._emit(done_event(stream.answer, time.perf_counter() - t0))
