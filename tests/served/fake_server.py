"""A tiny OpenAI-compatible HTTP server on 127.0.0.1, for what llama-server cannot be
made to do: refuse token ids, drop log-probabilities, time out, rate-limit, speak vLLM's
dialect, and misbehave (the fault catalogue: impossible log-probabilities, reordered
choices, trickled bodies, endless SSE comments, truncated streams, huge error bodies).
Its "model" is a deterministic function of the prompt, so answers can be checked.

Misbehaviour that would hang a client without a whole-request deadline is itself bounded
(``stall_seconds``), so a client without the fix fails its test instead of hanging it.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np


def distribution(prompt: Any, vocab: int) -> np.ndarray:
    """The fake model's next-token probabilities after ``prompt`` (ids or text)."""
    key = json.dumps(prompt).encode()
    rng = np.random.default_rng(zlib.crc32(key))
    logits = rng.normal(size=vocab) * 2.0
    p = np.exp(logits - logits.max())
    return p / p.sum()


@dataclass
class Behaviour:
    models: tuple[str, ...] = ("fake",)
    vocab: int = 3072
    dialect: str = "llamacpp"  # or "vllm" (legacy top_logprobs dicts keyed token_id:N)
    accept_ids: bool = True
    logprobs: bool = True
    max_logprobs: int | None = None  # refuse more, vLLM-style
    context: int | None = None  # refuse longer prompts, llama.cpp-style
    slow_requests: set[int] = field(default_factory=set)  # request numbers (1-based) that hang
    hang_seconds: float = 5.0
    rate_limited: int = 0  # first n completion requests answer 429
    tokenize: bool = True
    delay: float = 0.0  # every completion takes this long (to see concurrency)
    #: rewrite(request body, response dict) -> a response dict, or raw JSON text (for
    #: duplicate keys); applied to non-streamed completion answers of request numbers in
    #: ``rewrite_requests`` (all when empty).
    rewrite: Callable[[dict[str, Any], dict[str, Any]], Any] | None = None
    rewrite_requests: set[int] = field(default_factory=set)
    text_keys: bool = False  # vLLM dialect keyed by token text (as without return_tokens_as_token_ids)
    trickle: float | None = None  # send completion bodies one byte every `trickle` seconds
    trickle_headers: bool = False  # trickle the status line and headers instead (they never end)
    #: streams: "ok", "comments" (SSE comments, never an event), "stall" (two pieces, then
    #: silence), "cut" (pieces, then the connection closes: no finish reason, no [DONE]),
    #: "done_only" ([DONE] without a finish reason), "no_done" (finish reason, no [DONE]),
    #: "other_index" (pieces for choice 1)
    stream_mode: str = "ok"
    stall_seconds: float = 12.0  # how long trickles, comments and stalls go on at most
    models_failures: int = 0  # first n GET /v1/models answer 503
    error_body: int = 0  # completions answer HTTP 500 with a message of this many characters
    error: tuple[int, str] | None = None  # completions answer (status, message)


