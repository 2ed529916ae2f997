"""The associative-recall task that the shipped demo model learns.

The task is fixed and public so that anyone can generate test cases outside this
repository:

* documents are English prose with facts embedded as sentences of the exact form
  ``The code of KEY is VALUE.``, where KEY is a made-up lowercase word of 4 to 8
  letters and VALUE a 4-digit number;
* questions read ``What is the code of KEY?``; the answer is VALUE, or the IDK word
  ``Error`` when the document holds no fact for KEY. Hard absent keys are near misses of
  present ones (:func:`near_miss_key`: one letter changed, same prefix or suffix, one
  letter more or less, two letters swapped).

The filler prose comes from sources the shipped model never trained on, one file each
under ``data/``: :data:`HELDOUT_SOURCES` (the benchmarks' prose, read with
:func:`heldout_prose`) and :data:`UNSEEN_SOURCES` (prose that neither its training nor
this project's benchmarks use, for anyone who wants an untouched test: read with
:func:`unseen_prose`). ``training/make_heldout_prose.py`` writes them.

This module is pure Python (no torch): the training script, the benchmarks, the demo
and the tests all build their documents with it.
"""

from __future__ import annotations

import ast
import os
import random
import re
import sysconfig
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

__all__ = [
    "FACT_TEMPLATE",
    "QUESTION_TEMPLATE",
    "IDK_WORD",
    "Fact",
    "RecallDocument",
    "random_key",
    "random_value",
    "fact_sentence",
    "question_for",
    "split_sentences",
    "stdlib_prose",
    "heldout_prose",
    "unseen_prose",
    "HELDOUT_SOURCES",
    "UNSEEN_SOURCES",
    "NEAR_MISS_KINDS",
    "near_miss_key",
    "new_keys",
    "build_document",
]

FACT_TEMPLATE = "The code of {key} is {value}."
QUESTION_TEMPLATE = "What is the code of {key}?"
IDK_WORD = "Error"

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_DATA = Path(__file__).parent / "data"
_HELDOUT_FILE = _DATA / "heldout_prose.txt"

#: Prose sources of the benchmarks (``data/heldout_<source>.txt``): never in the demo
#: model's training data. ``heldout_prose(source)`` reads one.
HELDOUT_SOURCES = ("python_reference", "licenses", "gnu_info")
#: Prose sources that neither the demo model's training nor this project's benchmarks use
#: (``data/unseen_<source>.txt``): kept for anyone who wants to test on prose nobody here
#: has looked at. ``unseen_prose(source)`` reads one.
UNSEEN_SOURCES = ("man_pages", "perl_docs")


@dataclass(frozen=True)
class Fact:
    """One ``The code of KEY is VALUE.`` sentence."""

    key: str
    value: str


@dataclass
class RecallDocument:
    """A generated document and the facts it holds, with their char spans."""

    text: str
    facts: list[Fact] = field(default_factory=list)
    fact_spans: list[tuple[int, int]] = field(default_factory=list)

    def answer_for(self, key: str) -> str:
        """The expected answer to ``What is the code of key?`` on this document."""
        for fact in self.facts:
            if fact.key == key:
                return fact.value
        return IDK_WORD


def random_key(rng: random.Random) -> str:
    """A made-up lowercase word of 4 to 8 letters."""
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(4, 8)))


def random_value(rng: random.Random) -> str:
    """A 4-digit number (1000-9999), as text."""
    return str(rng.randint(1000, 9999))


#: How :func:`near_miss_key` changes a present key into an absent one.
NEAR_MISS_KINDS = ("substitute", "prefix", "suffix", "truncate", "extend", "swap")


