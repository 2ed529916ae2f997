"""Async without blocking the event loop: run a blocking iterator in a worker thread.

Prefill and every decoding step are long, blocking torch calls. Every async surface
(LangChain's ``_astream``, LlamaIndex's ``astream_complete``, the web app) runs them in a
worker thread and receives the items on the event loop through an ``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar

__all__ = ["aiter_in_thread"]

T = TypeVar("T")
_ITEM, _ERROR, _END = object(), object(), object()


async def aiter_in_thread(factory: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Yield the items of ``factory()`` (called in a worker thread) on the event loop.

    Context variables (callback managers, tracing) are copied into the worker. An
    exception in the worker is re-raised here. When the consumer stops early (``break``,
    ``aclose``, cancellation) the worker is told to stop after the item it is producing,
    the iterator is closed, and the stream waits for the worker so no decoding outlives it.
    """
    loop = asyncio.get_running_loop()
    queue: "asyncio.Queue[tuple[object, Any]]" = asyncio.Queue()
    stopped = threading.Event()

    def put(kind: object, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stopped.set()

    def work() -> None:
        iterator: Iterator[T] | None = None
        try:
            iterator = factory()
            for item in iterator:
                put(_ITEM, item)
                if stopped.is_set():
                    break
        except BaseException as exc:  # handed to the consumer, re-raised there
            put(_ERROR, exc)
        else:
            put(_END, None)
        finally:
            close = getattr(iterator, "close", None)
            if callable(close):
                close()

    worker = loop.run_in_executor(None, contextvars.copy_context().run, work)
    try:
        while True:
            kind, value = await queue.get()
            if kind is _ITEM:
                yield value
            elif kind is _ERROR:
                raise value
            else:
                return
    finally:
        stopped.set()
        try:
            await asyncio.shield(worker)
        except BaseException:  # cancelled while waiting: the worker stops on its own
            pass
