"""Test set-up: one CPU thread (the machine is shared), offline, quiet transformers.

The helper module next to this file is put on ``sys.path`` so test modules in both
sub-folders can import it whichever rootdir pytest picked.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(1)

from lc_oprm_support import primary_model_path, raw_model_path, tiny_chat_path, tiny_raw_path  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def chat_path() -> str:
    """Folder of a tiny model whose OPRM prompt uses the chat template."""
    return tiny_chat_path()


@pytest.fixture(scope="session")
def raw_path() -> str:
    """Folder of a model with a raw-text OPRM prompt (the demo model when present)."""
    return raw_model_path()


@pytest.fixture(scope="session")
def tiny_raw() -> str:
    return tiny_raw_path()


@pytest.fixture(scope="session")
def primary_path() -> str:
    return primary_model_path()


@pytest.fixture(scope="session", params=["chat_template", "raw"])
def mode_path(request: pytest.FixtureRequest) -> str:
    """Each prompt mode once: chat template, then raw text."""
    return tiny_chat_path() if request.param == "chat_template" else raw_model_path()


@pytest.fixture(scope="session")
def lm_for():
    """The shared RecurrentLM for a folder (the same object the LangChain classes use)."""
    from oprm_rag.engine.resolve import load_model

    return load_model
