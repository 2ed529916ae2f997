"""Entropy of the first answer token from a server's top-k log-probabilities.

A server returns the k most likely next tokens, not the whole distribution. With the
returned probabilities p_1 >= ... >= p_k and the missing mass m = 1 - sum p_i spread over
the n = V - k tokens not returned (each at most p_k, since the list is the top k):

* the **lower bound** puts m on as few tokens as that allows (floor(m / p_k) tokens of
  p_k and one remainder): entropy is concave, so this is the least the tail can add;
* the **upper bound** spreads m evenly over the n tokens (the most it can add);
  without a known vocabulary size there is no finite upper bound.

The estimate is the midpoint of the two: on real recall prompts the tail is long and flat
(thousands of tiny probabilities), so the truth sits well above the concentrated lower
bound (``docs/served.md`` has the numbers). When the whole vocabulary came back
(llama.cpp's ``n_probs`` = vocabulary size, vLLM with ``--max-logprobs`` >= V) the
entropy is exact and the bounds collapse to it.

Why it matters for OPRM: entropy ranks the chunks. Top-20 entropy alone was 1-2.5% low on
recall prompts and 1.0 against 1.9 nats on a flat distribution; two chunks whose
intervals overlap may be ranked differently than the exact entropies would rank them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

from ..engine.types import FirstTokens

__all__ = ["TopLogprobs", "EntropyEstimate", "estimate_entropy", "first_tokens_from_top", "impossible_logprobs", "ids_of_pieces",
           "ZERO_LOGPROB", "LOGPROB_TOLERANCE", "MASS_TOLERANCE"]

#: Log-probabilities at or below this are probability 0 (llama.cpp sends the lowest float
#: instead of -inf, which JSON cannot carry).
ZERO_LOGPROB = -1e30

#: A log-probability above this is a probability above 1: impossible, not rounding
#: (float32 log-softmax puts the top token at most ~1e-7 above 0).
LOGPROB_TOLERANCE = 1e-4
#: Returned probabilities summing above 1 + this are impossible (llama.cpp's float32
#: softmax over the whole vocabulary sums to 1 +- 2e-5).
MASS_TOLERANCE = 1e-3

Tail = Literal["low", "mid", "high"]


@dataclass
class TopLogprobs:
    """What a server returned for one row's next token: ids (or None where the server
    named tokens only by text), their text pieces, and natural-log probabilities, most
    likely first."""

    ids: list[int] | None
    pieces: list[str]
    logprobs: list[float]

    def __len__(self) -> int:
        return len(self.logprobs)


@dataclass(frozen=True)
class EntropyEstimate:
    """Entropy (nats) of one distribution seen through its top k, with its interval."""

    entropy: float
    low: float
    high: float
    exact: bool
    missing_mass: float


def impossible_logprobs(top: TopLogprobs, vocab_size: int | None = None) -> str | None:
    """Why ``top`` cannot be a next-token distribution's top list, or None if it can.

    Checked: every value is a number that is not +inf or NaN; none is above 0 (beyond
    :data:`LOGPROB_TOLERANCE`); the probabilities sum to at most 1 (+ :data:`MASS_TOLERANCE`);
    ids, where given, are whole numbers in ``[0, vocab_size)``, one value each, and no id
    comes twice; no more entries than the vocabulary has. A row that fails is refused:
    clamping a positive log-probability to p = 1 or renormalising excess mass would hand
    a broken score the lowest entropy of all.
    """
    values = top.logprobs
    for x in values:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) or x == math.inf:
            return f"a log-probability of {x!r} (not a probability)"
    if not values:
        return None
    worst = max(values)
    if worst > LOGPROB_TOLERANCE:
        return f"a log-probability of {worst:+.6g} (a probability of {math.exp(min(worst, 700.0)):.6g}, above 1)"
    mass = math.fsum(math.exp(x) for x in values if x > ZERO_LOGPROB)
    if mass > 1.0 + MASS_TOLERANCE:
        return f"probabilities that sum to {mass:.6g} over {len(values)} tokens (more than 1)"
    if vocab_size is not None and len(values) > vocab_size:
        return f"{len(values)} tokens in one top list of a {vocab_size}-token vocabulary"
    ids = top.ids
    if ids is None:
        return None
    if len(ids) != len(values):
        return f"{len(ids)} token ids for {len(values)} log-probabilities"
    seen: set[int] = set()
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int):
            return f"a token id of {i!r} (not a whole number)"
        if i < 0:
            return f"a negative token id ({i})"
        if vocab_size is not None and i >= vocab_size:
            return f"token id {i}, outside the {vocab_size}-token vocabulary"
        if i in seen:
            return f"token id {i} twice in one top list"
        seen.add(i)
    return None


def _h(p: float) -> float:
    return -p * math.log(p) if p > 0 else 0.0


def estimate_entropy(logprobs: Sequence[float], vocab_size: int | None, *, tail: Tail = "mid") -> EntropyEstimate:
    """Entropy of a distribution from its top-k ``logprobs`` (any order), with bounds.

    Exact when ``vocab_size`` is known and all of it came back. ``tail`` picks the
    estimate inside the interval: ``"low"``, ``"mid"`` (default) or ``"high"``. A
    non-finite input (NaN, +inf) gives NaN everywhere.
    """
    nan = float("nan")
    values = [float(x) for x in logprobs]
    if not values or any(math.isnan(x) or x == math.inf for x in values):
        return EntropyEstimate(nan, nan, nan, False, nan)
    probs = sorted((math.exp(min(x, 0.0)) if x > ZERO_LOGPROB else 0.0 for x in values), reverse=True)
    total = sum(probs)
    if total <= 0:
        return EntropyEstimate(nan, nan, nan, False, nan)
    if vocab_size is not None and len(probs) >= vocab_size:
        # The whole distribution: renormalise away float32 rounding (sum is 1 +- 1e-6).
        h = sum(_h(p / total) for p in probs)
        return EntropyEstimate(h, h, h, True, 0.0)
    seen = sum(_h(p) for p in probs)
    missing = max(0.0, 1.0 - total)
    smallest = next((p for p in reversed(probs) if p > 0), 0.0)
    if missing <= 0.0:
        return EntropyEstimate(seen, seen, seen, False, 0.0)
    if smallest <= 0.0:  # every returned token has probability 0: nothing to bound the tail with
        return EntropyEstimate(nan, nan, nan, False, missing)
    whole = int(missing // smallest)
    low = seen + whole * _h(smallest) + _h(missing - whole * smallest)
    if vocab_size is None:
        high = math.inf
    else:
        n = max(1, vocab_size - len(probs))
        high = seen + missing * math.log(n / missing)
        high = max(high, low)  # inconsistent inputs (mass that cannot fit) must not invert the interval
    if tail == "low" or math.isinf(high):
        est = low
    elif tail == "high":
        est = high
    else:
        est = (low + high) / 2
    return EntropyEstimate(est, low, high, False, missing)


def first_tokens_from_top(rows: Sequence[TopLogprobs], ids: Sequence[Sequence[int]], idk_ids: Iterable[int],
                          vocab_size: int | None, *, tail: Tail = "mid", where: str = "the server") -> FirstTokens:
    """The selector's summary of each row: entropy (estimate and bounds), top token, its
    probability and the IDK mass. ``ids[r]`` are row ``r``'s token ids in the engine's id
    space (the server's own, or ids the engine assigned to pieces).

    The IDK mass counts only IDK tokens that came back (a lower bound when truncated);
    the IDK filter itself works on the top token, which always comes back.

    Raises :class:`~oprm_rag.served.errors.ImpossibleLogprobsError` (naming ``where``)
    for a row no distribution can have (:func:`impossible_logprobs`): it is refused, never
    ranked.
    """
    for r, row in enumerate(rows):
        problem = impossible_logprobs(row, vocab_size)
        if problem is not None:
            raise _impossible(where, problem, r, len(rows))
    idk = set(int(i) for i in idk_ids)
    entropy, top_id, top_prob, idk_prob, finite, bounds = [], [], [], [], [], []
    exact_all = True
    nan = float("nan")
    for row, row_ids in zip(rows, ids):
        est = estimate_entropy(row.logprobs, vocab_size, tail=tail)
        ok = math.isfinite(est.entropy) and len(row_ids) == len(row.logprobs) > 0
        if not ok:  # a broken row is flagged, and says nothing about the others' exactness
            entropy.append(nan)
            top_id.append(-1)
            top_prob.append(nan)
            idk_prob.append(nan)
            finite.append(False)
            bounds.append((nan, nan))
            continue
        probs = [math.exp(min(x, 0.0)) if x > ZERO_LOGPROB else 0.0 for x in row.logprobs]
        exact_all = exact_all and est.exact
        norm = sum(probs) if est.exact else 1.0
        best = max(range(len(probs)), key=lambda i: probs[i])
        entropy.append(est.entropy)
        top_id.append(int(row_ids[best]))
        top_prob.append(probs[best] / norm)
        idk_prob.append(sum(p for p, t in zip(probs, row_ids) if int(t) in idk) / norm)
        finite.append(True)
        bounds.append((est.low, est.high))
    return FirstTokens(entropy=entropy, top_id=top_id, top_prob=top_prob, idk_prob=idk_prob, finite=finite,
                       exact=exact_all, entropy_bounds=None if exact_all else bounds)


def ids_of_pieces(pieces: Sequence[str], tokenizer: Any, where: str) -> list[int]:
    """The model's ids of tokens a server named by text only, through the local tokenizer
    (``tokenizer=`` says the model's ids are known here). A piece that is not exactly one
    of the tokenizer's tokens, or two pieces that are the same token, mean the server's
    tokens are not this tokenizer's: :class:`~oprm_rag.served.errors.ImpossibleLogprobsError`,
    never an id made up for it."""
    encoded = tokenizer(list(pieces), add_special_tokens=False)["input_ids"] if pieces else []
    out: list[int] = []
    for piece, ids in zip(pieces, encoded):
        if len(ids) != 1:
            raise _impossible(where, f"the token text {piece!r}, which the local tokenizer (tokenizer=) makes "
                                     f"{len(ids)} tokens, not one: the server's tokens are not this tokenizer's "
                                     "(pass the served model's own tokenizer, or none)")
        out.append(int(ids[0]))
    if len(set(out)) != len(out):
        twice = next(i for i in out if out.count(i) > 1)
        raise _impossible(where, f"two token texts that the local tokenizer maps to the same token ({twice})")
    return out


def _impossible(where: str, problem: str, row: int | None = None, rows: int = 1) -> Exception:
    from .errors import ImpossibleLogprobsError

    which = f" for row {row + 1} of {rows}" if row is not None and rows > 1 else ""
    return ImpossibleLogprobsError(
        f"{where} returned impossible log-probabilities{which}: {problem}. A broken server or proxy; the chunk "
        "cannot be scored, so nothing was selected (check the server's build and flags, or what sits between)")
