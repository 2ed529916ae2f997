"""The ``oprm-rag`` command: results, JSON, plots, and clean exits on bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from oprm_rag.cli import main
from oprm_rag.testing import pdf_bytes

DOC = ("The code of alpha is 1234. Mamba models keep a fixed size state. " * 10
       + "OPRM splits the context into chunks. The code of beta is 5678. " * 6)


@pytest.fixture()
def doc_file(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text(DOC)
    return f


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ask_prints_answer_and_winning_span(model_dir, doc_file, capsys):
    code, out, err = run(["ask", doc_file, "-q", "What is the code of alpha?", "--model", model_dir("mamba2"),
                          "--chunk-tokens", "48", "--no-idk-filter", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert out.startswith("Answer: ")
    assert f"From {doc_file}, chars " in out and "entropy" in out
    assert "tokens scored" in err and "Traceback" not in err


def test_ask_json_is_machine_readable(model_dir, doc_file, capsys):
    code, out, _ = run(["ask", doc_file, "-q", "What is the code of beta?", "--model", model_dir("mamba"),
                        "--chunk-tokens", "48", "--json", "--no-idk-filter"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["question"] == "What is the code of beta?" and isinstance(data["answer"], str)
    assert data["winner"]["source"] == str(doc_file)
    assert len(data["chunks"]) > 3 and {"entropy", "char_start", "is_idk"} <= set(data["chunks"][0])


def test_stdin_and_summary(model_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(DOC))
    code, out, _ = run(["ask", "-", "-q", "x", "--summary", "--model", model_dir("mamba2"), "--chunk-tokens", "64",
                        "--json", "--max-new-tokens", "3"], capsys)
    assert code == 0 and json.loads(out)["question"] == "x"  # with --summary, -q says what to summarise for


def test_inspect_writes_a_png_and_chart(model_dir, doc_file, tmp_path, capsys):
    png = tmp_path / "entropy.png"
    code, out, _ = run(["inspect", doc_file, "-q", "What is the code of alpha?", "--model", model_dir("mamba"),
                        "--chunk-tokens", "48", "--plot", png, "--no-idk-filter"], capsys)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<- selected" in out and "legend" in out


def test_cache_dir_makes_the_follow_up_cheap(model_dir, doc_file, tmp_path, capsys):
    args = ["ask", doc_file, "-q", "What is the code of alpha?", "--model", model_dir("mamba2"), "--chunk-tokens",
            "48", "--cache-dir", tmp_path / "cache", "--json"]
    first = json.loads(run(args, capsys)[1])
    second = json.loads(run(args[:3] + ["What is the code of beta?"] + args[4:], capsys)[1])
    assert second["usage"]["cached_chunks"] == len(second["chunks"])
    assert second["usage"]["input_tokens"] < first["usage"]["input_tokens"] / 2


def test_chat_loop_reuses_states(model_dir, doc_file, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the code of alpha?\nWhat is the code of beta?\n"))
    code, out, err = run(["chat", doc_file, "--model", model_dir("mamba2"), "--chunk-tokens", "48"], capsys)
    assert code == 0 and out.startswith("Ready:") and out.count("? ") >= 2


@pytest.mark.parametrize("setup, code, message", [
    ("missing", 1, "no such file"),
    ("empty", 1, "the document is empty"),
    ("pdf", 1, "not a readable PDF"),
    ("folder", 1, "is a folder"),
])
def test_bad_documents_exit_cleanly(model_dir, tmp_path, capsys, setup, code, message):
    path = tmp_path / {"missing": "nope.txt", "empty": "e.txt", "pdf": "bad.pdf", "folder": "d"}[setup]
    if setup == "empty":
        path.write_text("  \n ")
    elif setup == "pdf":
        path.write_bytes(b"%PDF-1.4 this is not really a pdf")
    elif setup == "folder":
        path.mkdir()
    got, out, err = run(["ask", path, "-q", "q?", "--model", model_dir("mamba")], capsys)
    assert got == code and message in err and "Traceback" not in err


def test_model_that_cannot_load_exits_3(tmp_path, doc_file, capsys):
    got, _, err = run(["ask", doc_file, "-q", "q?", "--model", tmp_path / "no-model"], capsys)
    assert got == 3 and "could not load the model" in err


def test_bad_usage_exits_2(doc_file, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ask", str(doc_file), "-q", "q", "--chunk-tokens", "lots"])
    assert exc.value.code == 2


def test_real_pdf_is_read(model_dir, tmp_path, capsys):
    from oprm_rag.readers import read_document

    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(pdf_bytes(["The code of alpha is 1234."]))
    assert "The code of alpha is 1234." in read_document(pdf).text


def test_ctrl_c_during_scoring_exits_130(model_dir, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(DOC * 400)
    proc = subprocess.Popen([sys.executable, "-m", "oprm_rag", "ask", str(big), "-q", "What is the code of alpha?",
                             "--model", str(model_dir("mamba")), "--chunk-tokens", "32", "-v"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # as from a terminal: a shell's background job (nohup ... &) starts
                            # with SIGINT ignored, and Python then never raises KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and "OPRM scoring" not in seen:  # wait until scoring has begun
        seen += proc.stderr.read(1)
        if proc.poll() is not None:
            break
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err


# ---------------------------------------------------------------------- issue 16: one line, the right exit code
def _spawn(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "oprm_rag", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def _wait_for(proc, ready, what: str) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    assert proc.poll() is None, f"the command ended before {what}"


def _native_libraries_loading(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as fh:
            return "libtorch" in fh.read()
    except OSError:
        return False


@pytest.mark.parametrize("moment", ["torch import", "model load"])
def test_ctrl_c_during_start_up_exits_130_without_a_traceback(model_dir, doc_file, moment):
    # The moments that went wrong: inside torch's native start-up, and while weights load.
    # (The interpreter's own first ~50 ms, before any oprm-rag code runs, are Python's.)
    proc = _spawn(["ask", doc_file, "-q", "What is the code of alpha?", "--model", model_dir("mamba2")])
    if moment == "torch import":
        _wait_for(proc, lambda: _native_libraries_loading(proc.pid), "torch loaded")
    else:
        seen = b""

        def loading() -> bool:
            nonlocal seen
            seen += os.read(proc.stderr.fileno(), 1)
            return b"Loading weights" in seen

        _wait_for(proc, loading, "the model loaded")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    text = err.decode("utf-8", "replace")
    assert proc.returncode == 130, text[-2000:]
    assert "interrupted" in text and "Traceback" not in text


def test_stdout_closed_early_is_quiet(model_dir, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(DOC * 300)  # its JSON (every chunk's text) is larger than a pipe's buffer
    proc = _spawn(["inspect", big, "-q", "What is the code of alpha?", "--model", model_dir("mamba2"),
                   "--chunk-tokens", "256", "--json"])
    proc.stdout.read(1)
    proc.stdout.close()  # like `| head -c 1`
    err = proc.stderr.read().decode("utf-8", "replace")
    proc.wait(timeout=120)
    assert proc.returncode == 141, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err


def test_cache_dir_that_is_a_file(model_dir, doc_file, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    got, _, err = run(["ask", doc_file, "-q", "q?", "--model", model_dir("mamba2"), "--cache-dir", blocker], capsys)
    assert got == 2 and "--cache-dir" in err and "Traceback" not in err


@pytest.mark.parametrize("target", ["missing-folder/x.png", "."])
def test_plot_to_a_path_that_cannot_be_written_fails_before_any_work(model_dir, doc_file, tmp_path, capsys, target):
    got, out, err = run(["inspect", doc_file, "-q", "q?", "--model", model_dir("mamba2"), "--plot",
                         tmp_path / target], capsys)
    assert got == 2 and "--plot" in err and out == "" and "Traceback" not in err


def test_serve_rejects_an_impossible_port(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "99999"])
    assert exc.value.code == 2 and "a port is 0-65535" in capsys.readouterr().err


def test_serve_off_loopback_needs_a_token(capsys, monkeypatch):
    monkeypatch.delenv("OPRM_WEB_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "token" in capsys.readouterr().err


def test_internal_faults_are_reported_as_bugs(model_dir, doc_file, capsys, monkeypatch):
    from oprm_rag.selector import OPRMSelector

    def broken(*args, **kwargs):
        raise ValueError("deep inside the model")  # a plain ValueError is not the user's mistake

    monkeypatch.setattr(OPRMSelector, "select_many", broken)
    got, _, err = run(["ask", doc_file, "-q", "q?", "--model", model_dir("mamba2")], capsys)
    assert got == 4 and "internal error" in err and "ValueError: deep inside the model" in err


def test_binary_files_are_refused_in_one_line(model_dir, tmp_path, capsys):
    blob = tmp_path / "image.png"
    blob.write_bytes(bytes(range(256)) * 40)
    got, out, err = run(["ask", blob, "-q", "q?", "--model", model_dir("mamba2")], capsys)
    assert got == 1 and "binary" in err and "Traceback" not in err and out == ""


def test_a_bad_byte_keeps_the_utf8_text_with_a_warning(model_dir, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_bytes(("Café notes: the code of alpha is 1234. " * 5).encode("utf-8") + b"\xff" + b" more text.")
    got, out, err = run(["inspect", f, "-q", "What is the code of alpha?", "--model", model_dir("mamba2"), "--json"],
                        capsys)
    assert got == 0 and "warning" in err and "Café" in json.loads(out)["chunks"][0]["text"]


def test_non_utf8_stdin_is_read_by_the_same_rules(model_dir, capsys, monkeypatch):
    import io

    raw = ("The code of alpha is 1234. " * 4).encode("utf-8") + b"\xe9t\xe9 " + b"and more. " * 3
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    got, out, err = run(["inspect", "-", "-q", "What is the code of alpha?", "--model", model_dir("mamba2"),
                         "--json"], capsys)
    assert got == 0 and "Traceback" not in err and json.loads(out)["chunks"]
