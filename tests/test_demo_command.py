"""``oprm-rag demo``: the README's first command prints what it claims, on the shipped model.

Its headline is the tally (many questions, present and absent keys); the one question it
shows in full is chosen by a stated rule that makes it typical of that tally, never a
lucky or an unlucky draw; progress bars never land in the results.
"""

from __future__ import annotations

import io
import random
import re

import pytest

from oprm_rag import OPRMSelector

from oprm_rag.demo import demo_document, representative, run_demo
from oprm_rag.demo.recall_task import IDK_WORD, new_keys, question_for

TALLY = re.compile(r"codes right\s+(\d+)/(\d+)\s+Error on absent keys\s+(\d+)/(\d+)")


def test_demo_headline_is_the_tally_and_the_shown_question_is_typical(demo_lm) -> None:
    out = io.StringIO()
    assert run_demo(demo_lm, facts=40, seed=3, out=out, tally=(10, 4)) == 0
    text = out.getvalue()
    doc, _ = demo_document(40, 3)
    tallies = TALLY.findall(text)
    assert len(tallies) == 2
    assert all((int(asked), int(idk_asked)) == (10, 4) for _, asked, _, idk_asked in tallies)
    # the tally comes before any single question
    assert text.index("codes right") < text.index("Question:")
    # The tally equals asking one question at a time (no batching, no shared cache) ...
    rng = random.Random(3 + 1)
    present = rng.sample(doc.facts, 10)
    absent = new_keys(rng, 4, {f.key for f in doc.facts})
    outcomes = {}
    for (right, _, idk_right, _), (name, chunk_tokens) in zip(tallies, (("Plain inference", None), ("OPRM", "auto"))):
        sel = OPRMSelector(demo_lm, chunk_tokens=chunk_tokens, cache=False)
        got = [sel.answer(question_for(f.key), doc.text, max_new_tokens=8).text.strip() == f.value for f in present]
        idks = sum(sel.answer(question_for(k), doc.text, max_new_tokens=8).text.strip() == IDK_WORD
                   for k in absent)
        assert (int(right), int(idk_right)) == (sum(got), idks)
        outcomes[name] = got
    # ... on a document 2.5x the training length OPRM finds more codes than plain inference ...
    assert int(tallies[1][0]) > int(tallies[0][0])
    # ... and the question shown is the one the stated rule picks from those outcomes.
    i, rule = representative(outcomes)
    assert f"How it was chosen: {rule}." in text
    shown = present[i]
    assert f"Question: {question_for(shown.key)}   (expected: {shown.value})" in text
    verdicts = re.findall(r"->\s+'[^']*'\s+\[(correct|wrong)", text)
    assert verdicts == ["correct" if ok else "wrong" for ok in (outcomes["Plain inference"][i], outcomes["OPRM"][i])]
    m = re.search(r"chars (\d+)-(\d+) \(chunk", text)
    assert m is not None
    start, end = int(m.group(1)), int(m.group(2))
    where = "inside" if start <= doc.text.find(f"The code of {shown.key} is") < end else "outside"
    assert f"(the fact sits {where} this span)" in text  # the claim matches the document


@pytest.mark.parametrize("outcomes, expected", [
    ({"plain": [True, False, False], "oprm": [False, True, True]}, 1),   # each method's majority: wrong, right
    ({"plain": [False, False, True], "oprm": [True, True, False]}, 0),
    ({"plain": [True, True, True], "oprm": [False, True, True]}, 1),
    ({"plain": [True, True, False], "oprm": [False, False, True]}, 0),
    ({"plain": [True, True, False, False], "oprm": [False, False, True, True]}, 2),  # ties count as "right";
    # no question is typical of both: the first typical of the last method (OPRM)
])
def test_the_rule_picks_a_question_typical_of_the_tally(outcomes, expected) -> None:
    i, rule = representative(outcomes)
    assert i == expected and "plain" in rule and "oprm" in rule


def test_no_progress_bar_when_stdout_is_not_a_terminal(demo_lm, capsys) -> None:
    out = io.StringIO()  # not a terminal
    assert run_demo(demo_lm, facts=12, seed=1, out=out, tally=(3, 1)) == 0
    err = capsys.readouterr().err
    assert "OPRM scoring" not in err and "\r" not in out.getvalue() and "it/s" not in out.getvalue()


@pytest.mark.parametrize("facts", ["0", "1", "20001", "-3"])
def test_demo_facts_out_of_range_is_a_usage_error(facts, capsys) -> None:
    from oprm_rag.cli import main

    with pytest.raises(SystemExit) as info:
        main(["demo", "--facts", facts])
    assert info.value.code == 2 and "--facts" in capsys.readouterr().err
