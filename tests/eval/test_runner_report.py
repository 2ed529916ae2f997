"""The runner's records, resume, truncation and concurrency; the report's arithmetic (no model)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from oprm_rag.errors import InputError
from oprm_rag.eval import report as rp
from oprm_rag.eval.datasets import Example
from oprm_rag.eval.prompts import PromptParts
from oprm_rag.eval.runner import ResultStore, RunItem, interleave, is_served, run_items, truncate_middle


class CharModel:
    """A stand-in model whose tokens are characters (for truncation arithmetic)."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_truncate_middle_keeps_first_and_last_half_of_the_prompt():
    parts = PromptParts("PP", "abcdefghij", "QQQ")
    same, cut = truncate_middle(parts, CharModel(), 15)
    assert same == parts and not cut  # 15 tokens fit
    short, cut = truncate_middle(parts, CharModel(), 10)
    assert cut
    # LongBench keeps tokens [:5] + [-5:] of "PPabcdefghijQQQ" = "PPabc" + "ijQQQ"
    assert short.text() == "PPabc" + "ijQQQ"
    assert short.instruction == "PP" and short.question == "QQQ"


def _ex(i, dataset="d"):
    return Example(id=f"e{i}", dataset=dataset, context="c", input="q", answers=["a"])


def _record(ex, mode, score=1.0):
    return {"_id": ex.id, "dataset": ex.dataset, "mode": mode, "pred": "a", "answers": ex.answers, "score": score}


def test_store_resumes_and_cuts_a_half_written_last_line(tmp_path):
    store = ResultStore(tmp_path)
    exs = [_ex(i) for i in range(3)]
    items = interleave(exs, ("vanilla", "oprm"), lambda ex, m: (lambda: _record(ex, m)))
    stats = run_items(items[:3], store)
    assert stats.done == 3
    with store.path("d").open("a") as fh:
        fh.write('{"_id": "e1", "dataset": "d", "mo')  # a write cut by a crash
    assert len(store.records("d")) == 3  # the broken last line is not a record
    stats = run_items(items, store)
    assert (stats.done, stats.skipped) == (3, 3)
    lines = store.path("d").read_text().splitlines()
    recs = [json.loads(line) for line in lines]  # every line is whole JSON again
    assert sorted((r["_id"], r["mode"]) for r in recs) == sorted((e.id, m) for e in exs for m in ("vanilla", "oprm"))


def test_input_errors_are_logged_not_recorded_and_retried(tmp_path):
    store = ResultStore(tmp_path)
    ex = _ex(0)

    def bad():
        raise InputError("the question takes 900 tokens, as many as a chunk")

    stats = run_items([RunItem(ex, "oprm", bad)], store)
    assert stats.done == 0 and len(stats.errors) == 1
    assert store.records("d") == []
    assert "900 tokens" in (tmp_path / "errors.jsonl").read_text()
    stats = run_items([RunItem(ex, "oprm", lambda: _record(ex, "oprm"))], store)
    assert stats.done == 1  # a rerun retries it


def test_other_exceptions_stop_the_run_and_keep_what_was_recorded(tmp_path):
    store = ResultStore(tmp_path)
    exs = [_ex(i) for i in range(3)]

    def boom():
        raise KeyboardInterrupt

    items = [RunItem(exs[0], "oprm", lambda: _record(exs[0], "oprm")), RunItem(exs[1], "oprm", boom),
             RunItem(exs[2], "oprm", lambda: _record(exs[2], "oprm"))]
    with pytest.raises(KeyboardInterrupt):
        run_items(items, store)
    assert [r["_id"] for r in store.records("d")] == ["e0"]


def test_concurrent_runs_overlap_and_record_every_item_once(tmp_path):
    store = ResultStore(tmp_path)
    active, peak, lock = [0], [0], threading.Lock()

    def make(ex, mode):
        def work():
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1
            return _record(ex, mode)
        return work

    exs = [_ex(i) for i in range(12)]
    stats = run_items(interleave(exs, ("vanilla", "oprm"), make), store, max_concurrency=4)
    assert stats.done == 24 and peak[0] > 1 and peak[0] <= 4
    recs = store.records("d")
    assert len({(r["_id"], r["mode"]) for r in recs}) == len(recs) == 24


def test_config_mismatch_is_refused(tmp_path):
    store = ResultStore(tmp_path)
    store.check_config("longbench", {"model": "m", "chunk_tokens": 2000})
    store.check_config("longbench", {"model": "m", "chunk_tokens": 2000})  # same run: fine
    store.check_config("needle", {"model": "other"})  # another benchmark in the same folder: fine
    with pytest.raises(InputError, match="chunk_tokens: 2000 before, 1000 now"):
        store.check_config("longbench", {"model": "m", "chunk_tokens": 1000})


