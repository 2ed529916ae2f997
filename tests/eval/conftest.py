"""Fixtures in LongBench's, LongBench v2's and the custom schema, written by the tests.

Never real benchmark data: contexts are the shipped recall task's facts in held-out
prose (the only thing the shipped model knows), so the pipeline runs end to end on it.
Sizes are tiny (~400-900 tokens per context) to keep the eval tests near a minute of CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest


def _prose(rng: random.Random, chars: int) -> str:
    from oprm_rag.demo.recall_task import heldout_prose

    sents = heldout_prose()
    out, n = [], 0
    while n < chars:
        s = rng.choice(sents)
        out.append(s)
        n += len(s) + 1
    return " ".join(out)


def _recall(rng: random.Random, facts: int, chars: int):
    from oprm_rag.demo.recall_task import build_document, heldout_prose

    return build_document(rng, heldout_prose(), facts, chars)


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def longbench_rows(dataset: str, n: int = 2, seed: int = 0) -> list[dict]:
    """``n`` items of ``dataset`` in LongBench's schema (one per dataset type)."""
    rng = random.Random(f"{dataset}:{seed}")
    rows = []
    for i in range(n):
        base = {"_id": f"{dataset}-{seed}-{i}", "dataset": dataset, "language": "en", "all_classes": None}
        if dataset in ("hotpotqa", "narrativeqa", "qasper", "multifieldqa_en", "2wikimqa", "musique", "triviaqa"):
            doc = _recall(rng, 6, 2400)
            fact = doc.facts[i % len(doc.facts)]
            row = {"input": f"What is the code of {fact.key}?", "context": doc.text, "answers": [fact.value]}
        elif dataset in ("gov_report", "multi_news", "qmsum"):
            row = {"input": "What was decided?" if dataset == "qmsum" else "", "context": _prose(rng, 2400),
                   "answers": ["The report describes the grammar of the language and its statements."]}
        elif dataset == "trec":
            classes = ["Location", "Number", "Person", "Description"]
            shots = "\n".join(f"Question: What is {w}?\nType: {rng.choice(classes)}" for w in ("a", "b", "c"))
            row = {"input": "Question: Where is the code?\nType:", "context": shots + "\n" + _prose(rng, 2400),
                   "answers": [classes[i % 4]], "all_classes": classes}
        elif dataset == "passage_retrieval_en":
            paras = [f"Paragraph {k + 1}: {_prose(rng, 600)}" for k in range(4)]
            row = {"input": paras[1].split(": ", 1)[1][:120], "context": "\n\n".join(paras),
                   "answers": ["Paragraph 2"]}
        elif dataset == "passage_count":
            paras = [_prose(rng, 600) for _ in range(3)]
            row = {"input": "", "context": "\n\n".join(f"Paragraph {k + 1}: {p}" for k, p in enumerate(paras + paras[:1])),
                   "answers": ["3"]}
        elif dataset in ("lcc", "repobench-p"):
            code = "\n".join(f"def f{k}(x):\n    return x + {k}" for k in range(60))
            row = {"input": "def g(y):\n" if dataset == "repobench-p" else "", "context": code,
                   "answers": ["    return y * 2"]}
        else:
            raise ValueError(dataset)
        base.update(row)
        base["length"] = len(base["context"].split())
        rows.append(base)
    return rows


#: One dataset per LongBench type: QA, summary, classification, retrieval, count, code.
FIXTURE_DATASETS = ("hotpotqa", "gov_report", "trec", "passage_retrieval_en", "passage_count", "lcc")


@pytest.fixture()
def longbench_dir(tmp_path) -> Path:
    root = tmp_path / "longbench"
    for name in FIXTURE_DATASETS:
        _write(root / f"{name}.jsonl", longbench_rows(name))
    return root


def v2_items(n: int = 3) -> list[dict]:
    rng = random.Random(2)
    items = []
    for i in range(n):
        doc = _recall(rng, 6, 2000)
        fact = doc.facts[0]
        wrong = [str(1000 + 7 * k) for k in range(3)]
        choices = [fact.value, *wrong]
        answer = "ABCD"[i % 4]
        choices[0], choices["ABCD".index(answer)] = choices["ABCD".index(answer)], choices[0]
        items.append({"_id": f"v2-{i}", "domain": "Single-Document QA", "sub_domain": "Academic",
                      "difficulty": "easy" if i % 2 == 0 else "hard", "length": ("short", "medium", "long")[i % 3],
                      "question": f"What is the code of {fact.key}?", "choice_A": choices[0], "choice_B": choices[1],
                      "choice_C": choices[2], "choice_D": choices[3], "answer": answer, "context": doc.text})
    return items


@pytest.fixture()
def v2_file(tmp_path) -> Path:
    path = tmp_path / "v2" / "data.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(v2_items()), encoding="utf-8")
    return path


@pytest.fixture()
def custom_file(tmp_path) -> Path:
    rng = random.Random(3)
    rows = []
    for i in range(3):
        doc = _recall(rng, 8, 2800)
        fact = doc.facts[-1 - i]
        rows.append({"context": doc.text, "question": f"What is the code of {fact.key}?", "answers": [fact.value]})
    return _write(tmp_path / "mydocs.jsonl", rows)
