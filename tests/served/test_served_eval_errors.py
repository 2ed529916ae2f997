"""``oprm-rag eval`` against a real llama-server: one example too long for the server's
context goes to errors.jsonl and the run goes on, as in process (issue 24)."""

from __future__ import annotations

import json
import random

import oprm_rag
from oprm_rag.demo.recall_task import build_document, heldout_prose
from oprm_rag.eval.cli import main


def test_one_over_long_example_is_logged_and_the_run_goes_on(demo_server, tmp_path, capsys) -> None:
    rng = random.Random(5)
    rows = []
    for i in range(3):
        doc = build_document(rng, heldout_prose(), 6, 2400)
        fact = doc.facts[-1]
        question = f"What is the code of {fact.key}?"
        if i == 1:  # longer than what a 512-token slot leaves after a 400-token chunk, shorter than the chunk
            question = "Please read carefully and answer briefly. " * 16 + question
        rows.append({"_id": f"q{i}", "context": doc.text, "question": question, "answers": [fact.value]})
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code = main(["custom", "--data", str(data), "--mode", "oprm", "--max-new-tokens", "4", "--chunk-tokens", "400",
                 "--base-url", demo_server.base_url, "--model", "oprm-demo", "--tokenizer", oprm_rag.DEMO_MODEL,
                 "--max-concurrency", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    recorded = [json.loads(x)["_id"] for x in (out / "mixed.jsonl").read_text().splitlines()]
    assert sorted(recorded) == ["q0", "q2"]
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["_id"] for e in errors] == ["q1"] and "tokens" in errors[0]["error"]
    assert "1 could not be answered" in captured.out
