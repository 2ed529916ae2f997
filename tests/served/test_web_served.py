"""The web app over a served model: a model-server failure is a 502 that names the server,
not an internal 500 (the app is a gateway to the model server, and the server failed)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

import oprm_rag
from oprm_rag.served import OpenAICompatibleLM

from .fake_server import Behaviour, FakeServer

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from oprm_rag.web.app import create_app  # noqa: E402

LOCAL = "http://127.0.0.1"
DOC = " ".join(f"The code of key{i} is {1000 + i}. Some filler words follow here." for i in range(12))


@pytest.fixture()
def web() -> Iterator[tuple[FakeServer, TestClient]]:
    with FakeServer() as srv:
        lm = OpenAICompatibleLM(srv.base_url, "fake", tokenizer=oprm_rag.DEMO_MODEL, max_retries=0, timeout=10)
        app = create_app(lm, chunk_tokens=64)
        with TestClient(app, base_url=LOCAL) as client:
            yield srv, client


def _ask(client: TestClient) -> Any:
    r = client.post("/api/documents", json={"text": DOC})
    assert r.status_code == 201, r.text
    return client.post("/api/ask", json={"doc_id": r.json()["doc_id"], "question": "What is the code of key3?",
                                          "max_new_tokens": 3})


def test_a_working_server_answers(web) -> None:
    _, client = web
    r = _ask(client)
    assert r.status_code == 200, r.text
    assert '"type": "done"' in r.text or '"type":"done"' in r.text


@pytest.mark.parametrize("fault", ["http-500", "impossible"])
def test_a_failing_model_server_is_a_502_naming_it(web, fault: str) -> None:
    srv, client = web
    if fault == "http-500":
        srv.b.error = (500, "the engine died")
    else:
        def positive(body: dict, answer: dict) -> dict:
            answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] = 0.5
            return answer
        srv.b.rewrite = positive
    r = _ask(client)
    assert r.status_code == 502, r.text
    message = r.json()["error"]
    assert srv.base_url in message and "model server" in message
    assert ("the engine died" in message) if fault == "http-500" else ("impossible" in message)


def test_an_unreachable_model_server_is_a_502(web) -> None:
    srv, client = web
    srv.httpd.shutdown()
    srv.httpd.server_close()
    r = _ask(client)
    assert r.status_code == 502, r.text
    assert "ServerUnavailableError" in r.json()["error"] and srv.base_url in r.json()["error"]
