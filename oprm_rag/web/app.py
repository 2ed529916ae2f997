"""The long-document QA web app: upload or paste a document, ask, watch the answer stream.

API (every error is JSON ``{"error": message}`` with a 4xx/5xx status):

* ``POST /api/documents``: a multipart ``file`` (.txt, .md, .pdf) or JSON
  ``{"text": ..., "name": ...}`` -> ``{doc_id, name, chars}``.
* ``GET /api/documents/{doc_id}``: the stored text, so the page can draw highlights at
  the engine's character offsets (a PDF's text exists only on the server).
* ``POST /api/ask`` ``{doc_id, question, max_new_tokens?}`` -> NDJSON lines: ``scores``
  (every chunk and the winner's span), ``piece`` (answer text as decoded), ``done``
  (final text and usage), or ``error``. NDJSON rather than Server-Sent Events because
  the request is a POST, which ``EventSource`` cannot send; the page reads lines off
  ``fetch``'s body stream either way.
* ``GET /api/health``: whether the model is loaded and how many documents are held.

Security: it binds to 127.0.0.1 by default, where a Host-header allow-list protects it
against DNS rebinding (a page on another site resolving its own name to 127.0.0.1).
Binding to any other address requires a token (``--token`` or ``OPRM_WEB_TOKEN``):
API calls send ``Authorization: Bearer TOKEN``; a browser opens ``/?token=TOKEN`` once
and gets an HttpOnly cookie. Request bodies are capped while they are read, so a large
or endless (chunked) upload is refused early, never buffered whole.

Run it with ``oprm-rag serve`` or ``python -m oprm_rag.web`` (see ``main``).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._about import __version__
from ..decoding.config import GenerationConfig
from ..aio import aiter_in_thread
from ..cli_args import (CLIError, add_model_args, add_selector_args, engine_from_args, positive_int,
                        selector_options_from_args)
from ..errors import DocumentError, InputError, ModelLoadError, ServerError
from ..options import SelectorOptions
from .access import check_token, cookie_matches, cookie_value, install_redaction, query_matches, token_matches
from .documents import DocumentStore, clean_name, read_upload
from .service import Event, SelectorService, ask_events, model_server_error

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.resolve import ModelLike

__all__ = ["create_app", "main", "WebSettings", "AskRequest", "TOKEN_ENV"]

#: Environment variable holding the access token (instead of ``--token``).
TOKEN_ENV = "OPRM_WEB_TOKEN"
_COOKIE = "oprm_token"
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

logger = logging.getLogger("oprm_rag.web")

STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class WebSettings:
    """Limits that keep one server usable by several people on one machine."""

    max_documents: int = 32  # documents kept in memory (least recently used evicted)
    max_total_chars: int = 50_000_000  # characters kept over all documents
    max_document_chars: int = 5_000_000  # one document's characters
    max_upload_bytes: int = 25 * 2**20  # one upload's bytes (PDFs are larger than their text)
    max_question_chars: int = 2000
    default_max_new_tokens: int = GenerationConfig.max_new_tokens
    max_new_tokens_limit: int = 512
    max_concurrent_asks: int = 1  # questions using the model at once; the rest wait their turn
    max_ask_bytes: int = 64 * 1024  # one /api/ask request body (a question and a few fields)
    token: str | None = None  # required on every API call when set (always, off loopback)
    allowed_hosts: tuple[str, ...] = _LOOPBACK_NAMES  # Host headers served; ("*",) serves any


class ApiError(Exception):
    """A request the server refuses, with the status and the message the page shows."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AskRequest(BaseModel):
    doc_id: str = Field(min_length=1, max_length=64)
    question: str
    max_new_tokens: int | None = Field(default=None, ge=1)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's error list as one sentence a person can act on."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc)
        if err.get("type") == "missing":
            parts.append(f"{field} is missing" if field else "the request needs a JSON body")
        elif err.get("type") == "json_invalid":
            parts.append("the request body is not valid JSON")
        else:
            parts.append(f"{field}: {err.get('msg')}" if field else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def create_app(model: "ModelLike | None" = None, *, settings: WebSettings | None = None,
               load_options: dict[str, Any] | None = None, options: SelectorOptions | None = None,
               **option_kwargs: Any) -> FastAPI:
    """Build the app around one model.

    ``model``: a loaded ``RecurrentLM`` or an ``Engine`` (a served model), or a model
    folder / hub name loaded once on the first question (default: the shipped demo
    model). Selection follows ``options`` overridden by ``option_kwargs`` (the library's
    ``SelectorOptions`` defaults otherwise, as everywhere); ``load_options``
    (``device``, ``dtype``) go to ``resolve_lm``.
    """
    if model is None:
        from .._about import DEMO_MODEL

        model = DEMO_MODEL
    cfg = settings or WebSettings()
    if cfg.token is not None:
        check_token(cfg.token)  # one no client can send would lock everyone out: refuse it now
    service = SelectorService(model, SelectorOptions.build(options, **option_kwargs), load_options,
                              max_concurrent=cfg.max_concurrent_asks)
    store = DocumentStore(cfg.max_documents, cfg.max_total_chars)

    app = FastAPI(title="oprm-rag", version=__version__,
                  description="Ask long documents: OPRM picks the chunk, the recurrent model answers from its state.")
    app.state.engine = service
    app.state.store = store
    app.state.settings = cfg
    app.add_middleware(_Guard, settings=cfg)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    # ------------------------------------------------------------------ pages
    @app.get("/", include_in_schema=False, response_model=None)
    async def index(request: Request) -> FileResponse | PlainTextResponse | RedirectResponse:
        query = request.query_params.get("token")
        if cfg.token is not None and query is not None and query_matches(query, cfg.token):
            # the cookie holds a digest, not the token; the redirect takes the token out of the
            # address bar, the history and any Referer
            back = RedirectResponse("/", status_code=303)
            back.set_cookie(_COOKIE, cookie_value(cfg.token), httponly=True, samesite="strict")
            return back
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ------------------------------------------------------------------ API
    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, **service.info(), "documents": len(store)}

    @app.post("/api/documents", status_code=201)
    async def upload(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            name, text = await _read_multipart(request, cfg)
        elif ctype == "application/json":
            name, text = await _read_json_text(request, cfg)
        else:
            raise ApiError(415, "send the document as multipart form data (a field named 'file') or as JSON "
                                '{"text": "..."}')
        _check_unicode(text, name)
        if len(text) > cfg.max_document_chars:
            raise ApiError(413, f"{name}: {len(text):,} characters; this server takes documents of up to "
                                f"{cfg.max_document_chars:,}")
        return store.add(name, text).info()

    @app.get("/api/documents/{doc_id}")
    async def document(doc_id: str) -> dict[str, Any]:
        doc = _lookup(store, doc_id)
        return {**doc.info(), "text": doc.text}

    @app.post("/api/ask", response_model=None)
    async def ask(req: AskRequest) -> StreamingResponse | JSONResponse:
        doc = _lookup(store, req.doc_id)
        question = req.question.strip()
        if not question:
            raise ApiError(422, "the question is empty: type a question about the document")
        _check_unicode(question, "the question")
        if len(question) > cfg.max_question_chars:
            raise ApiError(422, f"the question has {len(question):,} characters; keep it under "
                                f"{cfg.max_question_chars:,}")
        max_new = req.max_new_tokens or cfg.default_max_new_tokens
        if max_new > cfg.max_new_tokens_limit:
            raise ApiError(422, f"max_new_tokens is at most {cfg.max_new_tokens_limit}")
        try:
            selector = await run_in_threadpool(service.selector)
        except ModelLoadError as exc:
            raise ApiError(503, str(exc)) from exc
        except ServerError as exc:  # a served model's server failed while the selector was built
            raise ApiError(502, model_server_error(exc)) from exc
        events = aiter_in_thread(lambda: ask_events(service, selector, question, doc.text, max_new))
        first = await events.__anext__()
        if first["type"] == "error":
            await events.aclose()
            return _error(int(first.get("status", 500)), str(first["error"]))
        return StreamingResponse(_ndjson(events, first, doc.doc_id), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return app


def _check_unicode(text: str, what: str) -> None:
    """Text is validated where it enters: a lone surrogate (JSON allows ``\\ud800``) would be
    stored and then break every later read of the document."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(422, f"{what} holds an invalid character (a lone UTF-16 surrogate at position "
                            f"{exc.start}); send valid Unicode text") from None


class _BodyTooLarge(BaseException):  # noqa: N818 - BaseException: FastAPI's body parsing catches Exception
    pass


class _Guard:
    """ASGI middleware: Host allow-list, token check, and request bodies capped as they arrive.

    The body cap counts bytes while the app reads them, so a chunked upload without a
    ``Content-Length`` is cut off at the limit instead of being read whole first.
    """

    def __init__(self, app: Any, settings: WebSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        refusal = self._refuse(scope, headers, path)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        limit = self._limit(path)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _error(413, f"the request body is {int(declared):,} bytes; the limit here is {limit:,}")(
                scope, receive, send)
            return
        seen = 0

        async def capped() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return message

        started = False

        async def watch(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped, watch)
        except _BodyTooLarge:
            if not started:
                await _error(413, f"the request body is larger than the {limit:,}-byte limit here")(
                    scope, receive, send)

    def _limit(self, path: str) -> int:
        if path.startswith("/api/documents"):
            return self.settings.max_upload_bytes + 65536  # multipart framing around the file
        return self.settings.max_ask_bytes

    def _refuse(self, scope: dict[str, Any], headers: dict[str, str], path: str) -> Any:
        cfg = self.settings
        host = _host_name(headers.get("host", ""))
        if "*" not in cfg.allowed_hosts and host not in cfg.allowed_hosts:
            return _error(400, f"this server does not answer for the host {host!r} (allowed: "
                               f"{', '.join(cfg.allowed_hosts)}); start it with --allowed-host {host} if that "
                               "is intended")
        if cfg.token is None or path.startswith("/static/") or path == "/":
            return None
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):  # the header's raw bytes (decoded as Latin-1 above)
            ok = token_matches(auth[7:].strip(" \t").encode("latin-1"), cfg.token)
        else:
            given = _cookie(headers.get("cookie", ""))
            ok = given is not None and cookie_matches(given, cfg.token)
        if not ok:
            return _error(401, "this server needs its access token: send 'Authorization: Bearer TOKEN', or open "
                               "the page once as /?token=TOKEN")
        return None


def _host_name(host: str) -> str:
    """The Host header without its port (IPv6 literals keep their address)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookie(header: str) -> str | None:
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == _COOKIE:
            return value
    return None


def _lookup(store: DocumentStore, doc_id: str) -> Any:
    doc = store.get(doc_id)
    if doc is None:
        raise ApiError(404, "unknown document (the server keeps a bounded number of documents in memory); "
                            "upload it again")
    return doc


async def _read_multipart(request: Request, cfg: WebSettings) -> tuple[str, str]:
    try:
        form = await request.form(max_files=1, max_fields=8)
    except _BodyTooLarge:
        raise
    except Exception as exc:  # noqa: BLE001 - the multipart parser raises several kinds on a malformed body
        raise ApiError(400, f"could not read the form data: {exc}") from exc
    try:
        item = form.get("file")
        if not isinstance(item, UploadFile):
            raise ApiError(422, "no file: send the document in a form field named 'file'")
        name = clean_name(item.filename)
        data = await item.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise ApiError(413, f"{name}: larger than the {cfg.max_upload_bytes:,}-byte upload limit")
        try:
            text = await run_in_threadpool(read_upload, name, data, item.content_type)
        except DocumentError as exc:
            raise ApiError(422, str(exc)) from exc
        return name, text
    finally:
        await form.close()


async def _read_json_text(request: Request, cfg: WebSettings) -> tuple[str, str]:
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > cfg.max_upload_bytes:
            raise ApiError(413, f"the text is larger than the {cfg.max_upload_bytes:,}-byte upload limit")
    try:
        payload = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
        raise ApiError(422, 'send the document as JSON {"text": "...", "name": "..."}')
    text: str = payload["text"]
    name = clean_name(payload.get("name") if isinstance(payload.get("name"), str) else None, "pasted text")
    _check_unicode(name, "the name")
    if not text.strip():
        raise ApiError(422, f"{name}: the document is empty (no text to search)")
    return name, text


async def _ndjson(events: Any, first: Event, doc_id: str) -> AsyncIterator[bytes]:
    """Forward the worker's events as JSON lines; closing ``events`` stops the worker."""
    event = first
    try:
        while True:
            if event["type"] == "scores":
                event = {**event, "doc_id": doc_id}
            event.pop("status", None)
            yield (json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8")
            if event["type"] in ("done", "error"):
                return
            event = await events.__anext__()
    finally:
        await events.aclose()


# ---------------------------------------------------------------------- command line
def _port(value: str) -> int:
    n = positive_int(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oprm-rag serve", description="Serve the oprm-rag long-document QA page.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                        "only; any other address needs --token)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--token", default=None, help=f"access token (default: ${TOKEN_ENV}); required off loopback")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="a Host name to answer for besides localhost (repeat; '*' answers any)")
    add_model_args(p)
    add_selector_args(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=GenerationConfig.max_new_tokens, help="default answer length in tokens")
    return p


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model first (a missing model fails here, not on the first question), then serve."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is not None:
        try:
            check_token(token)
        except InputError as exc:
            print(f"oprm-rag serve: error: {exc}", file=sys.stderr)
            return 2
    log_config = install_redaction(token)  # /?token=... must not reach the access log
    if not _is_loopback(args.host) and not token:
        print(f"oprm-rag serve: error: --host {args.host} exposes the server beyond this machine; it has no "
              f"other protection, so give it a token (--token or ${TOKEN_ENV})", file=sys.stderr)
        return 2
    hosts = tuple(dict.fromkeys([*_LOOPBACK_NAMES, *([] if _is_loopback(args.host) else [args.host]),
                                 *(h.lower() for h in args.allowed_host)]))
    settings = WebSettings(default_max_new_tokens=args.max_new_tokens, token=token, allowed_hosts=hosts)
    try:
        options = selector_options_from_args(args)
        engine = engine_from_args(args)
        app = create_app(engine, settings=settings, options=options)
    except CLIError as exc:
        print(f"oprm-rag serve: error: {exc}", file=sys.stderr)
        return exc.code
    except InputError as exc:
        print(f"oprm-rag serve: error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    print(f"oprm-rag web: serving {app.state.engine.model_name} on http://{args.host}:{args.port}/"
          + ("?token=..." if token else ""), flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", log_config=log_config)
    except (OSError, SystemExit) as exc:
        print(f"oprm-rag serve: error: cannot listen on {args.host}:{args.port} ({exc})", file=sys.stderr)
        return 1
    return 0
