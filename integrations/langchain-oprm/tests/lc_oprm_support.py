"""Models, texts and helpers for the langchain-oprm tests (a helper module, not a test file).

Properties of LangChain's standard test classes cannot take fixtures, so the model
folders come from functions that build them once per process: the shipped demo model
when its weights are present, else tiny random-weight Mamba-2 folders written by
``oprm_rag.testing`` (offline, a few hundred KB). Two tiny folders cover both prompt
modes: one whose tokenizer has a chat template (the OPRM prompt then uses it) and one
with a raw-text OPRM prompt, like the demo model.

The helpers below are what several test files need alike: a callback handler that
keeps streamed tokens, a probe that counts event-loop turns while blocking model work
should run in a worker thread, and the settings both standard ChatRecurrent suites
declare, so the unit and integration suites cannot drift apart.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from langchain_core.callbacks import BaseCallbackHandler

from langchain_oprm import ChatRecurrent

DOC = (
    "The code of alpha is 1234. Mamba models keep a fixed size state. Long documents overflow that state. " * 4
    + "OPRM splits the context into chunks and scores each chunk. The code of beta is 5678. " * 3
)
OTHER_DOC = "A short one. The code of gamma is 4321."
QUESTION = "What is the code of alpha?"


@lru_cache(maxsize=1)
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="langchain_oprm_tests_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def demo_model_available() -> bool:
    from oprm_rag import DEMO_MODEL

    return (Path(DEMO_MODEL) / "model.safetensors").is_file()


@lru_cache(maxsize=1)
def tiny_chat_path() -> str:
    """A tiny Mamba-2 whose tokenizer has a chat template (OPRM prompt in chat mode)."""
    from oprm_rag.testing import save_tiny_model

    return str(save_tiny_model("mamba2", _root() / "tiny_chat", seed=0))


@lru_cache(maxsize=1)
def tiny_raw_path() -> str:
    """A tiny Mamba-2 with a raw-text OPRM prompt (``use_chat_template`` off)."""
    from oprm_rag.prompts import PromptTemplate
    from oprm_rag.testing import save_tiny_model

    prompt = json.dumps(PromptTemplate(use_chat_template=False).to_dict())
    return str(save_tiny_model("mamba2", _root() / "tiny_raw", seed=1, extra_files={"oprm_prompt.json": prompt}))


def primary_model_path() -> str:
    """The shipped demo model when its weights exist, else the tiny chat-template one."""
    from oprm_rag import DEMO_MODEL

    return DEMO_MODEL if demo_model_available() else tiny_chat_path()


def raw_model_path() -> str:
    """A raw-prompt model: the demo model when present, else the tiny raw one."""
    from oprm_rag import DEMO_MODEL

    return DEMO_MODEL if demo_model_available() else tiny_raw_path()


def other_model_path() -> str:
    """A second model, different from ``primary_model_path`` (per-call override tests)."""
    return tiny_raw_path() if primary_model_path() != tiny_raw_path() else tiny_chat_path()


def same_documents(a: list, b: list, tol: float = 1e-5) -> bool:
    """Equal selections: same chunks, same metadata, scores equal up to float noise
    (a chunk scored in a batch of rows may differ from a batch of one in the last bits)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.page_content != y.page_content or x.metadata.keys() != y.metadata.keys():
            return False
        for key, value in x.metadata.items():
            other = y.metadata[key]
            if isinstance(value, float) and isinstance(other, float):
                if abs(value - other) > tol:
                    return False
            elif value != other:
                return False
    return True


class Tokens(BaseCallbackHandler):
    """Keeps the tokens a model reports through ``on_llm_new_token``, in order."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


class LoopTicks:
    """Counts event-loop turns (one per 10 ms sleep) while the ``async with`` body runs.

    A blocking model call made on the event loop would starve the counter, so a high
    count proves the work ran in a worker thread.
    """

    def __init__(self) -> None:
        self.ticks = 0
        self._task: Optional[asyncio.Task[None]] = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1

    async def __aenter__(self) -> "LoopTicks":
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class ChatRecurrentStandardSettings:
    """What both standard ChatRecurrent suites declare. Listed before LangChain's suite
    class (``class TestX(ChatRecurrentStandardSettings, ChatModelUnitTests)``) so these
    properties win. Tool calling and structured output are declared unsupported: these
    recurrent models were not trained for either."""

    @property
    def chat_model_class(self) -> type[ChatRecurrent]:
        return ChatRecurrent

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False
