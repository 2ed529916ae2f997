"""``oprm-rag eval`` never writes over its inputs, never mixes two datasets' records, keeps
a damaged results file usable, and reports the user's file and disk problems as such
(exit 1, one line) before any model work; argument ranges are usage errors (exit 2).

Where a check must happen before the model loads, the command is given a model folder
that does not exist: the expected message (not "could not load the model", exit 3)
proves the check came first.
"""

from __future__ import annotations

import errno
import json
import os
import random
import string

import pytest

from oprm_rag.errors import InputError
from oprm_rag.eval.cli import main
from oprm_rag.eval.datasets import Example
from oprm_rag.eval.runner import ERRORS_FILE, ResultStore, RunItem, interleave, records_name, run_items

from .conftest import _write, longbench_rows, v2_items

NO_MODEL = ["--model", "/nonexistent/model-folder"]


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return code, err


def _rows(n=2):
    return [{"context": "The code of abcd is 1234. " * 5, "question": "What is the code of abcd?",
             "answers": ["1234"], "_id": f"r{i}"} for i in range(n)]


# ---------------------------------------------------------------------- results are never an input
def test_results_never_go_into_the_data_file(tmp_path, capsys):
    data = _write(tmp_path / "mydata.jsonl", _rows(3))
    before = data.read_bytes()
    code, err = _run(["custom", "--data", str(data), "--out", str(tmp_path), *NO_MODEL], capsys)
    assert code == 1 and "input file" in err and "mydata.jsonl" in err
    assert data.read_bytes() == before
    # the same through another spelling of the folder, and through a hard link
    code, err = _run(["custom", "--data", str(data), "--out", str(tmp_path / "." / "x" / ".."), *NO_MODEL], capsys)
    assert code == 1 and "input file" in err
    other = tmp_path / "other"
    other.mkdir()
    os.link(data, other / "mydata.jsonl")
    code, err = _run(["custom", "--data", str(other / "mydata.jsonl"), "--out", str(tmp_path), *NO_MODEL], capsys)
    assert code == 1 and "input file" in err
    assert data.read_bytes() == before


def test_longbench_and_v2_and_the_haystack_are_protected_too(tmp_path, capsys):
    lb = tmp_path / "lb"
    _write(lb / "hotpotqa.jsonl", longbench_rows("hotpotqa"))
    before = (lb / "hotpotqa.jsonl").read_bytes()
    code, err = _run(["longbench", "--data", str(lb), "--datasets", "hotpotqa", "--out", str(lb), *NO_MODEL], capsys)
    assert code == 1 and "input file" in err and (lb / "hotpotqa.jsonl").read_bytes() == before
    v2 = tmp_path / "v2"
    _write(v2 / "longbench_v2.jsonl", v2_items(2))
    code, err = _run(["longbench-v2", "--data", str(v2), "--out", str(v2), *NO_MODEL], capsys)
    assert code == 1 and "input file" in err
    hay = tmp_path / "hay.txt"
    hay.write_text("A sentence of prose here. " * 40)
    code, err = _run(["needle", "--haystack", str(hay), "--heatmap", str(hay), "--out", str(tmp_path / "o"),
                      *NO_MODEL], capsys)
    assert code == 1 and "input file" in err and hay.read_text().startswith("A sentence")


# ---------------------------------------------------------------------- one file per dataset
def test_records_names_are_one_to_one():
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + " _-.~%/\\:é错"
    names = {"my data", "my_data", "my~20data", "errors", "Errors", "~errors", "", ".", "..", ".x", "run", "a.b"}
    names |= {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(3000)}
    files = {records_name(n) for n in names}
    assert len(files) == len(names)
    assert ERRORS_FILE not in {f.lower() for f in files}
    assert all(not f.startswith(".") and "/" not in f and "\\" not in f for f in files)
    assert records_name("qasper") == "qasper.jsonl" and records_name("my data") == "my~20data.jsonl"


def test_names_that_differ_only_in_case_are_refused(tmp_path):
    store = ResultStore(tmp_path)
    store.check_config("custom:Data", {"a": 1}, datasets=["Data"])
    with pytest.raises(InputError, match="differ only in case"):
        store.check_config("custom:data", {"a": 1}, datasets=["data"])
    store.check_config("custom:Data", {"a": 1}, datasets=["Data"])  # the same dataset resumes


