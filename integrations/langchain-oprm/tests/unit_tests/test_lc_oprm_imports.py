"""The public surface: exactly these names, importable, and importing loads nothing heavy."""

from __future__ import annotations

import subprocess
import sys

import langchain_oprm

EXPECTED_ALL = [
    "ChatRecurrent",
    "OPRMCompressor",
    "OPRMSelector",
    "OPRMSelectorInput",
    "RecurrentLLM",
    "__version__",
    "create_oprm_qa_chain",
    "oprm_prompt_messages",
    "oprm_tool",
]


def test_all_lists_the_public_api() -> None:
    assert sorted(langchain_oprm.__all__) == sorted(EXPECTED_ALL)
    for name in langchain_oprm.__all__:
        assert getattr(langchain_oprm, name) is not None, name


def test_version_is_a_string() -> None:
    assert isinstance(langchain_oprm.__version__, str) and langchain_oprm.__version__.count(".") == 2


def test_import_does_not_load_torch_or_the_engine() -> None:
    code = "import sys, langchain_oprm; print('torch' in sys.modules, 'oprm_rag.lm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]
