"""The transformers range is bounded and tested at both ends (issue 24): pyproject.toml's
requirement has an upper bound, the Makefile's test-transformers-lowest pins exactly its
lower bound and test-transformers-highest a version inside it, and the version this
environment runs is allowed."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _transformers_requirement() -> Requirement:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    (line,) = [m for m in re.findall(r'"([^"]+)"', deps) if m.startswith("transformers")]
    return Requirement(line)


def _make_pin(name: str) -> Version:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    m = re.search(rf"^{name}\s*\?=\s*transformers==(\S+)", text, re.M)
    assert m, f"the Makefile has no {name} ?= transformers==X"
    return Version(m.group(1))


def test_the_range_has_both_ends_and_the_makefile_tests_them() -> None:
    spec = _transformers_requirement().specifier
    lows = [Version(s.version) for s in spec if s.operator == ">="]
    highs = [s for s in spec if s.operator in ("<", "<=")]
    assert lows and highs, f"transformers{spec} needs a lower and an upper bound"
    lowest, highest = _make_pin("TF_LOWEST"), _make_pin("TF_HIGHEST")
    assert lowest == lows[0] and lowest in spec  # the lowest allowed version is the one tested
    assert highest in spec and highest > lowest
    assert Version(f"{highest.major}.{highest.minor + 1}.0") not in spec  # the highest is the top minor allowed


def test_this_environment_runs_an_allowed_version() -> None:
    import transformers

    assert Version(transformers.__version__) in _transformers_requirement().specifier


def test_chinese_sentences_end_chunks_too() -> None:
    """A document in another language chunks at its own sentence ends (。！？ take no space)."""
    from transformers import AutoTokenizer

    import oprm_rag
    from oprm_rag.chunking import DocumentTokens, chunk_document

    tok = AutoTokenizer.from_pretrained(oprm_rag.DEMO_MODEL)
    text = "这是第一句话，讲的是河流。第二句话在这里！第三句话问了一个问题？" * 30
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    doc = DocumentTokens(text, enc["input_ids"], enc["offset_mapping"])
    soft = chunk_document(doc, 0, 120, boundary="sentence", tolerance=0.5)  # a sentence is ~45 tokens here
    exact = chunk_document(doc, 0, 120)
    ends = ("。", "！", "？")
    ended = sum(c.text.endswith(ends) for c in soft[:-1])
    assert ended == len(soft) - 1 > sum(c.text.endswith(ends) for c in exact[:-1])
    assert "".join(c.text for c in soft) == text