def test_is_served_only_for_engines_without_states():
    from oprm_rag.engine import Engine
    from oprm_rag.engine.local import InProcessEngine, LocalEngine, ReplayEngine

    class Remote(Engine):
        pass

    Remote.__abstractmethods__ = frozenset()
    local, replay = object.__new__(LocalEngine), object.__new__(ReplayEngine)  # in process: one call at a time
    assert isinstance(local, InProcessEngine) and isinstance(replay, InProcessEngine)
    assert is_served(Remote()) and not is_served(local) and not is_served(replay) and not is_served(CharModel())


# ---------------------------------------------------------------------- report
def _recs(dataset, scores, mode, length=None):
    return [{"_id": f"{dataset}{i}", "dataset": dataset, "mode": mode, "score": s, "length": length}
            for i, s in enumerate(scores)]


def test_longbench_summary_by_hand():
    records = {
        "hotpotqa": _recs("hotpotqa", [1, 0, 1, 1], "vanilla", 3000) + _recs("hotpotqa", [1, 1, 1], "oprm", 3000),
        "gov_report": _recs("gov_report", [0.2, 0.4], "vanilla", 9000) + _recs("gov_report", [0.3, 0.5], "oprm", 9000),
    }
    s = rp.longbench_summary(records, ("vanilla", "oprm"), model="tiiuae/falcon-mamba-7b-instruct")
    # hotpotqa: only the 3 ids with both modes count: vanilla [1, 0, 1] -> 66.67, oprm 100
    assert s["datasets"]["hotpotqa"] == {"n": {"vanilla": 3, "oprm": 3}, "score": {"vanilla": 66.67, "oprm": 100.0},
                                         "delta": 33.33}
    assert s["datasets"]["gov_report"]["score"] == {"vanilla": 30.0, "oprm": 40.0}
    assert s["categories"]["Multi-Document QA"] == {"vanilla": 66.67, "oprm": 100.0}
    assert s["average"] == {"vanilla": 48.34, "oprm": 70.0}  # (66.67 + 30) / 2, (100 + 40) / 2
    assert s["relative_gain"] == round(70.0 / 48.34 - 1, 4)
    assert s["length_buckets"]["vanilla"] == {"0-4k": 66.67, "4-8k": None, "8k+": 30.0}
    paper = s["paper"]
    assert paper["model"] == "Falcon-Mamba-Inst-7B" and paper["relative_gain"] == 0.28
    assert paper["difference"] == round(s["relative_gain"] - 0.28, 4) and paper["same_datasets"] is False
    md = rp.markdown(s)
    assert "| hotpotqa | 3/3 | 66.67 | 100.00 | +33.33 |" in md
    assert "Paper (Falcon-Mamba-Inst-7B): +28% on LongBench" in md and "arXiv:2505.07793" in md


def test_paper_numbers_only_for_models_the_paper_reports():
    assert rp.paper_entry("/models/Falcon3-Mamba-7B-Instruct/")[0] == "Falcon3-Mamba-Inst-7B"
    assert rp.paper_entry("RWKV/v6-Finch-7B-HF")[1]["longbench_relative_gain"] == 0.51
    assert rp.paper_entry("oprm_rag/demo/model") is None
    s = rp.longbench_summary({"hotpotqa": _recs("hotpotqa", [1], "oprm")}, ("oprm",), model="demo")
    assert "paper" not in s and "relative_gain" not in s
    assert "| hotpotqa | 1 | 100.00 |" in rp.markdown(s)


def test_v2_summary_by_hand():
    def rec(i, mode, score, diff, length):
        return {"_id": str(i), "mode": mode, "score": score, "difficulty": diff, "length_class": length}

    recs = [rec(0, "vanilla", 0, "easy", "short"), rec(1, "vanilla", 1, "hard", "long"),
            rec(0, "oprm", 1, "easy", "short"), rec(1, "oprm", 1, "hard", "long")]
    s = rp.v2_summary(recs, ("vanilla", "oprm"))
    assert s["accuracy"]["vanilla"]["overall"] == 50.0 and s["accuracy"]["oprm"]["overall"] == 100.0
    assert s["delta"]["easy"] == 100.0 and s["delta"]["hard"] == 0.0 and s["delta"]["medium"] is None
    assert "| overall | 2 | 50.0 | 100.0 | +50.0 |" in rp.markdown(s)


def test_vanilla_budget_leaves_room_for_the_answer_on_models_with_a_position_limit():
    from oprm_rag.eval.runner import Predictor

    p = Predictor.__new__(Predictor)  # only the budget arithmetic, no model
    p.max_length, p.position_limit = None, 4096
    assert p.prompt_budget(32) == 4096 - 32 - Predictor.TEMPLATE_MARGIN
    p.max_length = 3500  # an explicit budget (LongBench's model2maxlen) wins
    assert p.prompt_budget(32) == 3500
    p.max_length, p.position_limit = None, None  # recurrent: the whole context, as the paper's vanilla
    assert p.prompt_budget(32) is None
