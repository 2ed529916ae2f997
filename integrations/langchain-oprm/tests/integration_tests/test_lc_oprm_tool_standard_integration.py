"""LangChain's standard integration tests for the ``oprm_tool`` tool, running the model."""

from __future__ import annotations

from typing import Any

from langchain_core.tools import BaseTool
from langchain_tests.integration_tests import ToolsIntegrationTests
from lc_oprm_support import DOC, OTHER_DOC, QUESTION, primary_model_path

from langchain_oprm import oprm_tool


class TestOPRMToolStandardIntegration(ToolsIntegrationTests):
    @property
    def tool_constructor(self) -> BaseTool:
        return oprm_tool(primary_model_path(), {"manual": DOC, "other": OTHER_DOC}, chunk_tokens=24)

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"question": QUESTION, "document_id": "manual"}
