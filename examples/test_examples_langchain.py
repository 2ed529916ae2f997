"""Run the LangChain examples end to end: on the shipped demo model when its weights are
present, else on a tiny offline Mamba-2 (random weights: the answers are noise, but
every step — selection, handoff, tool calls — runs for real)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

torch.set_num_threads(1)

EXAMPLES = Path(__file__).resolve().parent


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the example's annotations through it
    spec.loader.exec_module(module)
    return module


def _demo_available() -> bool:
    from oprm_rag import DEMO_MODEL

    return (Path(DEMO_MODEL) / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from oprm_rag import DEMO_MODEL
    from oprm_rag.testing import save_tiny_model

    if _demo_available():
        return DEMO_MODEL
    return str(save_tiny_model("mamba2", tmp_path_factory.mktemp("examples") / "tiny_mamba2"))


def test_qa_chain_example_answers_from_the_handed_off_state(model_path: str, capsys: pytest.CaptureFixture) -> None:
    qa = _load("langchain_qa_chain")
    result = qa.run(model_path, facts=8, seed=7, chunk_tokens=64)
    assert result["handoff_hit"] is True
    usage = result["usage"]
    assert usage["input_token_details"]["cache_read"] == usage["input_tokens"] > 0
    assert usage["output_tokens"] <= 8
    chunk = result["chunk"]
    assert chunk.metadata["oprm_char_end"] - chunk.metadata["oprm_char_start"] == len(chunk.page_content)

    assert qa.main(["--model", model_path, "--facts", "8", "--chunk-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert f"Question: {result['question']}" in out
    assert f"Answer:   {result['answer']!r}" in out
    assert "Handoff hit: True" in out


def test_qa_chain_example_explains_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    qa = _load("langchain_qa_chain")
    assert qa.main(["--model", str(tmp_path / "no-model")]) == 1
    assert "pass --model PATH" in capsys.readouterr().err
    if not _demo_available():
        assert qa.main([]) == 1
        assert "The shipped demo model is missing" in capsys.readouterr().err


def test_agent_example_recovers_from_a_bad_id_and_quotes_the_passage(model_path: str) -> None:
    from langchain_core.messages import AIMessage, ToolMessage

    from langchain_oprm import oprm_tool

    agent = _load("langchain_agent")
    documents, question, _ = agent.build_documents(seed=3, facts=8)
    tool = oprm_tool(model_path, documents, chunk_tokens=64)
    driver = agent.ScriptedToolCaller(calls=[
        {"name": tool.name, "args": {"question": question, "document_id": "log book"}},
        {"name": tool.name, "args": {"question": question, "document_id": "logbook"}},
    ])
    messages = agent.run_agent(driver, tool, question)
    tool_messages = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(tool_messages) == 2
    bad, good = tool_messages
    assert bad.status == "error" and "Known document ids: 'handbook', 'logbook'" in bad.content
    assert good.status == "success"
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    if good.artifact:
        assert all(d.metadata["document_id"] == "logbook" for d in good.artifact)
        for doc in good.artifact:
            assert doc.page_content == documents["logbook"][doc.metadata["oprm_char_start"]:doc.metadata["oprm_char_end"]]
        assert good.content in final.content
    else:  # the model answered the IDK word for every chunk
        assert good.content.startswith("No passage of document 'logbook'")


def test_agent_example_main_runs_offline(model_path: str, capsys: pytest.CaptureFixture) -> None:
    agent = _load("langchain_agent")
    assert agent.main(["--model", model_path, "--chunk-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "scripted stand-in" in out
    assert "[tool] Unknown document_id 'log book'. Known document ids: 'handbook', 'logbook'." in out
