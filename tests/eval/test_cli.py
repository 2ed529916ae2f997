"""The whole ``oprm-rag eval`` command on the shipped model, over fixtures of every dataset type.

The shipped model only knows the recall task, so on LongBench-shaped prompts it answers
nonsense: these tests check the pipeline (records, modes, summary mode, resume, the
summary files, errors), never the quality. Sizes are tiny (``--limit``, a few generated
tokens) to keep the file near half a minute of CPU.
"""

from __future__ import annotations

import json

import pytest

from oprm_rag.eval import metrics
from oprm_rag.eval.cli import main
from oprm_rag.eval.runner import Predictor

from .conftest import FIXTURE_DATASETS
from oprm_rag import resolve

RECORD_FIELDS = {"_id", "dataset", "mode", "pred", "answers", "score"}


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(autouse=True)
def _model_loaded_once(demo_lm):
    """The CLI resolves the shipped model through the registry: load it once for the file."""
    yield


def test_longbench_every_dataset_type_both_modes(longbench_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["longbench", "--data", str(longbench_dir), "--datasets", ",".join(FIXTURE_DATASETS),
                 "--mode", "both", "--limit", "1", "--max-new-tokens", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for name in FIXTURE_DATASETS:
        recs = _records(out / f"{name}.jsonl")
        assert sorted(r["mode"] for r in recs) == ["oprm", "vanilla"], name
        for r in recs:
            assert RECORD_FIELDS <= set(r), name
            # the stored score is the dataset's LongBench metric of the stored prediction
            expected = metrics.score_example(name, r["pred"], r["answers"], r.get("all_classes"))
            assert r["score"] == pytest.approx(expected), name
        oprm = next(r for r in recs if r["mode"] == "oprm")
        vanilla = next(r for r in recs if r["mode"] == "vanilla")
        assert vanilla["usage"]["chunks"] == 1 and vanilla["chunk_tokens"] is None
        if name == "lcc":  # the paper's code: only the last chunk of the file, no selection
            assert oprm["usage"]["chunks"] == 1 and oprm["chunk_tokens"] > 0
        else:
            assert oprm["usage"]["chunks"] >= 2, name  # fixtures are longer than one chunk
        if name == "gov_report":  # summary mode decodes from every chunk: more tokens than one answer's 3
            assert oprm["usage"]["output_tokens"] > 3 and vanilla["usage"]["output_tokens"] <= 3
    summary = json.loads((out / "longbench_summary.json").read_text())
    assert set(summary["datasets"]) == set(FIXTURE_DATASETS)
    assert summary["categories"]["Summarization"]["oprm"] == summary["datasets"]["gov_report"]["score"]["oprm"]
    printed = capsys.readouterr().out
    assert "| passage_count | 1/1 |" in printed and "**average**" in printed
    assert (out / "longbench_summary.md").read_text().strip() in printed


def test_longbench_v2_both_modes(v2_file, tmp_path, capsys):
    out = tmp_path / "v2out"
    assert main(["longbench-v2", "--data", str(v2_file), "--max-new-tokens", "4", "--out", str(out)]) == 0
    recs = _records(out / "longbench_v2.jsonl")
    assert len(recs) == 6 and {r["mode"] for r in recs} == {"vanilla", "oprm"}
    for r in recs:
        assert r["choice"] == metrics.extract_choice(r["pred"])
        assert r["score"] == float(r["choice"] == r["answers"][0])
        assert r["difficulty"] in ("easy", "hard") and r["length_class"] in ("short", "medium", "long")
    summary = json.loads((out / "longbench_v2_summary.json").read_text())
    assert summary["accuracy"]["oprm"]["n"] == 3
    assert "| overall | 3 |" in capsys.readouterr().out


def test_custom_resumes_after_an_interrupt_without_repeating_or_losing(custom_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "custom"
    argv = ["custom", "--data", str(custom_file), "--max-new-tokens", "4", "--chunk-tokens", "200",
            "--out", str(out)]
    real = Predictor.predict_own_prompt
    calls = []

    def flaky(self, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third answer
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_own_prompt", flaky)
    assert main(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    path = out / "mydocs.jsonl"
    first = _records(path)
    assert [(r["_id"], r["mode"]) for r in first] == [("mydocs-1", "vanilla"), ("mydocs-1", "oprm")]
    with path.open("a", encoding="utf-8") as fh:
        fh.write('{"_id": "mydocs-2", "dataset": "myd')  # and the process died mid-write

    monkeypatch.setattr(Predictor, "predict_own_prompt", real)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 answered, 2 already recorded" in printed
    recs = _records(path)  # every line parses: the broken one was cut
    keys = [(r["_id"], r["mode"]) for r in recs]
    assert len(keys) == len(set(keys)) == 6
    assert recs[:2] == first  # what was written before the interrupt is kept as it was
    for r in recs:
        assert r["score"] == pytest.approx(metrics.score_example("mydocs", r["pred"], r["answers"],
                                                                 metric=metrics.qa_f1))
    assert main(argv) == 0  # a third run has nothing left to do
    assert "0 answered, 6 already recorded" in capsys.readouterr().out

    # resuming the same folder with other settings would mix two runs in one table
    assert main([*argv[:-4], "--chunk-tokens", "300", "--out", str(out)]) == 1
    assert "chunk_tokens: 200 before, 300 now" in capsys.readouterr().err


def test_needle_heatmap(tmp_path, capsys):
    out = tmp_path / "needle"
    png = tmp_path / "heat.png"
    assert main(["needle", "--lengths", "128,600", "--depths", "0,1", "--trials", "1", "--out", str(out),
                 "--heatmap", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "needle_summary.json").read_text())
    assert summary["lengths"] == [128, 600] and summary["depths"] == [0.0, 1.0]
    for mode in ("vanilla", "oprm"):
        cells = [v for row in summary["accuracy"][mode] for v in row]
        assert len(cells) == 4 and all(v in (0.0, 1.0) for v in cells)  # one trial per cell
    recs = _records(out / "needle.jsonl")
    assert len(recs) == 8 and all(r["tokens"] > 100 for r in recs)
    assert any(r["mode"] == "oprm" and r["usage"]["chunks"] >= 2 for r in recs if r["length"] == 600)
    assert "| 600 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, code, message", [
    (["longbench", "--data", "{tmp}/nowhere", "--datasets", "qasper"], 1, "no such folder"),
    (["longbench", "--data", "{tmp}", "--datasets", "qasperx"], 2, "unknown LongBench dataset"),
    (["longbench", "--datasets", "qasper"], 2, "--data DIR is required"),
    (["custom", "--data", "{tmp}/x.jsonl", "--base-url", "http://127.0.0.1:9/v1"], 1, "no such file"),
    (["needle", "--base-url", "http://127.0.0.1:9/v1"], 2, "--base-url needs --model"),
    (["needle", "--model", "{tmp}/no-model-here"], 3, "could not load the model"),
    (["needle", "--mode", "oprm", "--chunk-tokens", "none"], 2, "plain inference"),
    (["needle", "--lengths", "8"], 2, "at least 16"),
    (["longbench", "--nonsense"], 2, "unrecognized arguments"),
])
def test_errors_are_one_line_and_an_exit_code(argv, code, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_download_error_names_the_hub_and_the_layout(tmp_path, capsys, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("datasets")

    def load_dataset(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert main(["longbench", "--download", "--data", str(tmp_path), "--datasets", "qasper"]) == 1
    err = capsys.readouterr().err
    assert "could not download LongBench: the hub is not reachable" in err
    assert "DIR/qasper.jsonl" in err and "Traceback" not in err


def test_base_url_runs_examples_concurrently_with_the_same_answers(custom_file, tmp_path, monkeypatch, demo_lm):
    """--base-url wiring and concurrency, with the served backend stood in by an engine
    that holds no states (as a server client): the shipped model behind the Engine seam.
    The answers must equal an in-process run's (no cross-talk between examples in flight).
    The real served backend (#10) gets its own test against a llama.cpp server there."""
    import sys
    import types

    from oprm_rag import resolve
    from oprm_rag.engine import Engine
    from oprm_rag.eval import runner

    class Loopback(Engine):
        """A server client's shape (no in-process model: examples may be in flight at once),
        answering through the shipped model's engine."""

        def __init__(self, base_url, model, api_key=None, tokenizer=None):
            self.inner = resolve(demo_lm)
            self.base_url, self.model_name, self.api_key = base_url, model, api_key

        def describe(self):
            return self.inner.describe()

        def encode_with_offsets(self, text):
            return self.inner.encode_with_offsets(text)

        def encode(self, text):
            return self.inner.encode(text)

        def encode_prefix(self, text, *, chat=False):
            return self.inner.encode_prefix(text, chat=chat)

        def decode(self, ids):
            return self.inner.decode(ids)

        def idk_token_ids(self, idk_word):
            return self.inner.idk_token_ids(idk_word)

        def apply_chat_template(self, messages):
            return self.inner.apply_chat_template(messages)

        def extend(self, states, rows, *, logits="last"):
            return self.inner.extend(states, rows, logits=logits)

        def first_tokens(self, extension, idk_ids):
            return self.inner.first_tokens(extension, idk_ids)

        def row_logits(self, extension, row):
            return self.inner.row_logits(extension, row)

        def cat_states(self, states):
            return self.inner.cat_states(states)

        def stream(self, state, logits, config, *, prompt_tokens=0):
            return self.inner.stream(state, logits, config, prompt_tokens=prompt_tokens)

    served = types.ModuleType("oprm_rag.served")
    served.OpenAICompatibleLM = Loopback
    monkeypatch.setitem(sys.modules, "oprm_rag.served", served)
    workers = []
    real = runner._run_concurrently

    def spy(todo, n, finish):
        workers.append(n)
        return real(todo, n, finish)

    monkeypatch.setattr(runner, "_run_concurrently", spy)
    common = ["custom", "--data", str(custom_file), "--max-new-tokens", "4", "--chunk-tokens", "200"]
    assert main([*common, "--base-url", "http://127.0.0.1:9/v1", "--model", "demo", "--api-key", "k",
                 "--max-concurrency", "3", "--out", str(tmp_path / "served")]) == 0
    assert workers == [3]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    assert workers == [3]  # the in-process run did not go concurrent

    def preds(folder):
        return {(r["_id"], r["mode"]): r["pred"] for r in _records(folder / "mydocs.jsonl")}

    assert preds(tmp_path / "served") == preds(tmp_path / "local")


def test_vanilla_middle_truncation_to_a_token_budget(longbench_dir, tmp_path):
    out = tmp_path / "cut"
    assert main(["longbench", "--data", str(longbench_dir), "--datasets", "hotpotqa", "--mode", "vanilla",
                 "--limit", "1", "--max-new-tokens", "2", "--max-length", "200", "--out", str(out)]) == 0
    (rec,) = _records(out / "hotpotqa.jsonl")
    assert rec["truncated"] is True
    # the model read P + the context's first and last tokens + Q: about the budget, far below the
    # fixture's ~700 tokens (re-tokenising the two cut pieces may move a token or two). Nominal
    # tokens: a memoised instruction state (from an earlier test) would not count in input_tokens.
    assert 190 <= rec["usage"]["nominal_input_tokens"] <= 205
