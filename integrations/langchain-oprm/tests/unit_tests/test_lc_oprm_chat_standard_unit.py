"""LangChain's standard unit tests for ChatRecurrent (no model runs here)."""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests
from lc_oprm_support import ChatRecurrentStandardSettings


class TestChatRecurrentStandardUnit(ChatRecurrentStandardSettings, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        # A path: constructing must not touch it (test_init_time builds models in a loop).
        return {"model": "/nonexistent/oprm-model"}
