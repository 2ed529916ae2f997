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

Run it with ``python -m oprm_rag.web`` (see ``main``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..cli import parse_chunk_tokens
from ..lm import RecurrentLM
from .documents import DocumentError, DocumentStore, clean_name, read_upload
from .engine import AskRun, Engine, Event, ModelUnavailable

__all__ = ["create_app", "main", "WebSettings", "AskRequest"]

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
    default_max_new_tokens: int = 64
    max_new_tokens_limit: int = 512
    max_concurrent_asks: int = 1  # questions using the model at once; the rest wait their turn


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


def create_app(model: RecurrentLM | str | Path | None = None, *, settings: WebSettings | None = None,
               load_options: dict[str, Any] | None = None, **selector_kwargs: Any) -> FastAPI:
    """Build the app around one model.

    ``model``: a loaded ``RecurrentLM``, or a model folder / hub name loaded once on the
    first question (default: the shipped demo model). ``selector_kwargs`` go to
    ``OPRMSelector`` (default ``chunk_tokens="auto", boundary="sentence"``, as the CLI);
    ``load_options`` (``device``, ``dtype``) to ``resolve_lm``.
    """
    if model is None:
        from .. import DEMO_MODEL

        model = DEMO_MODEL
    cfg = settings or WebSettings()
    engine = Engine(model, selector_kwargs, load_options, max_concurrent=cfg.max_concurrent_asks)
    store = DocumentStore(cfg.max_documents, cfg.max_total_chars)

    app = FastAPI(title="oprm-rag", version=__version__,
                  description="Ask long documents: OPRM picks the chunk, the recurrent model answers from its state.")
    app.state.engine = engine
    app.state.store = store
    app.state.settings = cfg

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
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ------------------------------------------------------------------ API
    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, **engine.info(), "documents": len(store)}

    @app.post("/api/documents", status_code=201)
    async def upload(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_upload_bytes + 65536:
            raise ApiError(413, f"the upload is {int(declared):,} bytes; the limit is {cfg.max_upload_bytes:,}")
        if ctype == "multipart/form-data":
            name, text = await _read_multipart(request, cfg)
        elif ctype == "application/json":
            name, text = await _read_json_text(request, cfg)
        else:
            raise ApiError(415, "send the document as multipart form data (a field named 'file') or as JSON "
                                '{"text": "..."}')
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
        if len(question) > cfg.max_question_chars:
            raise ApiError(422, f"the question has {len(question):,} characters; keep it under "
                                f"{cfg.max_question_chars:,}")
        max_new = req.max_new_tokens or cfg.default_max_new_tokens
        if max_new > cfg.max_new_tokens_limit:
            raise ApiError(422, f"max_new_tokens is at most {cfg.max_new_tokens_limit}")
        try:
            selector = await run_in_threadpool(engine.selector)
        except ModelUnavailable as exc:
            raise ApiError(503, str(exc)) from exc
        run = AskRun(engine, selector, question, doc.text, max_new, asyncio.get_running_loop())
        run.start()
        try:
            first = await run.next_event()
        except asyncio.CancelledError:
            run.cancel()
            raise
        if first["type"] == "error":
            return _error(int(first.get("status", 500)), str(first["error"]))
        return StreamingResponse(_ndjson(run, first, doc.doc_id), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return app


def _lookup(store: DocumentStore, doc_id: str) -> Any:
    doc = store.get(doc_id)
    if doc is None:
        raise ApiError(404, "unknown document (the server keeps a bounded number of documents in memory); "
                            "upload it again")
    return doc


async def _read_multipart(request: Request, cfg: WebSettings) -> tuple[str, str]:
    try:
        form = await request.form(max_files=1, max_fields=8)
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
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > cfg.max_upload_bytes:
            raise ApiError(413, f"the text is larger than the {cfg.max_upload_bytes:,}-byte upload limit")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
        raise ApiError(422, 'send the document as JSON {"text": "...", "name": "..."}')
    text: str = payload["text"]
    name = clean_name(payload.get("name") if isinstance(payload.get("name"), str) else None, "pasted text")
    if not text.strip():
        raise ApiError(422, f"{name}: the document is empty (no text to search)")
    return name, text


async def _ndjson(run: AskRun, first: Event, doc_id: str) -> AsyncIterator[bytes]:
    """Forward the worker's events as JSON lines; stop the worker if the client leaves."""
    event = first
    try:
        while True:
            if event["type"] == "scores":
                event = {**event, "doc_id": doc_id}
            event.pop("status", None)
            yield (json.dumps(event, ensure_ascii=False) + "\n").encode("utf-8")
            if event["type"] in ("done", "error"):
                return
            event = await run.next_event()
    finally:
        run.cancel()


# ---------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m oprm_rag.web",
                                description="Serve the oprm-rag long-document QA page.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="model folder or hub name (default: the shipped demo model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chunk-tokens", type=parse_chunk_tokens, default="auto",
                   help="tokens per chunk, 'auto' (from the model's state capacity) or 'none'")
    p.add_argument("--boundary", choices=["sentence", "paragraph", "none"], default="sentence")
    p.add_argument("--max-new-tokens", type=int, default=64, help="default answer length in tokens")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model first (a missing model fails here, not on the first question), then serve."""
    import uvicorn

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    load_options = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v}
    settings = WebSettings(default_max_new_tokens=args.max_new_tokens)
    try:
        app = create_app(args.model, settings=settings, load_options=load_options,
                         chunk_tokens=args.chunk_tokens, boundary=None if args.boundary == "none" else args.boundary)
        app.state.engine.selector()
    except ModelUnavailable as exc:
        print(f"oprm-rag web: error: {exc}\n(train the demo model with `make train-demo-model`, "
              "or pass --model PATH)", file=sys.stderr)
        return 3
    except (ValueError, TypeError) as exc:
        print(f"oprm-rag web: error: {exc}", file=sys.stderr)
        return 2
    print(f"oprm-rag web: serving {app.state.engine.model_name} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
