"""LangChain's standard unit tests for the tool made by ``oprm_tool``."""

from __future__ import annotations

from typing import Any

from langchain_core.tools import BaseTool
from langchain_tests.unit_tests import ToolsUnitTests
from lc_oprm_support import DOC, OTHER_DOC, QUESTION

from langchain_oprm import oprm_tool


class TestOPRMToolStandardUnit(ToolsUnitTests):
    @property
    def tool_constructor(self) -> BaseTool:
        # Construction loads nothing, so an unreachable path is enough here.
        return oprm_tool("/nonexistent/oprm-model", {"manual": DOC, "other": OTHER_DOC}, chunk_tokens=24)

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"question": QUESTION, "document_id": "manual"}