class FakeServer:
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.b = behaviour or Behaviour()
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.model_requests = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()  # str: raw JSON
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self) -> None:
                with server._lock:
                    server.model_requests += 1
                    failing = server.model_requests <= server.b.models_failures
                if self.path == "/v1/models" and failing:
                    self._send(503, {"error": {"message": "loading"}})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "owned_by": "vllm" if server.b.dialect == "vllm" else "fake",
                         "max_model_len": server.b.context} for m in server.b.models]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/tokenize" and server.b.tokenize:
                    text = body.get("content", "")
                    self._send(200, {"tokens": [ord(c) % server.b.vocab for c in text]})
                elif self.path == "/detokenize" and server.b.tokenize:
                    self._send(200, {"content": "".join(chr(i) for i in body.get("tokens", []))})
                elif self.path == "/v1/completions":
                    server._completion(self, body)
                else:
                    self._send(404, {"error": {"message": "not found"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ completions
    def _completion(self, h: Any, body: dict[str, Any]) -> None:
        b = self.b
        with self._lock:
            self.requests.append(body)
            n = len(self.requests)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if n <= b.rate_limited:
                h._send(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "10"})
                return
            if b.error_body:
                h._send(500, {"error": {"message": "x" * b.error_body}})
                return
            if b.error is not None:
                h._send(b.error[0], {"error": {"message": b.error[1]}})
                return
            if b.delay:
                time.sleep(b.delay)
            if n in b.slow_requests:
                time.sleep(b.hang_seconds)
            if body.get("model") not in b.models:
                h._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                return
            prompt = body.get("prompt")
            if isinstance(prompt, list) and not b.accept_ids:
                h._send(500, {"error": {"message": "prompt must be a string"}})
                return
            length = len(prompt) if isinstance(prompt, list) else len(str(prompt))
            if b.context is not None and length > b.context:
                h._send(400, {"error": {"code": 400, "type": "exceed_context_size_error",
                                        "message": f"the request exceeds the available context size ({length} > "
                                                   f"{b.context})"}})
                return
            k = int(body.get("n_probs") or body.get("logprobs") or 0)
            if k < 0:  # vLLM: logprobs=-1 is the whole vocabulary
                k = b.vocab
            if b.dialect == "vllm":
                k = int(body.get("logprobs") or 0)
                if b.max_logprobs is not None and k > b.max_logprobs:
                    h._send(400, {"object": "error", "message": f"Requested sample logprobs of {k}, which is "
                                                                f"greater than max allowed: {b.max_logprobs}",
                                  "type": "BadRequestError", "code": 400})
                    return
            if k < 0:  # vLLM: logprobs=-1 is the whole vocabulary
                k = b.vocab
            p = distribution(prompt, b.vocab)
            order = np.argsort(-p)[:k]
            top = int(order[0]) if k else int(np.argmax(p))
            if body.get("stream"):
                self._stream(h, body)
                return
            logprobs: Any = None
            if b.logprobs and k:
                if b.dialect == "vllm":
                    key = (lambda i: f"tok{i}") if b.text_keys else (lambda i: f"token_id:{i}")
                    logprobs = {"tokens": [key(top)], "token_logprobs": [float(np.log(p[top]))],
                                "top_logprobs": [{key(int(i)): float(np.log(p[i])) for i in order}],
                                "text_offset": [0]}
                else:
                    logprobs = {"content": [{"id": top, "token": chr(top), "logprob": float(np.log(p[top])),
                                             "top_logprobs": [{"id": int(i), "token": chr(int(i)),
                                                               "logprob": float(np.log(p[i]))} for i in order]}]}
            answer: Any = {"object": "text_completion", "model": body.get("model"),
                           "choices": [{"index": 0, "text": "ok " * int(body.get("max_tokens", 1)),
                                        "finish_reason": "length", "logprobs": logprobs}],
                           "usage": {"prompt_tokens": length, "completion_tokens": int(body.get("max_tokens", 1)),
                                     "total_tokens": length + 1}}
            if b.rewrite is not None and (not b.rewrite_requests or n in b.rewrite_requests):
                answer = b.rewrite(body, answer)
            if b.trickle is not None and b.trickle_headers:
                self._trickle_headers(h)
            elif b.trickle is not None:
                self._trickle(h, answer)
            else:
                h._send(200, answer)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _trickle(self, h: Any, answer: Any) -> None:
        """A 200 answer whose body comes one byte every ``trickle`` seconds (for at most
        ``stall_seconds``; then the rest at once)."""
        data = (answer if isinstance(answer, str) else json.dumps(answer)).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        end = time.monotonic() + self.b.stall_seconds
        try:
            sent = 0
            while sent < len(data) and time.monotonic() < end:
                h.wfile.write(data[sent:sent + 1])
                h.wfile.flush()
                sent += 1
                time.sleep(self.b.trickle or 0.0)
            h.wfile.write(data[sent:])
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _trickle_headers(self, h: Any) -> None:
        """A status line and then one header that grows by a byte every ``trickle`` seconds."""
        end = time.monotonic() + self.b.stall_seconds
        try:
            h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while time.monotonic() < end:
                h.wfile.write(b"a")
                h.wfile.flush()
                time.sleep(self.b.trickle or 0.0)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _stream(self, h: Any, body: dict[str, Any]) -> None:
        mode = self.b.stream_mode
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()

        def event(obj: Any) -> None:
            h.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            h.wfile.flush()

        end = time.monotonic() + self.b.stall_seconds
        try:
            if mode == "comments":
                while time.monotonic() < end:
                    h.wfile.write(b": keep-alive\n\n")
                    h.wfile.flush()
                    time.sleep(0.2)
                return
            n = int(body.get("max_tokens", 1))
            index = 1 if mode == "other_index" else 0
            for i in range(n if mode != "stall" else min(n, 2)):
                event({"object": "text_completion", "choices": [{"index": index, "text": f"w{i} ",
                                                                 "finish_reason": None}]})
            if mode == "stall":
                time.sleep(self.b.stall_seconds)
            if mode in ("cut", "stall"):
                return
            usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            if mode == "done_only":
                event({"object": "text_completion", "choices": [], "usage": usage})
            else:
                event({"object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                       "usage": usage})
            if mode != "no_done":
                h.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
