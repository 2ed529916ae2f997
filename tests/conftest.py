"""Shared fixtures: tiny offline model folders per family, built once per session."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))



@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from oprm_rag.testing import fixture_factory

    return fixture_factory(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def load_lm(model_dir):
    from oprm_rag import RecurrentLM

    cache: dict[str, RecurrentLM] = {}

    def load(family: str) -> RecurrentLM:
        if family not in cache:
            cache[family] = RecurrentLM.from_pretrained(model_dir(family), device="cpu", dtype=torch.float32)
        return cache[family]

    return load


@pytest.fixture(scope="session")
def demo_lm():
    from oprm_rag import DEMO_MODEL, load_demo_lm
    from pathlib import Path

    if not (Path(DEMO_MODEL) / "model.safetensors").is_file():
        pytest.fail("the shipped demo model is missing (oprm_rag/demo/model)")
    return load_demo_lm()


@pytest.fixture(autouse=True)
def _quiet_transformers():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    yield
