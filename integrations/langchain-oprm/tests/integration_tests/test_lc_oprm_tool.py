"""oprm_tool: content is the selected text, the artifact the Documents, errors help the agent."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import ToolMessage
from langchain_core.tools import ToolException
from lc_oprm_support import DOC, OTHER_DOC, QUESTION, same_documents

from langchain_oprm import OPRMSelector, oprm_tool

SETTINGS: dict[str, Any] = {"chunk_tokens": 24, "idk_filter": False}
DOCUMENTS = {"manual": Document(page_content=DOC, metadata={"source": "manual.txt"}),
             "notes": [Document(page_content=OTHER_DOC), Document(page_content="More notes here.")],
             "plain": "Just a string document."}


def _call(tool: Any, args: dict[str, Any]) -> ToolMessage:
    return tool.invoke({"name": tool.name, "args": args, "id": "call-1", "type": "tool_call"})


def test_content_is_the_selected_text_and_the_artifact_its_documents(primary_path: str) -> None:
    tool = oprm_tool(primary_path, DOCUMENTS, top_k=2, **SETTINGS)
    msg = _call(tool, {"question": QUESTION, "document_id": "manual"})
    expected = OPRMSelector(model=primary_path, top_k=2, **SETTINGS).invoke(
        {"question": QUESTION, "documents": [DOCUMENTS["manual"]]})
    docs = msg.artifact
    assert len(docs) == 2 and msg.status == "success"
    assert all(d.metadata["document_id"] == "manual" and d.metadata["source"] == "manual.txt" for d in docs)
    assert [d.page_content for d in docs] == [d.page_content for d in expected]
    first, second = sorted(docs, key=lambda d: d.metadata["oprm_char_start"])
    adjacent = first.metadata["oprm_char_end"] == second.metadata["oprm_char_start"]
    assert msg.content == first.page_content + ("" if adjacent else "\n\n") + second.page_content


def test_several_documents_under_one_id(primary_path: str) -> None:
    tool = oprm_tool(primary_path, DOCUMENTS, **SETTINGS)
    msg = _call(tool, {"question": "What is the code of gamma?", "document_id": "notes"})
    [doc] = msg.artifact
    assert doc.metadata["document_id"] == "notes" and doc.metadata["oprm_doc_index"] in (0, 1)
    assert msg.content == doc.page_content


def test_unknown_document_id_lists_the_known_ones(primary_path: str) -> None:
    tool = oprm_tool(primary_path, DOCUMENTS, **SETTINGS)
    msg = _call(tool, {"question": QUESTION, "document_id": "manuel"})
    assert msg.status == "error"
    assert msg.content == "Unknown document_id 'manuel'. Known document ids: 'manual', 'notes', 'plain'."
    strict = oprm_tool(primary_path, DOCUMENTS, handle_errors=False, **SETTINGS)
    with pytest.raises(ToolException, match="Known document ids: 'manual', 'notes', 'plain'"):
        strict.invoke({"question": QUESTION, "document_id": "nope"})


def test_engine_errors_reach_the_agent(primary_path: str) -> None:
    tool = oprm_tool(primary_path, DOCUMENTS, chunk_tokens=8)
    msg = _call(tool, {"question": QUESTION * 3, "document_id": "manual"})
    assert msg.status == "error" and "shorten the question" in msg.content
    assert _call(tool, {"question": "  ", "document_id": "manual"}).content.startswith("The question is empty")


def test_no_answer_anywhere(primary_path: str) -> None:
    tool = oprm_tool(primary_path, DOCUMENTS, chunk_tokens=24, entropy_threshold=-1.0)
    msg = _call(tool, {"question": QUESTION, "document_id": "manual"})
    assert msg.artifact == [] and msg.content.startswith("No passage of document 'manual' answers")


async def test_async_call_matches_sync(primary_path: str) -> None:
    tool = oprm_tool(primary_path, DOCUMENTS, **SETTINGS)
    args = {"name": tool.name, "args": {"question": QUESTION, "document_id": "manual"}, "id": "1", "type": "tool_call"}
    sync, asyn = tool.invoke(args), await tool.ainvoke(args)
    assert asyn.content == sync.content and same_documents(asyn.artifact, sync.artifact)


def test_a_selector_brings_its_settings_and_callbacks_see_the_selection(primary_path: str) -> None:
    class Runs(BaseCallbackHandler):
        def __init__(self) -> None:
            self.events: list[str] = []

        def on_tool_start(self, *args: Any, **kwargs: Any) -> None:
            self.events.append("tool_start")

        def on_retriever_end(self, documents: Any, **kwargs: Any) -> None:
            self.events.append(f"retriever_end:{len(documents)}")

        def on_tool_end(self, *args: Any, **kwargs: Any) -> None:
            self.events.append("tool_end")

    tool = oprm_tool(OPRMSelector(model=primary_path, top_k=3, **SETTINGS), DOCUMENTS, name="lookup",
                     description="Look things up.")
    assert tool.name == "lookup" and tool.description == "Look things up."
    runs = Runs()
    tool.invoke({"question": QUESTION, "document_id": "manual"}, config={"callbacks": [runs]})
    assert runs.events == ["tool_start", "retriever_end:3", "tool_end"]
