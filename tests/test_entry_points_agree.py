"""One document, one question, five entry points: the same chunk, score and chunk size.

The core selector, the CLI (``--json``), the web API, the LangChain selector and the
LlamaIndex postprocessor all build the core ``SelectorOptions`` with its defaults, so
none of them may choose differently. Run on the shipped model at its defaults
(``chunk_tokens="auto"``), on a document several chunks long.
"""

from __future__ import annotations

import json
import random

import pytest
from fastapi.testclient import TestClient

from oprm_rag import DEMO_MODEL, OPRMSelector
from oprm_rag.cli import main as cli_main
from oprm_rag.demo.recall_task import build_document, heldout_prose, question_for
from oprm_rag.web import create_app


@pytest.fixture(scope="module")
def case(demo_lm):
    rng = random.Random(5)
    doc = build_document(rng, heldout_prose(), 24, 9000)
    question = question_for(doc.facts[len(doc.facts) // 2].key)
    return demo_lm, doc.text, question


def _core(lm, text, question):
    res = OPRMSelector(lm).select(question, text)
    best = res.best
    return (best.char_start, best.char_end), round(best.relevance_score, 4), res.usage.chunk_tokens


def _cli(text, question, tmp_path, capsys):
    f = tmp_path / "doc.txt"
    f.write_text(text, encoding="utf-8")
    assert cli_main(["inspect", str(f), "-q", question, "--json", "--model", DEMO_MODEL]) == 0
    data = json.loads(capsys.readouterr().out)
    w = data["winner"]
    return (w["char_start"], w["char_end"]), round(w["relevance_score"], 4), data["usage"]["chunk_tokens"]


def _web(lm, text, question):
    with TestClient(create_app(lm), base_url="http://127.0.0.1") as client:
        doc_id = client.post("/api/documents", json={"text": text}).json()["doc_id"]
        r = client.post("/api/ask", json={"doc_id": doc_id, "question": question, "max_new_tokens": 2})
        scores = json.loads(r.text.splitlines()[0])
    w = scores["winner"]
    return (w["char_start"], w["char_end"]), round(w["relevance_score"], 4), scores["usage"]["chunk_tokens"]


def _langchain(lm, text, question):
    from langchain_oprm import OPRMSelector as LCSelector

    sel = LCSelector(model=lm)
    [doc] = sel.invoke({"question": question, "documents": text})
    m = doc.metadata
    return (m["oprm_char_start"], m["oprm_char_end"]), round(m["relevance_score"], 4), m["oprm_chunk_tokens"]


def _llamaindex(lm, text, question):
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.oprm import OPRMNodePostprocessor

    pp = OPRMNodePostprocessor(model=lm)
    [node] = pp.postprocess_nodes([NodeWithScore(node=TextNode(text=text))], query_str=question)
    m = node.node.metadata
    return (m["oprm_char_start"], m["oprm_char_end"]), round(node.score, 4), m["oprm_chunk_tokens"]


def test_five_entry_points_choose_alike(case, tmp_path, capsys):
    lm, text, question = case
    got = {
        "core": _core(lm, text, question),
        "cli": _cli(text, question, tmp_path, capsys),
        "web": _web(lm, text, question),
        "langchain": _langchain(lm, text, question),
        "llamaindex": _llamaindex(lm, text, question),
    }
    reference = got["core"]
    assert reference[2] is not None and reference[2] < lm.count_tokens(text) // 3  # several chunks
    for name, value in got.items():
        assert value == reference, f"{name} chose {value}, the core chose {reference}"