def new_keys(rng: random.Random, n: int, taken: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``n`` distinct random keys, none in ``taken`` (drawn one at a time, repeats redrawn:
    the same draws as asking :func:`random_key` until a key is new)."""
    keys: list[str] = []
    seen = set(taken)
    while len(keys) < n:
        key = random_key(rng)
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return keys


def near_miss_key(rng: random.Random, key: str, taken: set[str] | frozenset[str] = frozenset(),
                  kind: str | None = None) -> str:
    """A valid key (4-8 lowercase letters) that is not in ``taken`` and differs from ``key`` a little.

    These are the hard absent keys: a model that matches a key by its first letters, its
    last letters or most of its tokens answers a code for them. ``kind`` (random when
    None) is one of :data:`NEAR_MISS_KINDS`: one letter replaced; the first 2-4 letters
    kept and the rest new; the last 2-4 letters kept; one letter dropped at either end;
    one letter added at either end; two neighbouring letters swapped. Where a kind cannot
    make a new key (``swap`` on ``"aaaa"``), another kind is tried.
    """
    if not (4 <= len(key) <= 8 and key.isalpha() and key.islower()):
        raise ValueError(f"not a task key (4-8 lowercase letters): {key!r}")
    if kind is not None and kind not in NEAR_MISS_KINDS:
        raise ValueError(f"unknown near-miss kind {kind!r}; known: {NEAR_MISS_KINDS}")
    banned = set(taken) | {key}
    for attempt in range(200):
        k = kind if (kind is not None and attempt < 20) else rng.choice(NEAR_MISS_KINDS)
        n = len(key)
        if k == "substitute":
            i = rng.randrange(n)
            new = key[:i] + rng.choice(_LETTERS.replace(key[i], "")) + key[i + 1:]
        elif k == "prefix":
            keep = rng.randint(2, min(4, n - 1))
            new = key[:keep] + "".join(rng.choice(_LETTERS) for _ in range(rng.randint(max(4, keep + 1), 8) - keep))
        elif k == "suffix":
            keep = rng.randint(2, min(4, n - 1))
            new = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(max(4, keep + 1), 8) - keep)) + key[-keep:]
        elif k == "truncate":
            if n <= 4:
                continue
            new = key[:-1] if rng.random() < 0.5 else key[1:]
        elif k == "extend":
            if n >= 8:
                continue
            c = rng.choice(_LETTERS)
            new = key + c if rng.random() < 0.5 else c + key
        else:  # swap
            i = rng.randrange(n - 1)
            new = key[:i] + key[i + 1] + key[i] + key[i + 2:]
        if new not in banned and 4 <= len(new) <= 8:
            return new
    raise ValueError(f"could not make a near miss of {key!r} outside the {len(banned)} taken keys")


def fact_sentence(fact: Fact) -> str:
    return FACT_TEMPLATE.format(key=fact.key, value=fact.value)


def question_for(key: str) -> str:
    return QUESTION_TEMPLATE.format(key=key)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WS = re.compile(r"\s+")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences; crude but deterministic."""
    text = _WS.sub(" ", text).strip()
    return [s for s in _SENTENCE_END.split(text) if s]


def _is_prose(sentence: str) -> bool:
    if not (25 <= len(sentence) <= 400):
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    plain = sum(c.isalpha() or c in " ,.;'-" for c in sentence)
    if plain / len(sentence) < 0.9:
        return False
    # Keep the task's own sentence form out of the filler.
    return "code of" not in sentence


def _prose_paragraphs(docstring: str) -> list[str]:
    paragraphs = []
    for block in re.split(r"\n\s*\n", docstring):
        lines = block.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines[1:]):
            continue  # code samples, tables and parameter lists
        paragraphs.append(" ".join(line.strip() for line in lines))
    return paragraphs


_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "pydoc_data",
              "turtledemo", "__pycache__", "ensurepip", "venv"}


