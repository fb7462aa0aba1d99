"""Paired bootstrap intervals and the exact McNemar test, against exactly computed values.

The bootstrap distribution of a mean of n resampled items is known in closed form for
small cases (binomial / multinomial over the item values), so its percentile interval is
computed here without resampling and compared with the module's Monte-Carlo interval.
"""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from modules.errors import TopiaryError
from modules.evaluation.intervals import accuracy_interval, mcnemar_exact, paired_accuracy, paired_perplexity

ITERS = 20_000


def _quantile(pmf: dict[float, float], q: float) -> tuple[float, float]:
    """The q-quantile of a discrete distribution, and how far q is from the atom's edges."""
    cdf = 0.0
    for value in sorted(pmf):
        below, cdf = cdf, cdf + pmf[value]
        if cdf >= q:
            return value, min(q - below, cdf - q)
    raise AssertionError("pmf does not sum to 1")


def _binomial_pmf(n: int, p: float) -> dict[int, float]:
    return {k: math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)}


def test_paired_interval_of_one_task_equals_the_exact_bootstrap_quantiles():
    # 20 items; the pruned model loses 2 items the dense one gets right, nothing else changes.
    dense = [1] * 16 + [0] * 4
    pruned = [0, 0] + [1] * 14 + [0] * 4
    out = paired_accuracy({"t": dense}, {"t": pruned}, iters=ITERS, seed=0)["tasks"]["t"]
    assert out["diff"] == pytest.approx(-10.0) and out["n"] == 20
    # Resampled, the difference is -5 points per draw of a lost item: -5 X, X ~ Bin(20, 1/10).
    pmf = {-5.0 * k: p for k, p in _binomial_pmf(20, 0.1).items()}
    lo, margin_lo = _quantile(pmf, 0.025)
    hi, margin_hi = _quantile(pmf, 0.975)
    assert min(margin_lo, margin_hi) > 0.005  # far enough from an atom's edge for 20k resamples
    assert (out["lo"], out["hi"]) == pytest.approx((lo, hi))
    assert (lo, hi) == (-25.0, 0.0)  # an unpaired bootstrap would reach above 0
    assert (out["dense_only"], out["pruned_only"]) == (2, 0)


def test_mean_over_tasks_is_stratified_and_unweighted():
    # Task a: 20 items, 2 lost; task b: 10 items, 2 gained. Mean diff = (-10 + 20) / 2 = +5
    # (pooling the 30 items would give 0).
    dense = {"a": [1] * 20, "b": [0] * 10}
    pruned = {"a": [0, 0] + [1] * 18, "b": [1, 1] + [0] * 8}
    out = paired_accuracy(dense, pruned, iters=ITERS, seed=1)
    assert out["mean"]["diff"] == pytest.approx(5.0) and out["mean"]["n"] == 30
    # Exact: mean = (-5 X + 10 Y) / 2, X ~ Bin(20, 0.1), Y ~ Bin(10, 0.2), independent.
    pmf: dict[float, float] = {}
    for x, px in _binomial_pmf(20, 0.1).items():
        for y, py in _binomial_pmf(10, 0.2).items():
            value = (-5.0 * x + 10.0 * y) / 2
            pmf[value] = pmf.get(value, 0.0) + px * py
    lo, margin_lo = _quantile(pmf, 0.025)
    hi, margin_hi = _quantile(pmf, 0.975)
    assert min(margin_lo, margin_hi) > 0.005
    assert (out["mean"]["lo"], out["mean"]["hi"]) == pytest.approx((lo, hi)) == (-7.5, 20.0)
    assert out["tasks"]["b"]["diff"] == pytest.approx(20.0)


def test_same_seed_same_interval_and_identical_models_give_zero():
    dense = {"t": [1, 0, 1, 1, 0, 1, 0, 1]}
    pruned = {"t": [1, 1, 0, 1, 0, 1, 0, 0]}
    assert paired_accuracy(dense, pruned, seed=3) == paired_accuracy(dense, pruned, seed=3)
    same = paired_accuracy(dense, dense)
    assert (same["mean"]["lo"], same["mean"]["hi"]) == (0.0, 0.0)
    assert same["tasks"]["t"]["mcnemar_p"] == 1.0


@pytest.mark.parametrize("b, c", [(0, 0), (3, 0), (7, 2), (12, 11), (40, 25), (620, 580), (700, 500)])
def test_mcnemar_exact_matches_scipys_binomial_test(b, c):
    want = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(want, rel=1e-12)
    assert mcnemar_exact(c, b) == pytest.approx(want, rel=1e-12)


