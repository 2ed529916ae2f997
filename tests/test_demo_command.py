"""``oprm-rag demo``: the README's first command prints what it claims, on the shipped model."""

from __future__ import annotations

import io
import re

from oprm_rag.demo import demo_document, run_demo
from oprm_rag.demo.recall_task import question_for


def test_demo_prints_both_answers_the_winning_span_and_a_tally(demo_lm) -> None:
    out = io.StringIO()
    assert run_demo(demo_lm, facts=40, seed=3, out=out, tally=(10, 4)) == 0
    text = out.getvalue()
    doc, target = demo_document(40, 3)
    assert question_for(target.key) in text and f"(expected: {target.value})" in text
    verdicts = re.findall(r"\[(correct|wrong), [0-9.]+s\]", text)
    assert len(verdicts) == 2  # plain, then OPRM
    m = re.search(r"chars (\d+)-(\d+) \(chunk", text)
    assert m is not None
    start, end = int(m.group(1)), int(m.group(2))
    fact_at = doc.text.find(f"The code of {target.key} is")
    where = "inside" if start <= fact_at < end else "outside"
    assert f"(the fact sits {where} this span)" in text  # the claim matches the document
    tallies = re.findall(r"codes right\s+(\d+)/(\d+)\s+Error on absent keys\s+(\d+)/(\d+)", text)
    assert len(tallies) == 2
    for right, asked, idk_right, idk_asked in tallies:
        assert (int(asked), int(idk_asked)) == (10, 4)
        assert 0 <= int(right) <= 10 and 0 <= int(idk_right) <= 4
