"""One deadline for a whole HTTP request, streams included.

``httpx`` (under the ``openai`` client) applies its timeout to each socket operation: a
server that sends one byte every 0.4 s, or SSE comments forever, never trips a 120 s read
timeout and holds the caller indefinitely. Here every socket operation (connect, TLS,
write, read of headers or body) of a request made inside :func:`bounded` waits at most
the time left until that request's deadline, and one past it fails at once with
``httpcore``'s own timeout exception, which ``httpx``/``openai`` report as a timeout. So
``timeout=`` bounds the request as a whole, not each read.

The deadline is per thread (a sync request runs in the thread that makes it), and it is
read at each socket operation, so pooled keep-alive connections need nothing special.
The hook is ``httpcore``'s network backend (``ConnectionPool(network_backend=...)``);
where a future ``httpx`` hides it, :func:`http_client` logs that only the per-read
timeout applies, and the callers' checks between reads still end a stalled request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["bounded", "time_left", "http_client"]

logger = logging.getLogger("oprm_rag")

_local = threading.local()


@contextmanager
def bounded(deadline: float) -> Iterator[None]:
    """Socket operations in this thread, inside the block, end by ``deadline`` (``time.monotonic()``)."""
    outer = getattr(_local, "deadline", None)
    _local.deadline = deadline if outer is None else min(outer, deadline)
    try:
        yield
    finally:
        _local.deadline = outer


def time_left() -> float | None:
    """Seconds to this thread's deadline (None outside :func:`bounded`)."""
    deadline = getattr(_local, "deadline", None)
    return None if deadline is None else deadline - time.monotonic()


def _cap(timeout: float | None, expired: type[Exception]) -> float | None:
    left = time_left()
    if left is None:
        return timeout
    if left <= 0:
        raise expired("the request's deadline (timeout=) passed")
    return left if timeout is None or math.isinf(timeout) else min(timeout, left)


def http_client(timeout: float) -> Any:
    """An ``httpx.Client`` whose socket operations honour :func:`bounded`."""
    import httpcore
    import httpx

    class _Stream(httpcore.NetworkStream):
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return self._inner.read(max_bytes, _cap(timeout, httpcore.ReadTimeout))

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self._inner.write(buffer, _cap(timeout, httpcore.WriteTimeout))

        def close(self) -> None:
            self._inner.close()

        def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                      timeout: float | None = None) -> "_Stream":
            return _Stream(self._inner.start_tls(ssl_context, server_hostname, _cap(timeout, httpcore.ConnectTimeout)))

        def get_extra_info(self, info: str) -> Any:
            return self._inner.get_extra_info(info)

    class _Backend(httpcore.SyncBackend):
        def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                        socket_options: Any = None) -> _Stream:
            return _Stream(super().connect_tcp(host, port, _cap(timeout, httpcore.ConnectTimeout), local_address,
                                               socket_options))

        def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> _Stream:
            return _Stream(super().connect_unix_socket(path, _cap(timeout, httpcore.ConnectTimeout), socket_options))

    transport = httpx.HTTPTransport()
    pool = getattr(transport, "_pool", None)
    if pool is not None and hasattr(pool, "_network_backend"):
        pool._network_backend = _Backend()
    else:  # pragma: no cover - an httpx without the hook
        logger.warning("this httpx version hides its network backend: timeout= bounds each read, and a request is "
                       "ended between reads once it passes its deadline")
    return httpx.Client(transport=transport, timeout=timeout)
