"""LangChain's standard unit tests for ChatRecurrent (no model runs here)."""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_oprm import ChatRecurrent


class TestChatRecurrentStandardUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatRecurrent]:
        return ChatRecurrent

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # A path: constructing must not touch it (test_init_time builds models in a loop).
        return {"model": "/nonexistent/oprm-model"}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False
