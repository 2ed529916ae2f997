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