def test_two_files_whose_names_sanitise_alike_keep_their_own_records(tmp_path, capsys, demo_lm):
    out = tmp_path / "out"
    a = _write(tmp_path / "my data.jsonl", _rows(2))
    b = _write(tmp_path / "my_data.jsonl", [{**r, "answers": ["9999"]} for r in _rows(2)])
    common = ["--mode", "vanilla", "--max-new-tokens", "2", "--out", str(out)]
    assert _run(["custom", "--data", str(a), *common], capsys)[0] == 0
    code, _ = _run(["custom", "--data", str(b), *common], capsys)
    assert code == 0
    recs_a = [json.loads(x) for x in (out / records_name("my data")).read_text().splitlines()]
    recs_b = [json.loads(x) for x in (out / records_name("my_data")).read_text().splitlines()]
    assert [r["answers"] for r in recs_a] == [["1234"]] * 2 and [r["answers"] for r in recs_b] == [["9999"]] * 2
    # a data file named like the error log
    e = _write(tmp_path / "errors.jsonl", _rows(1))
    code, err = _run(["custom", "--data", str(e), *common], capsys)
    assert code == 0, err
    assert json.loads((out / records_name("errors")).read_text())["_id"] == "r0"
    assert not (out / ERRORS_FILE).exists()  # no error happened: the log is not the data's records


# ---------------------------------------------------------------------- damaged results
def _ex(i):
    return Example(id=f"e{i}", dataset="d", context="c", input="q", answers=["a"])


def _record(ex, mode):
    return {"_id": ex.id, "dataset": ex.dataset, "mode": mode, "pred": "a", "answers": ex.answers, "score": 1.0}


@pytest.mark.parametrize("bad", ['{"_id": "e9", "mode": "oprm", "score": 1.0,,}', "[1, 2]", '"text"',
                                 '{"_id": "e9"}', "[" * 50_000 + "]" * 50_000, "\udcff"])
def test_a_complete_bad_line_is_set_aside_and_the_run_resumes(tmp_path, bad):
    store = ResultStore(tmp_path)
    exs = [_ex(i) for i in range(3)]
    items = interleave(exs, ("vanilla",), lambda ex, m: (lambda: _record(ex, m)))
    assert run_items(items[:2], store).done == 2
    with store.path("d").open("ab") as fh:
        fh.write(bad.encode("utf-8", "surrogateescape") + b"\n")  # complete, but not a record
    assert len(store.records("d")) == 2
    stats = run_items(items, store)
    assert (stats.done, stats.skipped) == (1, 2)  # the two good records are kept
    lines = store.path("d").read_text().splitlines()
    assert sorted(json.loads(x)["_id"] for x in lines) == ["e0", "e1", "e2"]
    damaged = store.path("d").with_name(store.path("d").name + ".damaged")
    assert damaged.read_bytes() == bad.encode("utf-8", "surrogateescape") + b"\n"
    assert run_items(items, store).skipped == 3  # and again: nothing to repair


def test_a_damaged_settings_file_is_the_users_problem(tmp_path):
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="run.json is damaged"):
        ResultStore(tmp_path).check_config("needle", {})


# ---------------------------------------------------------------------- the user's files and disks
def test_unreadable_data_is_exit_1_with_the_line(tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps(_rows(1)[0]).encode() + b"\n" + '{"context": "caf\xe9"}'.encode("latin-1") + b"\n")
    code, err = _run(["custom", "--data", str(bad), *NO_MODEL], capsys)
    assert code == 1 and "latin1.jsonl:2: not UTF-8" in err
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    code, err = _run(["custom", "--data", str(deep), *NO_MODEL], capsys)
    assert code == 1 and "nested too deeply" in err
    v2 = tmp_path / "data.json"
    v2.write_text("[" * 100_000 + "]" * 100_000)
    code, err = _run(["longbench-v2", "--data", str(v2), *NO_MODEL], capsys)
    assert code == 1 and "nested too deeply" in err
    v2.write_bytes(b"\xff\xfe[]")
    code, err = _run(["longbench-v2", "--data", str(v2), *NO_MODEL], capsys)
    assert code == 1 and "not UTF-8" in err


