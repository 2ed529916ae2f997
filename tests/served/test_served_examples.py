"""The served-model examples run end to end against a real llama-server (SmolLM2-135M).

They need ``langchain-openai`` / ``llama-index-llms-openai-like`` (skipped without them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _examples_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_langchain_selector_then_chat_openai_on_the_same_server(smol_server) -> None:
    pytest.importorskip("langchain_openai", reason="the example needs langchain-openai")
    import served_langchain

    out = served_langchain.run(smol_server.base_url, "smollm2")
    start, end = out["span"]
    assert served_langchain.DOCUMENT[start:end].strip() == out["chunk"].strip()
    assert out["answer"] and out["entropy"] >= 0


def test_llamaindex_postprocessor_then_openai_like(smol_server) -> None:
    pytest.importorskip("llama_index.llms.openai_like", reason="the example needs llama-index-llms-openai-like")
    sys.modules.pop("served_llamaindex", None)
    import served_llamaindex

    out = served_llamaindex.run(smol_server.base_url, "smollm2")
    assert out["chunk"] in served_llamaindex.DOCUMENT and out["answer"]
