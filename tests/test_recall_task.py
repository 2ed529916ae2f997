"""The recall task's public pieces: near-miss keys, prose sources and their split.

The demo model's honesty rests on these: an absent key must really be absent, and the
held-out and unseen prose must never be in its training data.
"""

from __future__ import annotations

import random
import re

import pytest

from oprm_rag.demo.recall_task import (
    HELDOUT_SOURCES,
    NEAR_MISS_KINDS,
    UNSEEN_SOURCES,
    _is_prose,
    build_document,
    heldout_prose,
    near_miss_key,
    random_key,
    unseen_prose,
)


def _valid(key: str) -> bool:
    return 4 <= len(key) <= 8 and key.isalpha() and key.islower()


@pytest.mark.parametrize("kind", NEAR_MISS_KINDS)
def test_near_miss_keys_are_valid_absent_and_close(kind):
    rng = random.Random(kind)
    for _ in range(300):
        key = random_key(rng)
        taken = {random_key(rng) for _ in range(20)} | {key}
        new = near_miss_key(rng, key, taken, kind=kind)
        assert _valid(new) and new not in taken and new != key
        # every kind shares most of the key's letters, so it is a hard negative
        if kind == "substitute" and len(new) == len(key) and sum(a != b for a, b in zip(new, key)) == 1:
            continue
        if kind == "prefix" and new[:2] == key[:2]:
            continue
        if kind == "suffix" and new[-2:] == key[-2:]:
            continue
        if kind == "truncate" and new in (key[:-1], key[1:]):
            continue
        if kind == "extend" and key in (new[:-1], new[1:]):
            continue
        if kind == "swap" and sorted(new) == sorted(key) and len(new) == len(key):
            continue
        # the kind could not apply (a 4-letter key cannot be truncated, an 8-letter one
        # cannot be extended, "aaaa" cannot be swapped): another kind was used instead
        assert (kind == "truncate" and len(key) == 4) or (kind == "extend" and len(key) == 8) \
            or (kind == "swap" and len(set(key)) < len(key)), (kind, key, new)


def test_near_miss_kind_fallback_and_errors():
    rng = random.Random(0)
    assert len(near_miss_key(rng, "abcd", kind="truncate")) in (4, 5)  # falls back to another kind
    assert near_miss_key(rng, "abcdefgh", kind="extend") != "abcdefgh"
    with pytest.raises(ValueError, match="not a task key"):
        near_miss_key(rng, "ab")
    with pytest.raises(ValueError, match="not a task key"):
        near_miss_key(rng, "Abcde")
    with pytest.raises(ValueError, match="unknown near-miss kind"):
        near_miss_key(rng, "abcde", kind="reverse")


def test_near_miss_key_is_seeded():
    assert [near_miss_key(random.Random(5), "beacux") for _ in range(3)] == \
           [near_miss_key(random.Random(5), "beacux")] * 3


@pytest.mark.parametrize("source", HELDOUT_SOURCES)
def test_heldout_sources_are_prose(source):
    sentences = heldout_prose(source)
    assert len(sentences) >= 500
    assert all(_is_prose(s) for s in sentences)
    assert len(set(sentences)) == len(sentences)


@pytest.mark.parametrize("source", UNSEEN_SOURCES)
def test_unseen_sources_are_prose(source):
    sentences = unseen_prose(source)
    assert len(sentences) >= 500
    assert all(_is_prose(s) for s in sentences)


def test_unknown_sources_are_refused():
    with pytest.raises(ValueError, match="unknown held-out prose source"):
        heldout_prose("man_pages")  # an unseen source is not a benchmark source
    with pytest.raises(ValueError, match="unknown unseen prose source"):
        unseen_prose("licenses")


def _norm(s: str) -> str:
    return re.sub(r"\W+", " ", s.lower()).strip()


def test_prose_files_share_no_sentence():
    """A sentence quoted in two sources (a licence inside a manual) stays in one file only."""
    seen: dict[str, str] = {}
    files = [("heldout", s, heldout_prose(s)) for s in HELDOUT_SOURCES]
    files += [("unseen", s, unseen_prose(s)) for s in UNSEEN_SOURCES]
    for kind, name, sentences in files:
        for s in sentences:
            other = seen.setdefault(_norm(s), f"{kind}:{name}")
            assert other == f"{kind}:{name}", f"{s!r} is in {other} and {kind}:{name}"


def test_documents_from_a_source_hold_their_facts_once():
    rng = random.Random(3)
    doc = build_document(rng, heldout_prose("licenses"), 12, 4000)
    assert len({f.key for f in doc.facts}) == 12
    for fact, (a, b) in zip(doc.facts, doc.fact_spans):
        assert doc.text[a:b] == f"The code of {fact.key} is {fact.value}."
        assert doc.text.count(f"The code of {fact.key} is") == 1
    absent = near_miss_key(rng, doc.facts[0].key, {f.key for f in doc.facts})
    assert doc.answer_for(absent) == "Error"


def test_new_keys_are_distinct_new_and_the_draws_of_a_redraw_loop():
    import random

    from oprm_rag.demo.recall_task import new_keys, random_key

    taken = {random_key(random.Random(1)) for _ in range(3)} | {"abcd"}
    keys = new_keys(random.Random(5), 40, taken)
    assert len(keys) == len(set(keys)) == 40 and not set(keys) & taken
    rng, expected, seen = random.Random(5), [], set(taken)  # the loop it replaces
    while len(expected) < 40:
        k = random_key(rng)
        if k not in seen:
            seen.add(k)
            expected.append(k)
    assert keys == expected