def test_outputs_that_cannot_be_written_fail_before_the_model_loads(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", _rows(1))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in ((afile, "is a file, not a folder"), (afile / "sub", "is a file")):
        code, err = _run(["custom", "--data", str(data), "--out", str(out), *NO_MODEL], capsys)
        assert code == 1 and message in err
    for heatmap, message in ((tmp_path, "is a folder"), (afile / "h.png", "is a file, not a folder")):
        code, err = _run(["needle", "--heatmap", str(heatmap), "--out", str(tmp_path / "n"), *NO_MODEL], capsys)
        assert code == 1 and message in err
    (tmp_path / "n2").mkdir()
    (tmp_path / "n2" / "run.json").write_text('"not an object"')
    code, err = _run(["needle", "--out", str(tmp_path / "n2"), *NO_MODEL], capsys)
    assert code == 1 and "damaged" in err
    assert not (tmp_path / "n").exists()  # nothing made before the model loaded


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the EROFS test below covers it")
def test_a_read_only_out_folder(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", _rows(1))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, err = _run(["custom", "--data", str(data), "--out", str(ro / "x"), *NO_MODEL], capsys)
    finally:
        ro.chmod(0o700)
    assert code == 1 and "cannot write" in err


def test_read_only_and_full_disks_are_one_line(tmp_path, capsys, monkeypatch):
    import tempfile

    data = _write(tmp_path / "d.jsonl", _rows(1))

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        code, err = _run(["custom", "--data", str(data), "--out", str(tmp_path / "o"), *NO_MODEL], capsys)
    assert code == 1 and "read-only" in err
    store = ResultStore(tmp_path / "full")
    real_open = type(store.dir).open

    def full(self, mode="r", *a, **k):
        if "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_open(self, mode, *a, **k)

    monkeypatch.setattr(type(store.dir), "open", full)
    with pytest.raises(InputError, match="disk is full"):
        run_items([RunItem(_ex(0), "oprm", lambda: _record(_ex(0), "oprm"))], store)


# ---------------------------------------------------------------------- argument ranges: exit 2 before the model
@pytest.mark.parametrize("flags, message", [
    (["--depths", "1.5"], "0 (start) to 1 (end)"), (["--depths", "nan"], "0 (start) to 1 (end)"),
    (["--depths", "-0.1"], "0 (start) to 1 (end)"), (["--lengths", "0"], "at least 16"),
    (["--lengths", "-512"], "at least 16"), (["--lengths", "99999999999"], "at most 16,000,000"), (["--distractors", "-3"], ">= 0"), (["--distractors", "inf"], ">= 0"),
    (["--depths", "0.1234567,0.1234568"], "same to 6 digits"), (["--trials", "0"], ">= 1"),
])
def test_needle_ranges_are_usage_errors(flags, message, capsys):
    code, err = _run(["needle", *flags, *NO_MODEL], capsys)
    assert code == 2 and message in err


# ---------------------------------------------------------------------- served: one over-long example
def test_an_over_long_example_on_a_server_is_logged_like_in_process(tmp_path):
    from oprm_rag.eval.tasks import _guard
    from oprm_rag.served.errors import ContextOverflowError, ServerUnavailableError

    store = ResultStore(tmp_path)
    exs = [_ex(i) for i in range(3)]

    def make(ex, mode):
        def work():
            if ex.id == "e1":
                raise ContextOverflowError("the server at http://x/v1 holds 512 tokens per sequence")
            return _record(ex, mode)
        return _guard(work)

    stats = run_items(interleave(exs, ("oprm",), make), store, max_concurrency=3)
    assert stats.done == 2 and len(stats.errors) == 1
    assert "512 tokens" in (tmp_path / ERRORS_FILE).read_text()

    def down():
        raise ServerUnavailableError("cannot reach the server")

    with pytest.raises(ServerUnavailableError):  # a server that is down still stops the run
        run_items([RunItem(_ex(5), "oprm", _guard(down))], store)
