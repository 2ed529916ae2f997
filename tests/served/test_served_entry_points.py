"""Every entry point takes a served model (a real llama-server on 127.0.0.1) and chooses
exactly what the core selector chooses over the same engine: the CLI (``--base-url``),
the web app, the LangChain selector and the LlamaIndex postprocessor. What a served
model cannot do is refused with a clear message."""

from __future__ import annotations

import json
import random

import pytest

import oprm_rag
from oprm_rag import OPRMSelector
from oprm_rag.cli import main as cli_main
from oprm_rag.demo.recall_task import build_document, heldout_prose, question_for
from oprm_rag.errors import OptionError
from oprm_rag.served import OpenAICompatibleLM


@pytest.fixture(scope="module")
def served(demo_server):
    lm = OpenAICompatibleLM(demo_server.base_url, "oprm-demo", tokenizer=oprm_rag.DEMO_MODEL, max_concurrency=4)
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def case():
    doc = build_document(random.Random(8), heldout_prose(), 12, 4500)
    return doc.text, question_for(doc.facts[len(doc.facts) // 2].key)


def test_every_entry_point_takes_a_served_model(served, demo_server, case, tmp_path, capsys) -> None:
    text, question = case
    ref = OPRMSelector(served).select(question, text)
    want = (ref.best.char_start, ref.best.char_end)
    assert ref.usage.chunks > 2 and ref.usage.token_counting == "exact"

    f = tmp_path / "doc.txt"
    f.write_text(text, encoding="utf-8")
    assert cli_main(["inspect", str(f), "-q", question, "--json", "--base-url", demo_server.base_url,
                     "--model", "oprm-demo", "--tokenizer", oprm_rag.DEMO_MODEL]) == 0
    w = json.loads(capsys.readouterr().out)["winner"]
    assert (w["char_start"], w["char_end"]) == want

    from fastapi.testclient import TestClient

    from oprm_rag.web import create_app

    with TestClient(create_app(served), base_url="http://127.0.0.1") as client:
        doc_id = client.post("/api/documents", json={"text": text}).json()["doc_id"]
        events = [json.loads(line) for line in client.post(
            "/api/ask", json={"doc_id": doc_id, "question": question, "max_new_tokens": 4}).text.splitlines()]
    assert (events[0]["winner"]["char_start"], events[0]["winner"]["char_end"]) == want
    assert events[-1]["type"] == "done"

    from langchain_oprm import OPRMSelector as LCSelector

    [doc] = LCSelector(model=served).invoke({"question": question, "documents": text})
    assert (doc.metadata["oprm_char_start"], doc.metadata["oprm_char_end"]) == want

    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.oprm import OPRMNodePostprocessor

    [node] = OPRMNodePostprocessor(model=served).postprocess_nodes([NodeWithScore(node=TextNode(text=text))],
                                                                    query_str=question)
    assert (node.node.metadata["oprm_char_start"], node.node.metadata["oprm_char_end"]) == want


def test_what_a_served_model_cannot_do_is_refused_clearly(served, case) -> None:
    text, _ = case
    with pytest.raises(OptionError, match="keeps no reusable states"):
        OPRMSelector(served).prepare(text)
    with pytest.raises(OptionError, match="top-k log-probabilities"):
        OPRMSelector(served, criterion="question_likelihood")
    from llama_index.llms.oprm import RecurrentLLM

    with pytest.raises(TypeError, match="OpenAILike"):
        RecurrentLLM(model=served)
    from langchain_oprm import ChatRecurrent

    with pytest.raises(TypeError, match="ChatOpenAI"):
        ChatRecurrent(model=served).invoke("hi")
