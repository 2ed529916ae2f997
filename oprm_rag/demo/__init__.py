"""``oprm-rag demo``: the overflow failure and OPRM's fix, on the shipped model, in seconds.

It hides facts (``The code of KEY is VALUE.``) in prose the model never trained on,
makes the document several times longer than the model's training context, asks for
one code, and prints plain inference's answer next to OPRM's, the winning chunk with
its char span, and the entropy of every chunk. One question can be lucky or unlucky, so
it then asks about many keys of the same document, present and absent, and tallies both.
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

from .recall_task import IDK_WORD, build_document, heldout_prose, new_keys, question_for

__all__ = ["run_demo", "demo_document", "answer_all"]


def demo_document(facts: int, seed: int, tokens_per_fact: int = 32, chars_per_token: float = 4.2):
    rng = random.Random(seed)
    doc = build_document(rng, heldout_prose(), facts, int(facts * tokens_per_fact * chars_per_token))
    target = doc.facts[len(doc.facts) // 2 + rng.randint(0, max(0, len(doc.facts) // 3))]
    return doc, target


def answer_all(selector: Any, questions: list[str], text: str, max_new_tokens: int = 8) -> list[Any]:
    """Every question about one document, scored in shared batches (the document's chunk
    states are built once), each answered from its own winning chunk: ``Answer`` objects."""
    return [selector.answer_from(res, max_new_tokens=max_new_tokens)
            for res in selector.select_many([(q, text) for q in questions])]


def run_demo(lm: Any, facts: int = 96, seed: int = 7, out=sys.stdout, tally: tuple[int, int] = (24, 8)) -> int:
    from ..report import describe_chunk, entropy_bars
    from ..selector import OPRMSelector

    def say(*parts: Any) -> None:
        print(*parts, file=out, flush=True)

    doc, target = demo_document(facts, seed)
    question = question_for(target.key)
    n_tokens = lm.count_tokens(doc.text)
    train = lm.training_context_tokens
    say(f"Model: {lm.name} ({lm.family}, {sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M parameters, "
        f"state {lm.state_nbytes / 2**20:.2f} MiB per sequence"
        + (f", trained on {train}-token contexts)" if train else ")"))
    say(f"Document: {len(doc.text):,} chars, {n_tokens:,} tokens, {len(doc.facts)} facts hidden in prose "
        "the model never saw in training.")
    say(f"Question: {question}   (expected: {target.value})\n")

    t0 = time.perf_counter()
    plain = OPRMSelector(lm, chunk_tokens=None, cache=False).answer(question, doc.text, max_new_tokens=8)
    t_plain = time.perf_counter() - t0
    sel = OPRMSelector(lm, show_progress=True, cache=False)  # the defaults: the model's own chunk size
    t0 = time.perf_counter()
    oprm = sel.answer(question, doc.text, max_new_tokens=8)
    t_oprm = time.perf_counter() - t0

    def verdict(text: str) -> str:
        return "correct" if text.strip() == target.value else "wrong"

    say(f"{'Plain inference (whole document in one state)':<50} -> {plain.text.strip()!r:>10}  "
        f"[{verdict(plain.text)}, {t_plain:.1f}s]")
    say(f"{f'OPRM ({len(oprm.chunks)} chunks of <= {sel.chunk_tokens} tokens)':<50} -> {oprm.text.strip()!r:>10}  "
        f"[{verdict(oprm.text)}, {t_oprm:.1f}s]\n")
    if oprm.chunk is not None:
        say("Winning chunk: " + describe_chunk(oprm.chunk, ["the document"], width=240))
        holds = oprm.chunk.char_start <= doc.text.find(f"The code of {target.key} is") < oprm.chunk.char_end
        say(f"  (the fact sits {'inside' if holds else 'outside'} this span)\n")
    say("Entropy of the first answer token, per chunk:")
    say(entropy_bars(oprm.chunks, width=36, max_rows=30))

    n_present, n_absent = tally
    if n_present + n_absent:
        rng = random.Random(seed + 1)
        present = rng.sample(doc.facts, min(n_present, len(doc.facts)))
        absent = new_keys(rng, n_absent, {f.key for f in doc.facts})
        questions = [question_for(f.key) for f in present] + [question_for(k) for k in absent]
        wanted = [f.value for f in present] + [IDK_WORD] * len(absent)
        say(f"\n{len(present)} of the {len(doc.facts)} codes asked for, and {len(absent)} keys the document "
            f"lacks (right answer: {IDK_WORD}), same document:")
        for name, chunk_tokens in (("Plain inference", None), ("OPRM", "auto")):
            answers = answer_all(OPRMSelector(lm, chunk_tokens=chunk_tokens), questions, doc.text)
            right = [a.text.strip() == w for a, w in zip(answers, wanted)]
            say(f"  {name:<16} codes right {sum(right[:len(present)]):>3}/{len(present)}   "
                f"{IDK_WORD} on absent keys {sum(right[len(present):]):>3}/{len(absent)}")
    return 0
