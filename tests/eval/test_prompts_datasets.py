"""LongBench prompts and their OPRM split; readers of the published schemas; --download's errors."""

from __future__ import annotations

import json
import sys
import types

import pytest

from oprm_rag.errors import InputError
from oprm_rag.eval import datasets as ds
from oprm_rag.eval import prompts as pr

from .conftest import longbench_rows, v2_items


def test_vanilla_parts_are_longbench_s_prompt_exactly():
    for name, template in pr.LONGBENCH_PROMPTS.items():
        ex = {"context": "CTX-TEXT", "input": "THE-INPUT"}
        parts = pr.longbench_parts(name, ex, oprm=False)
        assert parts.text() == template.replace("{context}", "CTX-TEXT").replace("{input}", "THE-INPUT"), name
        assert parts.context == "CTX-TEXT"
        assert parts.summary == (name in {"gov_report", "qmsum", "multi_news", "vcsum"})


def test_oprm_adds_the_idk_instruction_before_the_question():
    ex = {"context": "C", "input": "Who?"}
    van = pr.longbench_parts("hotpotqa", ex, oprm=False)
    opr = pr.longbench_parts("hotpotqa", ex, oprm=True, idk_word="Error")
    assert van.instruction == opr.instruction  # P is the same in both modes
    assert opr.question == van.question.replace(
        "\n\nQuestion:", ' If the answer does not exist in the passages, return "Error".\n\nQuestion:')
    assert pr.longbench_parts("hotpotqa", ex, oprm=True, idk_instruction=False).question == van.question
    zh = pr.longbench_parts("dureader", ex, oprm=True, idk_word="错误")
    assert '请回答"错误"。\n\n问题：Who?' in zh.question


def test_qasper_says_the_idk_word_instead_of_unanswerable():
    opr = pr.longbench_parts("qasper", {"context": "C", "input": "Q?"}, oprm=True, idk_word="Error")
    assert "unanswerable" not in opr.instruction + opr.question
    assert opr.text().count('"Error"') == 4  # twice in P, twice in Q, as in the paper's code
    assert opr.idk_means == "unanswerable"


def test_datasets_without_an_idk_sentence_are_unchanged_under_oprm():
    ex = {"context": "C", "input": "I"}
    for name in ("gov_report", "trec", "triviaqa", "samsum", "passage_count", "lcc", "repobench-p"):
        assert pr.longbench_parts(name, ex, oprm=True) == pr.longbench_parts(name, ex, oprm=False), name
    for name in pr.IDK_INSTRUCTIONS:
        assert "Error" in pr.longbench_parts(name, ex, oprm=True).question, name


def test_unknown_dataset_is_named():
    with pytest.raises(InputError, match="unknown LongBench dataset 'nope'"):
        pr.longbench_parts("nope", {}, oprm=False)


def test_v2_parts_fill_longbench_v2_s_0shot_prompt():
    item = {"context": "  the doc  ", "question": " Which? ", "choice_A": "one", "choice_B": "two",
            "choice_C": "three", "choice_D": "$C_A$"}
    parts = pr.v2_parts(item, oprm=False)
    assert parts.text() == (
        "Please read the following text and answer the question below.\n\n<text>\nthe doc\n</text>\n\n"
        "What is the correct answer to this question: Which?\nChoices:\n(A) one\n(B) two\n(C) three\n(D) $C_A$\n\n"
        "Format your response as follows: \"The correct answer is (insert answer here)\".")
    opr = pr.v2_parts(item, oprm=True)
    assert '(D) $C_A$ If the text does not contain the information needed to answer, answer "Error".\n\nFormat' \
        in opr.question


def test_generation_lengths():
    assert pr.max_new_tokens_for("gov_report") == 512
    assert pr.max_new_tokens_for("gov_report", "paper") == 500
    assert pr.max_new_tokens_for("dureader", "paper") == 128  # the paper ran no Chinese set: LongBench's
    assert pr.max_new_tokens_for("longbench_v2") == 128
    assert pr.max_new_tokens_for("hotpotqa", override=3) == 3


# ---------------------------------------------------------------------- readers
def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_read_longbench_both_layouts_and_limit(tmp_path):
    _write(tmp_path / "hotpotqa.jsonl", longbench_rows("hotpotqa", 3))
    _write(tmp_path / "data" / "trec.jsonl", longbench_rows("trec", 2))
    exs = ds.read_longbench(tmp_path, "hotpotqa", limit=2)
    assert [e.id for e in exs] == ["hotpotqa-0-0", "hotpotqa-0-1"]
    assert exs[0].input.startswith("What is the code of") and exs[0].answers
    trec = ds.read_longbench(tmp_path, "trec")
    assert trec[0].meta["all_classes"] == ["Location", "Number", "Person", "Description"]


