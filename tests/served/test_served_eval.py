"""``oprm-rag eval`` against a real llama-server: the served run answers and scores as the
in-process run of the same model (OPRM mode; chunks of the server's slot size)."""

from __future__ import annotations

import json
import random

import oprm_rag
from oprm_rag.demo.recall_task import build_document, heldout_prose
from oprm_rag.eval.cli import main


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_eval_custom_through_the_served_backend(demo_server, tmp_path) -> None:
    rng = random.Random(4)
    rows = []
    for i in range(3):
        doc = build_document(rng, heldout_prose(), 8, 2600)
        fact = doc.facts[-1 - i]
        rows.append({"context": doc.text, "question": f"What is the code of {fact.key}?", "answers": [fact.value]})
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["custom", "--data", str(data), "--mode", "oprm", "--max-new-tokens", "5", "--chunk-tokens", "200"]
    assert main([*common, "--base-url", demo_server.base_url, "--model", "oprm-demo", "--tokenizer",
                 oprm_rag.DEMO_MODEL, "--max-concurrency", "3", "--out", str(tmp_path / "served")]) == 0
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    served = {r["_id"]: r for r in _records(tmp_path / "served" / "mine.jsonl")}
    local = {r["_id"]: r for r in _records(tmp_path / "local" / "mine.jsonl")}
    assert served.keys() == local.keys() and len(served) == 3
    for key, rec in served.items():
        assert rec["pred"].strip() == local[key]["pred"].strip()
        assert rec["score"] == local[key]["score"]
