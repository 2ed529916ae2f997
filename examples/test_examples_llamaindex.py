"""Runs examples/llamaindex_query_engine.py as a user would (a subprocess, offline)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llamaindex_query_engine.py"


def run(args: List[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def check_answers(out: str) -> None:
    assert "[1] OPRMQueryEngine answer:" in out
    assert "streamed:" in out
    assert "[2] standard wiring answer:" in out
    assert "chunks scored" in out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from oprm_rag.testing import save_tiny_model

    return save_tiny_model("mamba2", tmp_path_factory.mktemp("example_model") / "mamba2")


def test_example_on_a_generated_long_document(tiny_model_dir):
    proc = run(["--model", str(tiny_model_dir), "--chunk-tokens", "128"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_answers(proc.stdout)
    assert "(expected: " in proc.stdout
    # a 6000-char document cut into 128-token chunks: several chunks competed
    scored = int(proc.stdout.split(" chunks scored")[0].rsplit(", ", 1)[1])
    assert scored > 5


def test_example_on_a_folder(tiny_model_dir, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "alpha.txt").write_text("The code of alpha is 1234. Mamba models keep a fixed size state. " * 5)
    (folder / "beta.md").write_text("The code of beta is 5678. Long documents overflow that state.")
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    proc = run(["--model", str(tiny_model_dir), "--docs", str(folder), "--question", "What is the code of alpha?",
                "--chunk-tokens", "32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_answers(proc.stdout)
    assert "documents: 2," in proc.stdout
    assert "source: alpha.txt" in proc.stdout or "source: beta.md" in proc.stdout


def test_example_on_the_shipped_model():
    from oprm_rag import DEMO_MODEL

    proc = run([])
    if Path(DEMO_MODEL, "model.safetensors").is_file():
        assert proc.returncode == 0, proc.stderr[-3000:]
        check_answers(proc.stdout)
        assert "source holds the fact:" in proc.stdout or "answer: 'Error'" in proc.stdout
    else:
        assert proc.returncode == 2
        assert "demo model is missing" in proc.stderr and "--model" in proc.stderr
        assert "Traceback" not in proc.stderr