def test_read_longbench_errors_say_what_to_provide(tmp_path):
    with pytest.raises(InputError, match="no qasper.jsonl .*data.zip"):
        ds.read_longbench(tmp_path, "qasper")
    with pytest.raises(InputError, match="no such folder"):
        ds.read_longbench(tmp_path / "missing", "qasper")
    (tmp_path / "hotpotqa.jsonl").write_text('{"input": "q", "context": "c", "answers": ["a"]}\n{not json\n')
    with pytest.raises(InputError, match=r"hotpotqa.jsonl:2: not valid JSON"):
        ds.read_longbench(tmp_path, "hotpotqa")
    (tmp_path / "hotpotqa.jsonl").write_text('{"input": "q", "answers": ["a"]}\n')
    with pytest.raises(InputError, match="missing field 'context'"):
        ds.read_longbench(tmp_path, "hotpotqa")
    rows = longbench_rows("hotpotqa", 2)
    rows[1]["_id"] = rows[0]["_id"]
    _write(tmp_path / "hotpotqa.jsonl", rows)
    with pytest.raises(InputError, match="appears twice"):
        ds.read_longbench(tmp_path, "hotpotqa")


def test_read_longbench_v2_json_and_jsonl(tmp_path):
    (tmp_path / "data.json").write_text(json.dumps(v2_items(3)))
    exs = ds.read_longbench_v2(tmp_path)
    assert len(exs) == 3 and exs[0].dataset == "longbench_v2"
    assert exs[0].meta["difficulty"] == "easy" and exs[1].meta["length_class"] == "medium"
    _write(tmp_path / "v2" / "part.jsonl", v2_items(2))
    assert len(ds.read_longbench_v2(tmp_path / "v2", limit=1)) == 1
    bad = v2_items(1)
    bad[0]["answer"] = "E"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="one of A, B, C, D"):
        ds.read_longbench_v2(tmp_path / "bad.json")
    with pytest.raises(InputError, match="data.json"):
        ds.read_longbench_v2(tmp_path / "empty_dir_that_is_missing")


def test_read_custom(tmp_path):
    _write(tmp_path / "a.jsonl", [{"context": "text", "question": "q?", "answers": "x"},
                                  {"_id": "k", "context": "more", "question": "r?", "answers": ["y", "z"]}])
    exs = ds.read_custom(tmp_path / "a.jsonl")
    assert [(e.id, e.dataset, e.answers) for e in exs] == [("a-1", "a", ["x"]), ("k", "a", ["y", "z"])]
    _write(tmp_path / "b.jsonl", [{"context": " ", "question": "q?", "answers": ["x"]}])
    with pytest.raises(InputError, match="'context' must be a non-empty string"):
        ds.read_custom(tmp_path / "b.jsonl")
    _write(tmp_path / "c.jsonl", [{"context": "t", "question": "q?", "answers": []}])
    with pytest.raises(InputError, match="non-empty list of strings"):
        ds.read_custom(tmp_path / "c.jsonl")


# ---------------------------------------------------------------------- --download
def test_download_without_the_datasets_library_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(InputError) as err:
        ds.download_longbench(tmp_path, ["qasper"])
    assert "`datasets` library is not installed" in str(err.value)
    assert "DIR/qasper.jsonl" in str(err.value)  # and the layout to provide instead


def test_download_with_no_hub_says_so_and_shows_the_layout(tmp_path, monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'THUDM/LongBench' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(InputError) as err:
        ds.download_longbench(tmp_path, ["qasper"])
    msg = str(err.value)
    assert "the hub is not reachable" in msg and "DIR/qasper.jsonl" in msg and "data.zip" in msg
    with pytest.raises(InputError, match="hub is not reachable.*data.json"):
        ds.download_longbench_v2(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_download_writes_the_local_layout(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")

    def load_dataset(repo, name=None, split=None):
        calls.append((repo, name, split))
        return longbench_rows("hotpotqa", 2) if repo == "THUDM/LongBench" else v2_items(2)

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ds.download_longbench(tmp_path, ["hotpotqa"])
    assert calls == [("THUDM/LongBench", "hotpotqa", "test")]
    assert len(ds.read_longbench(tmp_path, "hotpotqa")) == 2
    ds.download_longbench(tmp_path, ["hotpotqa"])  # already there: not fetched again
    assert len(calls) == 1
    ds.download_longbench_v2(tmp_path)
    assert calls[-1] == ("THUDM/LongBench-v2", None, "train")
    assert len(ds.read_longbench_v2(tmp_path)) == 2
