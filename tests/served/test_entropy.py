"""Entropy from top-k log-probabilities: the estimate, its bounds, and the row summary."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from oprm_rag.served.entropy import ZERO_LOGPROB, TopLogprobs, estimate_entropy, first_tokens_from_top
from oprm_rag.served.errors import ImpossibleLogprobsError


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _dists() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    v = 3072
    out = []
    peaked = np.full(v, 1e-6)
    peaked[7] = 1.0
    out.append(("peaked", peaked / peaked.sum()))
    out.append(("flat", np.ones(v) / v))
    zipf = 1.0 / np.arange(1, v + 1) ** 1.1
    out.append(("zipf", zipf / zipf.sum()))
    for i in range(5):
        logits = rng.normal(size=v) * (0.5 + 2 * i)
        p = np.exp(logits - logits.max())
        out.append((f"gauss{i}", p / p.sum()))
    two = np.zeros(v)
    two[:2] = 0.5
    out.append(("two", two))
    return out


@pytest.mark.parametrize("name,p", _dists())
@pytest.mark.parametrize("k", [1, 5, 20, 200])
def test_bounds_hold_the_true_entropy(name: str, p: np.ndarray, k: int) -> None:
    true = _entropy(p)
    top = np.sort(p)[::-1][:k]
    lp = [math.log(x) if x > 0 else ZERO_LOGPROB for x in top]
    est = estimate_entropy(lp, len(p))
    assert not est.exact
    assert est.low - 1e-9 <= true <= est.high + 1e-9, (name, k, est, true)
    assert est.low <= est.entropy <= est.high
    assert est.missing_mass == pytest.approx(max(0.0, 1 - top.sum()), abs=1e-9)
    # without a vocabulary size there is no finite upper bound, and the lower one still holds
    unknown = estimate_entropy(lp, None)
    assert unknown.low == pytest.approx(est.low)
    assert math.isinf(unknown.high) or est.missing_mass == 0


def test_whole_vocabulary_is_exact_and_renormalised() -> None:
    for name, p in _dists():
        lp = [math.log(x) if x > 0 else ZERO_LOGPROB for x in np.float32(p) * np.float32(1.000001)]
        random.Random(0).shuffle(lp)  # order must not matter
        est = estimate_entropy(lp, len(p))
        assert est.exact and est.low == est.high == est.entropy
        assert est.entropy == pytest.approx(_entropy(p), abs=2e-5), name


def test_bounds_are_attained() -> None:
    # the tail concentrated at the smallest returned probability attains the lower bound
    p = np.array([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    est = estimate_entropy([math.log(0.5), math.log(0.1)], 6)
    assert est.low == pytest.approx(_entropy(p))
    # the tail spread evenly over the rest attains the upper bound
    v = 1000
    q = np.full(v, 0.2 / (v - 2))
    q[:2] = [0.5, 0.3]
    est = estimate_entropy([math.log(0.5), math.log(0.3)], v)
    assert est.high == pytest.approx(_entropy(q))


def test_top20_of_a_flat_distribution_is_far_too_low_without_the_tail() -> None:
    """The issue's case: top-20 alone says ~1 nat where the truth is ~1.9; the bound says so."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=3072) * 1.3
    logits[:6] += 4.0
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.sort(p)[::-1][:20]
    seen_only = -(top * np.log(top)).sum()
    est = estimate_entropy(np.log(top).tolist(), 3072)
    true = _entropy(p)
    assert seen_only < 0.8 * true  # top-k alone is badly low here
    assert est.low <= true <= est.high
    assert abs(est.entropy - true) < abs(seen_only - true)


def test_nonfinite_rows_are_flagged_and_never_exact() -> None:
    for bad in ([float("nan"), -1.0], [math.inf], []):
        est = estimate_entropy(bad, 10)
        assert math.isnan(est.entropy)
    rows = [TopLogprobs([0, 1], ["a", "b"], [math.log(0.6), math.log(0.4)])]
    ft = first_tokens_from_top(rows, [[0, 1]], {1}, 2)
    assert ft.finite == [True] and ft.exact
    assert ft.entropy[0] == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    # a NaN from a server is not a probability: the row is refused, never ranked
    with pytest.raises(ImpossibleLogprobsError, match="row 2 of 2: a log-probability of nan"):
        first_tokens_from_top(rows + [TopLogprobs([0, 1], ["c", "d"], [float("nan"), -1.0])], [[0, 1], [0, 1]],
                              {1}, 2)


def test_row_summary_top_token_idk_mass_and_bounds() -> None:
    lp = [math.log(0.5), math.log(0.3), math.log(0.05)]
    rows = [TopLogprobs([9, 2, 5], ["x", " Error", "y"], lp)]
    ft = first_tokens_from_top(rows, [[9, 2, 5]], {2, 77}, 100)
    assert ft.top_id == [9] and ft.top_prob[0] == pytest.approx(0.5)
    assert ft.idk_prob[0] == pytest.approx(0.3)
    assert not ft.exact and ft.entropy_bounds is not None
    low, high = ft.row_bounds(0)
    assert low <= ft.entropy[0] <= high and high > low
    # llama.cpp sends the lowest float for probability 0
    zero = [TopLogprobs([0, 1], ["a", "b"], [0.0, -3.4e38])]
    ft0 = first_tokens_from_top(zero, [[0, 1]], set(), 2)
    assert ft0.exact and ft0.entropy[0] == pytest.approx(0.0) and ft0.top_prob[0] == pytest.approx(1.0)