def test_mcnemar_counts_come_from_the_items():
    dense = {"t": [1, 1, 1, 0, 0, 1, 1, 0]}
    pruned = {"t": [0, 1, 0, 1, 0, 0, 1, 0]}  # dense only: items 0, 2, 5; pruned only: item 3
    out = paired_accuracy(dense, pruned)["tasks"]["t"]
    assert (out["dense_only"], out["pruned_only"]) == (3, 1)
    assert out["mcnemar_p"] == pytest.approx(binomtest(1, 4, 0.5).pvalue)


def test_mismatched_items_are_refused():
    with pytest.raises(TopiaryError, match="3 dense and 2 pruned items"):
        paired_accuracy({"t": [1, 0, 1]}, {"t": [1, 0]})
    with pytest.raises(TopiaryError, match="tasks differ"):
        paired_accuracy({"a": [1]}, {"b": [1]})
    with pytest.raises(TopiaryError, match="4 dense and 3 pruned windows"):
        paired_perplexity([1.0] * 4, [1.0] * 3, 10)


def test_ppl_ratio_interval_is_paired_over_windows():
    # Windows of very different difficulty; the pruned model adds 0.2 nats per token to each,
    # so every resample has the same ratio exp(0.2) (independent resampling would not).
    tokens = 100
    dense = [100.0, 500.0, 250.0, 420.0, 130.0, 300.0]
    pruned = [d + 0.2 * tokens for d in dense]
    out = paired_perplexity(dense, pruned, tokens, iters=ITERS)
    assert out["ratio"] == pytest.approx(math.exp(0.2))
    assert (out["ratio_lo"], out["ratio_hi"]) == pytest.approx((math.exp(0.2), math.exp(0.2)))
    assert out["ppl_dense"] == pytest.approx(math.exp(sum(dense) / (6 * tokens)))
    assert out["diff"] == pytest.approx(out["ppl_pruned"] - out["ppl_dense"]) and out["windows"] == 6


def test_ppl_difference_interval_of_two_windows_is_hand_computable():
    # Two windows: a resample is (w1, w1), (w1, w2) or (w2, w2) with probabilities 1/4, 1/2,
    # 1/4, so the 2.5% and 97.5% quantiles are the one-window differences.
    t = 10
    dense, pruned = [20.0, 30.0], [25.0, 45.0]
    one = [math.exp(p / t) - math.exp(d / t) for d, p in zip(dense, pruned, strict=True)]
    out = paired_perplexity(dense, pruned, [t, t], iters=ITERS)
    assert (out["diff_lo"], out["diff_hi"]) == pytest.approx((min(one), max(one)))
    ratios = [math.exp((p - d) / t) for d, p in zip(dense, pruned, strict=True)]
    assert (out["ratio_lo"], out["ratio_hi"]) == pytest.approx((min(ratios), max(ratios)))
    assert out["ratio"] == pytest.approx(math.exp((sum(pruned) - sum(dense)) / (2 * t)))


def test_single_model_accuracy_interval():
    out = accuracy_interval({"t": [1] * 3 + [0] * 17}, iters=ITERS)
    pmf = {5.0 * k: p for k, p in _binomial_pmf(20, 0.15).items()}
    assert out["acc"] == pytest.approx(15.0) and out["n"] == 20
    assert (out["lo"], out["hi"]) == pytest.approx((_quantile(pmf, 0.025)[0], _quantile(pmf, 0.975)[0]))


def test_compare_refuses_results_scored_on_other_items_or_windows():
    from tasks.evaluate import compare

    ppl = {"seqlen": 8, "window_nll": [10.0, 12.0, 9.0]}
    zs = {"items": {"metric": "acc", "acc": {"t": [1, 0, 1]}, "docs": {"t": "a"}}}
    other = {"items": {"metric": "acc", "acc": {"t": [1, 1, 1]}, "docs": {"t": "b"}}}
    with pytest.raises(TopiaryError, match="zero-shot items differ on t"):
        compare(ppl, ppl, zs, other)
    with pytest.raises(TopiaryError, match="windows of 8 .dense. and 16 .pruned. tokens"):
        compare(ppl, {**ppl, "seqlen": 16}, zs, zs)
    out = compare(ppl, {**ppl, "window_nll": [11.0, 13.0, 10.0]}, zs, zs)
    assert out["ppl"]["ratio"] == pytest.approx(math.exp(3 / 21)) and out["zeroshot"]["mean"]["diff"] == 0.0
    assert compare(ppl, ppl, None, None)["zeroshot"] is None