def docstrings(root: str | os.PathLike[str], skip_dirs: set[str] | frozenset[str]) -> Iterator[str]:
    """Every module, class and function docstring of the ``.py`` files under ``root``.

    Folders and files are walked in sorted order (deterministic for a given tree); files
    that do not parse or read as UTF-8 are skipped. The demo model's prose sources
    (``stdlib_prose`` here, the training script's others) all read docstrings this way.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        yield doc


@lru_cache(maxsize=1)
def stdlib_prose() -> tuple[str, ...]:
    """Prose sentences from the docstrings of this Python's standard library.

    This is the training filler of the demo model. Files are walked in sorted order so
    the result is deterministic for a given Python version.
    """
    root = sysconfig.get_paths()["stdlib"]
    sentences: list[str] = []
    seen: set[str] = set()
    for doc in docstrings(root, _SKIP_DIRS):
        for paragraph in _prose_paragraphs(doc):
            for sentence in split_sentences(paragraph):
                if _is_prose(sentence) and sentence not in seen:
                    seen.add(sentence)
                    sentences.append(sentence)
    return tuple(sentences)


def _read_sentences(path: Path) -> tuple[str, ...]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line for line in lines if line and not line.startswith("#"))


@lru_cache(maxsize=None)
def heldout_prose(source: str | None = None) -> tuple[str, ...]:
    """Sentences from prose sources the demo model never saw in training.

    ``source`` is one of :data:`HELDOUT_SOURCES` (each file's header says where its
    sentences come from and under which licence). Without it: the benchmarks' default
    held-out prose.
    """
    if source is None:
        return _read_sentences(_HELDOUT_FILE)
    if source not in HELDOUT_SOURCES:
        raise ValueError(f"unknown held-out prose source {source!r}; known: {HELDOUT_SOURCES}")
    return _read_sentences(_DATA / f"heldout_{source}.txt")


@lru_cache(maxsize=None)
def unseen_prose(source: str) -> tuple[str, ...]:
    """Sentences from a source that neither training nor this project's benchmarks use."""
    if source not in UNSEEN_SOURCES:
        raise ValueError(f"unknown unseen prose source {source!r}; known: {UNSEEN_SOURCES}")
    return _read_sentences(_DATA / f"unseen_{source}.txt")


def build_document(
    rng: random.Random,
    sentences: tuple[str, ...] | list[str],
    n_facts: int,
    target_chars: int,
    paragraph_every: int = 6,
    keys: list[str] | None = None,
) -> RecallDocument:
    """Prose of about ``target_chars`` characters with ``n_facts`` facts at random places.

    Facts get distinct keys (``keys`` when given) and are spread uniformly over the
    filler, so each one can sit anywhere in the document.
    """
    if n_facts < 0 or target_chars < 0:
        raise ValueError("n_facts and target_chars must be non-negative")
    if keys is None:
        keys = new_keys(rng, n_facts)
    facts = [Fact(k, random_value(rng)) for k in keys[:n_facts]]

    filler: list[str] = []
    filler_chars = max(0, target_chars - sum(len(fact_sentence(f)) + 1 for f in facts))
    total = 0
    while total < filler_chars:
        s = rng.choice(sentences)
        filler.append(s)
        total += len(s) + 1
    slots = sorted(rng.randint(0, len(filler)) for _ in facts)
    order = list(facts)
    rng.shuffle(order)

    pieces: list[str] = []
    spans: dict[Fact, tuple[int, int]] = {}
    pos = 0
    fact_iter = iter(zip(slots, order))
    pending = next(fact_iter, None)
    since_break = 0
    for i in range(len(filler) + 1):
        while pending is not None and pending[0] == i:
            pieces, pos, since_break = _append(pieces, pos, since_break, paragraph_every, rng)
            sentence = fact_sentence(pending[1])
            spans[pending[1]] = (pos, pos + len(sentence))
            pieces.append(sentence)
            pos += len(sentence)
            pending = next(fact_iter, None)
        if i < len(filler):
            pieces, pos, since_break = _append(pieces, pos, since_break, paragraph_every, rng)
            pieces.append(filler[i])
            pos += len(filler[i])
    text = "".join(pieces)
    ordered = sorted(facts, key=lambda f: spans[f][0])
    return RecallDocument(text=text, facts=ordered, fact_spans=[spans[f] for f in ordered])


def _append(pieces: list[str], pos: int, since_break: int, every: int,
            rng: random.Random) -> tuple[list[str], int, int]:
    """Add the separator before the next sentence: a space, or now and then a break."""
    if not pieces:
        return pieces, pos, 0
    if every and since_break >= every and rng.random() < 0.5:
        pieces.append("\n\n")
        return pieces, pos + 2, 0
    pieces.append(" ")
    return pieces, pos + 1, since_break + 1
