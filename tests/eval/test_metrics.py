"""LongBench's metrics on hand-computed cases (each value worked out in the comment beside it)."""

from __future__ import annotations

import sys

import pytest

from oprm_rag.errors import InputError
from oprm_rag.eval import metrics as m


def test_normalize_answer_lowercases_and_drops_punctuation_articles_and_spaces():
    assert m.normalize_answer("  The Cat,  sat on A mat! ") == "cat sat on mat"
    assert m.normalize_answer("an apple") == "apple"
    assert m.normalize_answer("theory") == "theory"  # articles only as whole words


def test_qa_f1_by_hand():
    # pred -> [cat, sat, on, mat], ref -> [cat, on, mat]: 3 shared, P = 3/4, R = 1, F1 = 1.5/1.75
    assert m.qa_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(1.5 / 1.75)
    assert m.qa_f1("Paris.", "paris") == 1.0
    assert m.qa_f1("London", "Paris") == 0.0
    assert m.qa_f1("", "Paris") == 0.0
    # repeated tokens count as a bag: [a1, a1, b] vs [a1]: 1 shared, P = 1/3, R = 1 -> 0.5
    assert m.token_f1(["x", "x", "y"], ["x"]) == pytest.approx(0.5)


def test_qa_f1_zh_by_hand():
    # jieba: 我们/在/北京/开会/。 ("。" normalises to nothing and is dropped) vs 在/北京/开会:
    # 3 shared, P = 3/4, R = 1 -> 6/7
    assert m.qa_f1_zh("我们在北京开会。", "在北京开会") == pytest.approx(6 / 7)


def test_chinese_metrics_name_jieba_when_it_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # import jieba now raises ImportError
    with pytest.raises(InputError, match="jieba"):
        m.qa_f1_zh("北京", "北京")


def test_rouge_l_by_hand():
    # one sentence each; distinct reference words {the, cat, sat, on, mat} = 5, prediction 3;
    # LCS words {the, cat, sat}: R = 3/5, P = 1, F = 2PR/(P+R) = 0.75
    assert m.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(0.75, abs=1e-6)
    # summary level: sentences cut at '.'; reference "a c" meets "a b" -> {a} and "c d" -> {c},
    # "b d" adds {b} and {d}: the union holds all 4 words -> R = P = 1
    assert m.rouge_l("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-6)
    # case-sensitive, as LongBench's rouge package: only "cat" is shared -> 0.5
    assert m.rouge_l("The cat", "the cat") == pytest.approx(0.5, abs=1e-6)
    assert m.rouge_l("", "the cat") == 0.0
    assert m.rouge_l("...", "the cat") == 0.0  # nothing but sentence ends: no sentence at all


def test_rouge_l_takes_the_rouge_package_s_lcs_path():
    # ref "a b" / pred "b a" have two LCS of length 1; the package's back-trace goes left on a
    # tie and keeps {b}. The second reference sentence "b" adds nothing new, so the union is
    # {b}: R = 1/2, P = 1/2 -> F = 0.5 (keeping {a} instead would give a union {a, b} and 1.0).
    # Checked against the rouge package itself (pltrdy/rouge 1.0.1): 0.49999999500.
    assert m.rouge_l("b a", "a b. b") == pytest.approx(0.5, abs=1e-6)


def test_rouge_l_zh_by_hand():
    # jieba: 我们/在/北京/开会 vs 他们/在/北京/开会: LCS {在, 北京, 开会}, 4 distinct each -> 0.75
    assert m.rouge_l_zh("我们在北京开会", "他们在北京开会") == pytest.approx(0.75, abs=1e-6)


def test_classification_score_by_hand():
    classes = ["Location", "Number", "Person"]
    assert m.classification_score("Location", "Location", all_classes=classes) == 1.0
    assert m.classification_score("Location or Person", "Location", all_classes=classes) == 0.5
    assert m.classification_score("Number", "Location", all_classes=classes) == 0.0
    # names that are strict substrings of the reference are dropped: "New" goes, "New York" stays
    assert m.classification_score("New York", "New York", all_classes=["New", "New York"]) == 1.0


def test_classification_keeps_longbench_s_skip_after_removal():
    # matched [a, b, abc]; LongBench removes "a" while iterating and so never looks at "b":
    # [b, abc] remain and the score is 1/2 (a loop without the skip would give 1.0)
    assert m.classification_score("abc", "abc", all_classes=["a", "b", "abc"]) == 0.5


def test_classification_needs_the_class_list():
    with pytest.raises(InputError, match="all_classes"):
        m.classification_score("x", "x", all_classes=None)


def test_retrieval_and_count_by_hand():
    assert m.retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    assert m.retrieval_score("Paragraph 2 or Paragraph 3", "Paragraph 2") == 0.5  # numbers 2, 3: one right
    assert m.retrieval_score("I do not know", "Paragraph 2") == 0.0
    assert m.retrieval_zh_score("段落2", "段落2") == 1.0
    assert m.retrieval_zh_score("段落12", "段落2") == 0.0  # whole numbers compared
    assert m.count_score("3", "3") == 1.0
    assert m.count_score("3 or 4", "3") == 0.5
    assert m.count_score("There are 13", "3") == 0.0
    with pytest.raises(InputError, match="Paragraph N"):
        m.retrieval_score("1", "the second one")


def test_code_sim_by_hand():
    # first line without ` # //: "return x + 1"; Indel similarity with "return x + 2":
    # LCS 11 of 12 + 12 chars -> 22/24 = 91.67 -> fuzz.ratio's integer 92 -> 0.92
    assert m.code_sim_score("```python\n# set up\nreturn x + 1", "return x + 2") == 0.92
    assert m.code_sim_score("\n\nreturn x", "return x") == 1.0
    assert m.code_sim_score("# only a comment", "return x") == 0.0


def test_score_example_takes_the_best_reference_and_first_line_for_few_shot():
    assert m.score_example("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    # trec: scored on the first non-empty line only ("Location"), not on "Number" below it
    classes = ["Location", "Number"]
    assert m.score_example("trec", "\nLocation\nNumber", ["Location"], classes) == 1.0
    assert m.score_example("hotpotqa", "\nLondon\nParis", ["Paris"]) == pytest.approx(2 / 3)  # F1, whole text
    with pytest.raises(InputError, match="no LongBench metric"):
        m.score_example("nosuch", "x", ["x"])


def test_mean_percent():
    assert m.mean_percent([1.0, 0.5, 0.0]) == 50.0
    assert m.mean_percent([1 / 3]) == 33.33
    assert m.mean_percent([]) is None


def test_extract_choice_as_longbench_v2():
    assert m.extract_choice("The correct answer is (B)") == "B"
    assert m.extract_choice("**The correct answer is C**") == "C"
    assert m.extract_choice("I think (B).") is None
    assert m.extract_choice("The correct answer is (E)") is None


def test_v2_accuracy_by_difficulty_and_length():
    recs = [
        {"score": 1, "difficulty": "easy", "length_class": "short"},
        {"score": 0, "difficulty": "easy", "length_class": "medium"},
        {"score": 1, "difficulty": "hard", "length_class": "long"},
        {"score": 0, "difficulty": "hard", "length_class": "short"},
    ]
    acc = m.v2_accuracy(recs)
    assert acc == {"overall": 50.0, "easy": 50.0, "hard": 50.0, "short": 50.0, "medium": 0.0, "long": 100.0,
                   "n": 4}
    assert m.v2_accuracy([])["overall"] is None
