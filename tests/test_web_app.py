"""The web app: its API through TestClient, its streaming through a live server, its page in Chromium.

Runs on the shipped demo model when it is there (then answers must be right and the
highlight must hold the fact), else on a tiny random Mamba-2 whose answers are noise:
then only the plumbing is checked (the streamed text is the final answer, the highlight
is the winner's span, the API returns what the engine computes).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from oprm_rag import DEMO_MODEL, OPRMSelector, RecurrentLM
from oprm_rag.demo.recall_task import Fact, RecallDocument, build_document, heldout_prose, question_for
from oprm_rag.testing import pdf_bytes
from oprm_rag.web import WebSettings, create_app, main

from live_server import serve
from oprm_rag.web.documents import DocumentStore, clean_name

DEMO_READY = Path(DEMO_MODEL, "model.safetensors").is_file()
ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "images" / "web_app.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_NEW = 12
LOCAL = "http://127.0.0.1"  # the app answers loopback Host names only (DNS-rebinding guard)


@dataclass
class WebEnv:
    lm: RecurrentLM
    selector_kwargs: dict[str, Any]
    app: FastAPI
    client: TestClient
    doc: RecallDocument
    target: Fact
    question: str
    on_demo: bool


@pytest.fixture(scope="module")
def env(request: pytest.FixtureRequest) -> Iterator[WebEnv]:
    if DEMO_READY:
        lm: RecurrentLM = request.getfixturevalue("demo_lm")
        kwargs: dict[str, Any] = {}  # the app's defaults: chunk_tokens="auto", sentence boundaries
    else:
        lm = request.getfixturevalue("load_lm")("mamba2")
        kwargs = {"chunk_tokens": 96}
    app = create_app(lm, settings=WebSettings(default_max_new_tokens=MAX_NEW), **kwargs)
    chunk_tokens = app.state.engine.selector().chunk_tokens
    rng = random.Random(11)
    # About four chunks' worth of text (4.2 chars per token on the demo tokenizer).
    doc = build_document(rng, heldout_prose(), 6, max(3000, int(chunk_tokens * 4.2 * 4)))
    target = doc.facts[len(doc.facts) // 2]
    with TestClient(app, base_url=LOCAL) as client:
        yield WebEnv(lm, kwargs, app, client, doc, target, question_for(target.key), DEMO_READY)


def _lines(body: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def _upload_text(client: TestClient | httpx.Client, text: str, name: str = "facts.txt") -> str:
    r = client.post("/api/documents", files={"file": (name, text.encode("utf-8"), "text/plain")})
    assert r.status_code == 201, r.text
    return r.json()["doc_id"]


# ---------------------------------------------------------------------- API
def test_health_and_page(env: WebEnv) -> None:
    h = env.client.get("/api/health").json()
    assert h["status"] == "ok" and h["model_loaded"] is True
    assert h["chunk_tokens"] == env.app.state.engine.selector().chunk_tokens
    page = env.client.get("/")
    assert page.status_code == 200 and 'id="answer"' in page.text
    assert env.client.get("/static/app.js").status_code == 200
    assert env.client.get("/static/app.css").status_code == 200


def test_upload_file_and_json_keep_the_exact_text(env: WebEnv) -> None:
    text = "Café notes 🙂\r\nThe code of abcd is 1234.\n"
    upload = ("../../secret/notes.md", text.encode("utf-8"), "text/markdown")
    r = env.client.post("/api/documents", files={"file": upload})
    assert r.status_code == 201
    info = r.json()
    assert info["name"] == "notes.md" and info["chars"] == len(text)
    got = env.client.get(f"/api/documents/{info['doc_id']}").json()
    assert got["text"] == text  # offsets refer to this text: no newline or whitespace rewriting
    r = env.client.post("/api/documents", json={"text": "The code of wxyz is 9876.", "name": "paste"})
    assert r.status_code == 201 and r.json()["name"] == "paste" and r.json()["chars"] == 25
    # Latin-1 files still read (as the CLI's reader does).
    r = env.client.post("/api/documents", files={"file": ("old.txt", "naïve".encode("latin-1"), "text/plain")})
    assert env.client.get(f"/api/documents/{r.json()['doc_id']}").json()["text"] == "naïve"


def test_pdf_upload_reads_its_text_layer(env: WebEnv) -> None:
    r = env.client.post("/api/documents", files={"file": ("facts.pdf", pdf_bytes(["The code of qwer is 4321."]),
                                                          "application/pdf")})
    assert r.status_code == 201, r.text
    text = env.client.get(f"/api/documents/{r.json()['doc_id']}").json()["text"]
    assert "The code of qwer is 4321." in text


@pytest.mark.parametrize("files,json_body,status,needle", [
    ({"file": ("broken.pdf", b"%PDF-1.4 this is not really a pdf", "application/pdf")}, None, 422,
     "broken.pdf: not a readable PDF"),
    ({"file": ("scan.pdf", pdf_bytes([]), "application/pdf")}, None, 422, "no text layer"),
    ({"file": ("empty.txt", b"", "text/plain")}, None, 422, "empty"),
    ({"file": ("blank.txt", b"  \n\t ", "text/plain")}, None, 422, "the document is empty"),
    ({"file": ("data.txt", b"\x00\x01\x02binary", "text/plain")}, None, 422, "binary"),
    ({"file": ("report.docx", b"PK\x03\x04", "application/octet-stream")}, None, 422, ".docx"),
    ({"other": ("a.txt", b"text", "text/plain")}, None, 422, "'file'"),
    (None, {"text": "   "}, 422, "the document is empty"),
    (None, {"txt": "hello"}, 422, '{"text"'),
    (None, {"text": 5}, 422, '{"text"'),
])
def test_upload_errors_are_clear(env: WebEnv, files, json_body, status, needle) -> None:
    r = env.client.post("/api/documents", files=files) if files else env.client.post("/api/documents", json=json_body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_upload_wrong_content_type_and_bad_json(env: WebEnv) -> None:
    r = env.client.post("/api/documents", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "multipart" in r.json()["error"]
    r = env.client.post("/api/documents", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_size_limits(env: WebEnv) -> None:
    app = create_app(env.lm, settings=WebSettings(max_upload_bytes=64, max_document_chars=20), **env.selector_kwargs)
    with TestClient(app, base_url=LOCAL) as c:
        r = c.post("/api/documents", files={"file": ("big.txt", b"x" * 100, "text/plain")})
        assert r.status_code == 413 and "limit" in r.json()["error"]
        r = c.post("/api/documents", json={"text": "y" * 30})
        assert r.status_code == 413 and "up to 20" in r.json()["error"]


def test_ask_streams_scores_then_pieces_then_done(env: WebEnv) -> None:
    doc_id = _upload_text(env.client, env.doc.text)
    r = env.client.post("/api/ask", json={"doc_id": doc_id, "question": env.question})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    events = _lines(r.text)
    scores, pieces, done = events[0], events[1:-1], events[-1]
    assert scores["type"] == "scores" and done["type"] == "done"
    assert all(e["type"] == "piece" for e in pieces)
    assert "".join(e["text"] for e in pieces) == done["answer"]
    chunks = scores["chunks"]
    assert len(chunks) == done["usage"]["chunks"] >= 2
    assert chunks[0]["char_start"] == 0 and chunks[-1]["char_end"] <= len(env.doc.text)
    assert all(a["char_end"] <= b["char_start"] for a, b in zip(chunks, chunks[1:], strict=False))  # document order
    winners = [c for c in chunks if c["selected"]]
    assert len(winners) == 1 and not winners[0]["is_idk"]
    win = scores["winner"]
    assert (win["char_start"], win["char_end"]) == (winners[0]["char_start"], winners[0]["char_end"])
    assert done["winner"] == win
    eligible = [c["entropy"] for c in chunks if not c["is_idk"]]
    assert win["entropy"] == min(eligible)
    # The API returns exactly what the engine computes for this text and question.
    direct = OPRMSelector(env.lm, **{"chunk_tokens": "auto", "boundary": "sentence", **env.selector_kwargs}).answer(
        env.question, env.doc.text, max_new_tokens=MAX_NEW)
    assert direct.text == done["answer"]
    assert direct.chunk is not None and (direct.chunk.char_start, direct.chunk.char_end) == (
        win["char_start"], win["char_end"])
    if env.on_demo:
        assert done["answer"].strip() == env.target.value
        start, end = env.doc.fact_spans[env.doc.facts.index(env.target)]
        assert win["char_start"] <= start and end <= win["char_end"]


def test_no_eligible_chunk_answers_the_idk_word_and_says_why(env: WebEnv) -> None:
    # A threshold below any entropy leaves no eligible chunk: the IDK answer, and the reason
    # is the threshold, not "every chunk said IDK".
    app = create_app(env.lm, entropy_threshold=-1.0, **env.selector_kwargs)
    with TestClient(app, base_url=LOCAL) as c:
        doc_id = _upload_text(c, env.doc.text)
        events = _lines(c.post("/api/ask", json={"doc_id": doc_id, "question": env.question}).text)
    scores, done = events[0], events[-1]
    assert scores["winner"] is None and scores["all_idk"] is False
    assert "above the entropy threshold" in scores["no_answer_reason"]
    assert not any(ch["selected"] for ch in scores["chunks"])
    assert done["answer"] == scores["idk_word"] == "".join(e["text"] for e in events[1:-1])
    assert done["winner"] is None and done["finish_reason"] == "idk"


@pytest.mark.parametrize("body,status,needle", [
    ({"doc_id": "DOC"}, 422, "question is missing"),
    ({"doc_id": "DOC", "question": "   "}, 422, "the question is empty"),
    ({"doc_id": "DOC", "question": "What?" * 500}, 422, "characters"),
    ({"doc_id": "DOC", "question": "What?", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"doc_id": "DOC", "question": "What?", "max_new_tokens": 100000}, 422, "max_new_tokens is at most"),
    ({"doc_id": "0" * 32, "question": "What?"}, 404, "upload it again"),
    ({"question": "What?"}, 422, "doc_id is missing"),
])
def test_ask_errors_are_clear(env: WebEnv, body, status, needle) -> None:
    doc_id = _upload_text(env.client, env.doc.text)
    body = {k: (doc_id if v == "DOC" else v) for k, v in body.items()}
    r = env.client.post("/api/ask", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_engine_rejections_come_back_as_4xx_before_streaming(env: WebEnv) -> None:
    # The engine refuses a question as long as a chunk; that must be a 422, not a broken stream.
    app = create_app(env.lm, chunk_tokens=16)
    with TestClient(app, base_url=LOCAL) as c:
        doc_id = _upload_text(c, env.doc.text)
        r = c.post("/api/ask", json={"doc_id": doc_id, "question": " ".join(["what"] * 40) + "?"})
    assert r.status_code == 422 and "as many as a chunk" in r.json()["error"]


def test_document_store_is_bounded() -> None:
    store = DocumentStore(max_documents=2, max_total_chars=10)
    a, b = store.add("a", "aaaa"), store.add("b", "bbbb")
    store.get(a.doc_id)  # a is now the most recently used
    c = store.add("c", "cccc")  # over both bounds: b (least recently used) goes
    assert store.get(b.doc_id) is None and store.get(a.doc_id) is not None and store.get(c.doc_id) is not None
    assert len(store) == 2 and store.total_chars == 8
    with pytest.raises(ValueError, match="at most 10"):
        store.add("d", "d" * 11)
    assert clean_name("C:\\Users\\me\\x.pdf") == "x.pdf" and clean_name("\x00\n") == "document"


def test_model_loads_lazily_and_a_missing_one_is_a_503(tmp_path: Path, model_dir) -> None:
    assert create_app().state.engine.model_name == DEMO_MODEL  # the default, not loaded at creation
    app = create_app(str(tmp_path / "no-model-here"))
    with TestClient(app, base_url=LOCAL) as c:
        assert c.get("/api/health").json()["model_loaded"] is False
        doc_id = _upload_text(c, "The code of abcd is 1234. Some more prose here.")
        r = c.post("/api/ask", json={"doc_id": doc_id, "question": "What is the code of abcd?"})
        assert r.status_code == 503 and "could not load the model" in r.json()["error"]
    app = create_app(str(model_dir("mamba2")), chunk_tokens=64)
    with TestClient(app, base_url=LOCAL) as c:
        assert c.get("/api/health").json()["model_loaded"] is False
        doc_id = _upload_text(c, "The code of abcd is 1234. Some more prose here.")
        r = c.post("/api/ask", json={"doc_id": doc_id, "question": "What is the code of abcd?", "max_new_tokens": 2})
        assert r.status_code == 200 and _lines(r.text)[-1]["type"] == "done"
        assert c.get("/api/health").json()["model_loaded"] is True


def test_main_fails_cleanly_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "missing"), "--port", "0"]) == 3
    assert "could not load the model" in capsys.readouterr().err


# ---------------------------------------------------------------------- a live server
class _GatedStream:
    """Wraps an ``AnswerStream``: after the first piece, decoding waits until ``gate`` opens."""

    def __init__(self, inner: Any, gate: threading.Event, paused: threading.Event, log: dict[str, Any]) -> None:
        self.inner, self.gate, self.paused, self.log = inner, gate, paused, log

    @property
    def selection(self) -> Any:
        return self.inner.selection

    @property
    def answer(self) -> Any:
        return self.inner.answer

    def __iter__(self) -> Iterator[str]:
        return self._pieces()

    def _pieces(self) -> Iterator[str]:
        self.log["pulled"] = 0
        try:
            for i, piece in enumerate(self.inner):
                self.log["pulled"] += 1
                yield piece
                if i == 0:
                    self.paused.set()
                    if not self.gate.wait(30):
                        raise RuntimeError("the test never opened the gate")
        except GeneratorExit:
            self.log["closed_early"] = True
            raise


def _gated_app(env: WebEnv, **settings: Any) -> tuple[FastAPI, threading.Event, threading.Event, dict[str, Any]]:
    app = create_app(env.lm, settings=WebSettings(**settings), **env.selector_kwargs)
    sel = app.state.engine.selector()
    gate, paused, log = threading.Event(), threading.Event(), {}
    real = sel.stream_from
    sel.stream_from = lambda *a, **k: _GatedStream(real(*a, **k), gate, paused, log)  # type: ignore[method-assign]
    return app, gate, paused, log


def test_answers_stream_while_the_server_stays_responsive(env: WebEnv) -> None:
    app, gate, paused, _ = _gated_app(env)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        doc_id = _upload_text(client, env.doc.text)
        with client.stream("POST", "/api/ask", json={"doc_id": doc_id, "question": env.question}) as r:
            lines = r.iter_lines()
            first = json.loads(next(lines))
            second = json.loads(next(lines))
            # The model is now paused mid-answer in its worker thread; both lines already
            # arrived (streamed, not buffered) and the event loop still serves requests.
            assert paused.wait(60)
            assert first["type"] == "scores" and second["type"] == "piece"
            t0 = time.monotonic()
            assert client.get("/api/health", timeout=5).status_code == 200
            assert client.post("/api/documents", json={"text": "more text"}, timeout=5).status_code == 201
            assert time.monotonic() - t0 < 5
            gate.set()
            rest = [json.loads(line) for line in lines if line.strip()]
    assert rest[-1]["type"] == "done"
    assert second["text"] + "".join(e["text"] for e in rest[:-1]) == rest[-1]["answer"]


def test_client_leaving_stops_decoding(env: WebEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    import oprm_rag.web.app as web_app

    app, gate, paused, log = _gated_app(env)
    limit = 400
    # The answer is a few tokens: opened too early, the gate would let the worker finish it
    # before the server has seen the client leave. So the gate opens only once the server
    # has closed the event stream (which tells the worker to stop), whatever the timing.
    server_closed = threading.Event()
    real_aiter = web_app.aiter_in_thread

    async def watched(factory):
        events = real_aiter(factory)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()
            server_closed.set()

    monkeypatch.setattr(web_app, "aiter_in_thread", watched)
    with serve(app) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            doc_id = _upload_text(client, env.doc.text)
            with client.stream("POST", "/api/ask", json={"doc_id": doc_id, "question": env.question,
                                                          "max_new_tokens": limit}) as r:
                # Hold the line iterator: dropping it would close the connection at once
                # (httpcore closes on GeneratorExit), racing the first piece on a cold model.
                lines = r.iter_lines()
                assert json.loads(next(lines))["type"] == "scores"
                assert paused.wait(60)
        # The connection is closed; once the server has closed the stream, let the worker go
        # on: it must stop at its next piece.
        assert server_closed.wait(60)
        gate.set()
        deadline = time.monotonic() + 60
        while "closed_early" not in log and time.monotonic() < deadline:
            time.sleep(0.02)
    assert log.get("closed_early") is True
    assert log["pulled"] < limit


# ---------------------------------------------------------------------- the page in a browser
def _chromium() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("Chromium is missing: run `make browser` (installs Debian's chromium and chromium-driver); "
                "the web app's browser test needs it and never downloads a browser")


@pytest.mark.browser
def test_page_uploads_asks_streams_and_highlights(env: WebEnv, tmp_path: Path) -> None:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    doc_file = tmp_path / "facts.txt"
    doc_file.write_text(env.doc.text, encoding="utf-8")
    bad_pdf = tmp_path / "broken.pdf"
    bad_pdf.write_bytes(b"%PDF-1.4 definitely not a pdf")
    with serve(env.app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.goto(url)
            page.set_input_files("#file", str(doc_file))
            page.wait_for_selector("#doc-info[data-doc-id]", timeout=15_000)
            doc_id = page.get_attribute("#doc-info", "data-doc-id")
            assert doc_id
            # Record each piece as the page appends it to the answer.
            page.evaluate("""() => {
                window.__appended = 0;
                new MutationObserver((records) => { window.__appended += records.length; })
                    .observe(document.getElementById('answer'), {childList: true});
            }""")
            page.fill("#question", env.question)
            page.click("#ask")
            page.wait_for_selector("#answer[data-state=done]", timeout=30_000)
            shown = page.text_content("#answer")

            # The same question through the API (greedy decoding: the same result).
            with httpx.Client(base_url=url, timeout=30) as client:
                events = _lines(client.post("/api/ask", json={"doc_id": doc_id, "question": env.question}).text)
            scores, done = events[0], events[-1]
            pieces = [e for e in events if e["type"] == "piece"]
            assert shown == done["answer"]
            assert page.evaluate("window.__appended") == len(pieces) >= 1

            mark = page.locator("#document mark#winner")
            assert mark.count() == 1
            start, end = int(mark.get_attribute("data-start")), int(mark.get_attribute("data-end"))
            assert (start, end) == (done["winner"]["char_start"], done["winner"]["char_end"])
            assert mark.text_content() == env.doc.text[start:end]
            assert page.text_content("#document") == env.doc.text  # the highlight adds no text
            in_view = page.evaluate("""() => {
                const pane = document.getElementById('document').getBoundingClientRect();
                const m = document.getElementById('winner').getBoundingClientRect();
                return m.top >= pane.top - 1 && m.top < pane.bottom;
            }""")
            assert in_view, "the winning chunk is not scrolled into view"

            bars = page.locator("#chart rect.bar")
            assert bars.count() == len(scores["chunks"])
            winner_index = next(i for i, c in enumerate(scores["chunks"]) if c["selected"])
            assert page.locator("#chart rect.bar.winner").get_attribute("data-index") == str(winner_index)
            assert page.locator("#chart rect.bar.idk").count() == sum(c["is_idk"] for c in scores["chunks"])
            red = page.locator("#chart rect.bar.winner").evaluate("e => getComputedStyle(e).fill")
            assert red == "rgb(214, 39, 40)"
            if env.on_demo:
                assert f"The code of {env.target.key} is" in mark.text_content()
                assert shown.strip() == env.target.value

            # The README's screenshot is refreshed only on request (OPRM_UPDATE_SCREENSHOT=1, on the
            # shipped model): a test run never rewrites tracked files.
            shot = SCREENSHOT if os.environ.get("OPRM_UPDATE_SCREENSHOT") == "1" else tmp_path / "web_app.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000

            # Server errors appear in the page: a missing question, then an unreadable PDF.
            page.fill("#question", "")
            page.click("#ask")
            page.wait_for_selector("#error:not([hidden])", timeout=10_000)
            assert "the question is empty" in page.text_content("#error")
            page.set_input_files("#file", str(bad_pdf))
            page.wait_for_function("document.getElementById('error').textContent.includes('not a readable PDF')",
                                   timeout=10_000)
            assert "broken.pdf" in page.text_content("#error")
            page.fill("#text", "   ")
            page.fill("#question", env.question)
            page.click("#ask")
            page.wait_for_function("document.getElementById('error').textContent.includes('document is empty')",
                                   timeout=10_000)
        finally:
            browser.close()


# ---------------------------------------------------------------------- issue 16: the web app beyond one user
def test_a_lone_surrogate_upload_is_refused_at_the_boundary(env: WebEnv) -> None:
    r = env.client.post("/api/documents", content=b'{"text": "bad \\ud800 text", "name": "x"}',
                        headers={"content-type": "application/json"})
    assert r.status_code == 422 and "surrogate" in r.json()["error"]
    r = env.client.post("/api/documents", content=b'{"text": "fine text", "name": "n\\udfff"}',
                        headers={"content-type": "application/json"})
    assert r.status_code in (201, 422)  # a name is cleaned or refused, never stored broken
    # nothing broken was stored: every document reads back
    assert all(env.client.get(f"/api/documents/{d}").status_code == 200
               for d in list(env.app.state.store._docs))  # noqa: SLF001


@pytest.mark.parametrize("path", ["/api/ask", "/api/documents"])
def test_bodies_are_capped_while_they_arrive(env: WebEnv, path: str) -> None:
    """A chunked upload (no Content-Length to check up front) is refused once it passes the
    limit, while the client is still sending: it is never read whole."""
    app = create_app(env.lm, settings=WebSettings(max_upload_bytes=1 << 20), **env.selector_kwargs)
    with serve(app) as url:
        host, port = url.rsplit("/", 1)[-1].split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        piece = b"x" * 65536
        sent, reply = 0, b""
        sock.settimeout(0.05)
        while sent < 2000 and not reply:  # 2000 pieces would be 128 MB
            try:
                sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                sent += 1
                reply = sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:  # the server closed the connection after answering
                break
        sock.settimeout(10)
        try:
            reply += sock.recv(4096)
        except OSError:
            pass
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 40, f"the server read {sent} pieces of 64 KiB before refusing"


def test_host_header_allow_list_guards_against_dns_rebinding(env: WebEnv) -> None:
    assert env.client.get("/api/health", headers={"host": "localhost:8000"}).status_code == 200
    r = env.client.get("/api/health", headers={"host": "attacker.example:8000"})
    assert r.status_code == 400 and "attacker.example" in r.json()["error"]
    app = create_app(env.lm, settings=WebSettings(allowed_hosts=("qa.internal",)), **env.selector_kwargs)
    with TestClient(app, base_url="http://qa.internal") as c:
        assert c.get("/api/health").status_code == 200


def test_a_token_guards_every_api_call(env: WebEnv) -> None:
    app = create_app(env.lm, settings=WebSettings(token="s3cret"), **env.selector_kwargs)
    with TestClient(app, base_url=LOCAL) as c:
        assert c.get("/api/health").status_code == 401
        assert c.post("/api/documents", json={"text": "x"}).status_code == 401
        assert c.get("/api/health", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/health", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/static/app.js").status_code == 200  # the page's assets are public
        page = c.get("/?token=s3cret")  # a browser opens the page once with the token...
        assert page.status_code == 200 and page.url.path == "/" and not page.url.query  # token out of the URL
        assert c.cookies.get("oprm_token") and "s3cret" not in c.cookies.get("oprm_token")  # a digest
        assert c.get("/api/health").status_code == 200  # ...and its cookie carries the API calls


def test_binding_beyond_loopback_requires_a_token(capsys, monkeypatch) -> None:
    monkeypatch.delenv("OPRM_WEB_TOKEN", raising=False)
    assert main(["--host", "0.0.0.0", "--port", "0"]) == 2
    assert "token" in capsys.readouterr().err
