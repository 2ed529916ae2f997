"""``oprm-rag demo``: the README's first command prints what it claims, on the shipped model."""

from __future__ import annotations

import io
import random
import re

from oprm_rag import OPRMSelector

from oprm_rag.demo import demo_document, run_demo
from oprm_rag.demo.recall_task import IDK_WORD, new_keys, question_for


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
    assert all((int(asked), int(idk_asked)) == (10, 4) for _, asked, _, idk_asked in tallies)
    # The tally equals asking one question at a time (no batching, no shared cache) ...
    rng = random.Random(3 + 1)
    present = rng.sample(doc.facts, 10)
    absent = new_keys(rng, 4, {f.key for f in doc.facts})
    for (right, _, idk_right, _), chunk_tokens in zip(tallies, (None, "auto")):
        sel = OPRMSelector(demo_lm, chunk_tokens=chunk_tokens, cache=False)
        codes = sum(sel.answer(question_for(f.key), doc.text, max_new_tokens=8).text.strip() == f.value
                    for f in present)
        idks = sum(sel.answer(question_for(k), doc.text, max_new_tokens=8).text.strip() == IDK_WORD
                   for k in absent)
        assert (int(right), int(idk_right)) == (codes, idks)
    # ... and on a document 2.5x the training length OPRM finds more codes than plain inference.
    assert int(tallies[1][0]) > int(tallies[0][0])
