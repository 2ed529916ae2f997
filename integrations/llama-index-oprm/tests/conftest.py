"""Fixtures: the shipped demo model when present, else tiny offline models built once.

The tiny models have random weights; the tests never rely on what they answer, only on
the integration doing exactly what the engine does (same scores, same text, same
states), which holds for any weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, List

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # the machine is shared with a training job


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo model folder if its weights exist, else a tiny random Mamba-2 folder."""
    from oprm_rag import DEMO_MODEL
    from oprm_rag.testing import save_tiny_model

    if Path(DEMO_MODEL, "model.safetensors").is_file():
        return DEMO_MODEL
    return str(save_tiny_model("mamba2", tmp_path_factory.mktemp("li_models") / "mamba2"))


@pytest.fixture(scope="session")
def lm(model_path: str) -> Any:
    """The process-wide shared model for ``model_path`` (what ``model=path`` resolves to)."""
    from oprm_rag.engine.resolve import load_model

    return load_model(model_path)


@pytest.fixture(scope="session")
def raw_lm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny model whose OPRM prompt is raw text (no chat template), like the demo model's."""
    from oprm_rag.engine.resolve import load_model
    from oprm_rag.testing import save_tiny_model

    prompt = {"instruction": "Read the text and answer the question. If the text does not give the answer, "
                             "answer {idk}.\n\nText:\n",
              "question_template": "\n\nQuestion: {question}\nAnswer:", "use_chat_template": False}
    path = save_tiny_model("mamba2", tmp_path_factory.mktemp("li_raw") / "mamba2_raw",
                           extra_files={"oprm_prompt.json": json.dumps(prompt)})
    return load_model(str(path))


@pytest.fixture(scope="session")
def varied_lm() -> Any:
    """A tiny model with flat logits, so greedy text varies from token to token (stop strings)."""
    from oprm_rag import RecurrentLM
    from oprm_rag.testing import tiny_model

    model, tok = tiny_model("mamba2", seed=1, sharpen=1.5)
    return RecurrentLM(model, tok, name="tiny-mamba2-varied")


@pytest.fixture(params=["main", "raw"])
def any_lm(request: pytest.FixtureRequest, lm: Any, raw_lm: Any) -> Any:
    """Both prompt styles: the main model's and a raw-text one."""
    return lm if request.param == "main" else raw_lm


@pytest.fixture
def events() -> Iterator[List[Any]]:
    """Instrumentation events dispatched during a test (from the root dispatcher)."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler

    seen: List[Any] = []

    class Collector(BaseEventHandler):
        def handle(self, event: Any, **kwargs: Any) -> None:
            seen.append(event)

    root = get_dispatcher()
    handler = Collector()
    root.add_event_handler(handler)
    yield seen
    root.event_handlers.remove(handler)


#: Short documents in the recall task's format (facts the demo model was trained on).
DOCS = [
    "The code of alpha is 1234. Mamba models keep a fixed size state. Long documents overflow that state. "
    "OPRM splits the context into chunks and scores each chunk by the entropy of the first answer token.",
    "The code of beta is 5678. Read the text and answer the question.",
    "A short one.",
]
QUESTION = "What is the code of alpha?"


@pytest.fixture
def docs() -> List[str]:
    return list(DOCS)


@pytest.fixture
def question() -> str:
    return QUESTION
