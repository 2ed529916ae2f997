"""``oprm-rag demo``: the overflow failure and OPRM's fix, on the shipped model, in seconds.

It hides facts (``The code of KEY is VALUE.``) in prose the model never trained on,
makes the document several times longer than the model's training context, and asks
for many codes of it, present and absent, with plain inference and with OPRM. The
headline is that tally: one question is a lucky or an unlucky draw, a tally is not.

Then one of those questions is shown in full (both answers, OPRM's winning chunk with
its char span, the entropy of every chunk), chosen by a stated rule so that it is
typical of the tally, never picked for looking good: the first question, in the order
asked, whose outcome matches what each method does on most questions (see
:func:`representative`). The rule and the counts it rests on are printed with it.

Progress bars go to stderr, only when both stdout and stderr are terminals, and are
cleared before anything is printed below them.
"""

from __future__ import annotations

import random
import sys
import time
from typing import TYPE_CHECKING, Any

from .recall_task import IDK_WORD, build_document, heldout_prose, new_keys, question_for

if TYPE_CHECKING:  # pragma: no cover
    from ..lm import RecurrentLM

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


def representative(outcomes: dict[str, list[bool]]) -> tuple[int, str]:
    """The index of the question to show, and the rule that chose it, in words.

    ``outcomes[method][i]``: whether ``method`` answered question ``i`` right. Each
    method's typical outcome is what it does on most questions (right when it is right
    on at least half). The first question whose outcomes are all typical is shown; when
    no question is typical for every method at once, the first one typical for the last
    method (OPRM) is. Deterministic: the same tally always shows the same question."""
    names = list(outcomes)
    n = len(outcomes[names[0]])
    typical = {m: 2 * sum(v) >= len(v) for m, v in outcomes.items()}
    words = "; ".join(f"{m}: {'right' if typical[m] else 'wrong'} on {sum(v) if typical[m] else len(v) - sum(v)}"
                      f"/{len(v)}" for m, v in outcomes.items())
    for i in range(n):
        if all(outcomes[m][i] == typical[m] for m in names):
            return i, (f"the first question asked whose outcome is what each method does on most questions "
                       f"({words})")
    last = names[-1]
    for i in range(n):
        if outcomes[last][i] == typical[last]:
            return i, (f"no question is typical of every method at once ({words}); shown: the first one asked "
                       f"that is typical of {last}")
    return 0, "the first question asked"  # pragma: no cover - a method's majority outcome always occurs


def _show_progress(out: Any) -> bool:
    """Bars only where they cannot land in the results: stdout and stderr both terminals."""
    try:
        return bool(out.isatty()) and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def run_demo(lm: "RecurrentLM", facts: int = 96, seed: int = 7, out=sys.stdout, tally: tuple[int, int] = (24, 8)) -> int:
    from ..report import describe_chunk, entropy_bars
    from ..selector import OPRMSelector

    def say(*parts: Any) -> None:
        print(*parts, file=out, flush=True)

    doc, target = demo_document(facts, seed)
    n_tokens = lm.count_tokens(doc.text)
    train = lm.training_context_tokens
    say(f"Model: {lm.name} ({lm.family}, {sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M parameters, "
        f"state {lm.state_nbytes / 2**20:.2f} MiB per sequence"
        + (f", trained on {train}-token contexts)" if train else ")"))
    say(f"Document: {len(doc.text):,} chars, {n_tokens:,} tokens"
        + (f" ({n_tokens / train:.1f}x the training context)" if train else "")
        + f", {len(doc.facts)} facts hidden in prose the model never saw in training.")

    n_present, n_absent = tally
    rng = random.Random(seed + 1)
    present = rng.sample(doc.facts, min(n_present, len(doc.facts))) if n_present else [target]
    absent = new_keys(rng, n_absent, {f.key for f in doc.facts})
    questions = [question_for(f.key) for f in present] + [question_for(k) for k in absent]
    wanted = [f.value for f in present] + [IDK_WORD] * len(absent)
    progress = _show_progress(out)
    methods = {"Plain inference": OPRMSelector(lm, chunk_tokens=None, cache=False, show_progress=progress),
               "OPRM": OPRMSelector(lm, cache=False, show_progress=progress)}  # the defaults: the model's chunk size
    answers, seconds = {}, {}
    for name, sel in methods.items():
        t0 = time.perf_counter()
        answers[name] = answer_all(sel, questions, doc.text)
        seconds[name] = time.perf_counter() - t0
    right = {name: [a.text.strip() == w for a, w in zip(got, wanted)] for name, got in answers.items()}
    oprm_sel = methods["OPRM"]
    labels = {"Plain inference": "Plain inference (whole document in one state)",
              "OPRM": f"OPRM (chunks of <= {oprm_sel.chunk_tokens} tokens)"}

    say(f"\n{len(present)} of the {len(doc.facts)} codes asked for, and {len(absent)} keys the document lacks "
        f"(right answer: {IDK_WORD}):")
    for name in methods:
        say(f"  {labels[name]:<48} codes right {sum(right[name][:len(present)]):>3}/{len(present)}   "
            f"{IDK_WORD} on absent keys {sum(right[name][len(present):]):>3}/{len(absent)}   "
            f"[{seconds[name]:.1f}s]")

    i, rule = representative({name: right[name][:len(present)] for name in methods})
    fact = present[i]
    plain, oprm = answers["Plain inference"][i], answers["OPRM"][i]
    say(f"\nOne of those questions in full. How it was chosen: {rule}.")
    say(f"Question: {questions[i]}   (expected: {fact.value})")
    for name, ans in (("Plain inference", plain), ("OPRM", oprm)):
        verdict = "correct" if ans.text.strip() == fact.value else "wrong"
        extra = f", {len(ans.chunks)} chunks scored" if name == "OPRM" else ""
        say(f"  {name:<16} -> {ans.text.strip()!r:>10}  [{verdict}{extra}]")
    if oprm.chunk is not None:
        say("Winning chunk: " + describe_chunk(oprm.chunk, ["the document"], width=240))
        holds = oprm.chunk.char_start <= doc.text.find(f"The code of {fact.key} is") < oprm.chunk.char_end
        say(f"  (the fact sits {'inside' if holds else 'outside'} this span)")
    say("Entropy of the first answer token, per chunk:")
    say(entropy_bars(oprm.chunks, width=36, max_rows=30))
    return 0
