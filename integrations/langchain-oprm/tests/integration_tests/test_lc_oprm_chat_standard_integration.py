"""LangChain's standard integration tests for ChatRecurrent, on a real (local) model.

The model is the shipped demo model when its weights are present, else a tiny
random-weight Mamba-2 (it produces odd text, but real tokens: a small ``max_tokens``
keeps the suite fast). The class and the unsupported features are declared in
``ChatRecurrentStandardSettings``, shared with the unit suite.
"""

from __future__ import annotations

from typing import Any

from langchain_tests.integration_tests import ChatModelIntegrationTests
from lc_oprm_support import ChatRecurrentStandardSettings, other_model_path, primary_model_path


class TestChatRecurrentStandardIntegration(ChatRecurrentStandardSettings, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": primary_model_path(), "max_tokens": 8}

    @property
    def model_override_value(self) -> str:
        # Per-call `model=` names another model folder; it loads once and is shared.
        return other_model_path()
