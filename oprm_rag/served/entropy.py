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
from typing import Iterable, Literal, Sequence

from ..engine import FirstTokens

__all__ = ["TopLogprobs", "EntropyEstimate", "estimate_entropy", "first_tokens_from_top", "ZERO_LOGPROB"]

#: Log-probabilities at or below this are probability 0 (llama.cpp sends the lowest float
#: instead of -inf, which JSON cannot carry).
ZERO_LOGPROB = -1e30

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
                          vocab_size: int | None, *, tail: Tail = "mid") -> FirstTokens:
    """The selector's summary of each row: entropy (estimate and bounds), top token, its
    probability and the IDK mass. ``ids[r]`` are row ``r``'s token ids in the engine's id
    space (the server's own, or ids the engine assigned to pieces).

    The IDK mass counts only IDK tokens that came back (a lower bound when truncated);
    the IDK filter itself works on the top token, which always comes back.
    """
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
