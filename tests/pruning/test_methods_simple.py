"""Magnitude, Wanda, GBLM-Pruner and OWL: hand-worked oracles, invariants on random inputs, errors.

Every oracle writes the expected mask by hand and also runs the method under test with
one part swapped for a plausible wrong variant (:func:`mutant`: the score or the
selection it calls), asserting that the mask then differs: the oracle would catch it.
"""

from __future__ import annotations

import math

import pytest
import torch

import modules.pruning.gblm
import modules.pruning.wanda
from modules.pruning.gblm import gblm_scores, prune_gblm
from modules.pruning.magnitude import prune_magnitude
from modules.pruning.owl import outlier_ratio, owl_rates, streamed_outlier_ratio
from modules.pruning.sparsity import (
    NonFiniteError,
    SparsitySpec,
    SpecError,
    check_finite,
    keep_mask,
    prune_count,
)
from modules.pruning.stats import LayerStats
from modules.pruning.wanda import alpha_keep, prune_wanda, wanda_scores

T, F = True, False


def _mask(rows: list[list[bool]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _stats(sq_norm, grad=None) -> LayerStats:
    return LayerStats(tokens=16, sq_norm=_t(sq_norm), grad=None if grad is None else _t(grad))


def _rate(s: float) -> SparsitySpec:
    return SparsitySpec(rate=s)


def _nm(n: int, m: int) -> SparsitySpec:
    return SparsitySpec(n=n, m=m)


def assert_mask(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.bool and actual.shape == expected.shape
    assert torch.equal(actual, expected), f"mask\n{actual.int()}\n!= expected\n{expected.int()}"


def assert_differs(wrong: torch.Tensor, expected: torch.Tensor) -> None:
    """The wrong variant's mask must differ, else the oracle could not catch it."""
    assert not torch.equal(wrong, expected), "oracle has no teeth: the wrong variant gives the same mask"


def mutant(monkeypatch, module, name: str, replacement, call):
    """``call()`` with ``module.name`` replaced by ``replacement``: the method under test with
    one of its parts swapped for a wrong variant (restored on return)."""
    with monkeypatch.context() as m:
        m.setattr(module, name, replacement)
        return call()


def matrix_ranking(scores, spec, group="row"):
    """The selection compared over the whole matrix instead of per output row."""
    return keep_mask(scores, spec, "matrix")


def swapped_nm(scores, spec, group="row"):
    """N:M read the wrong way round: prune N of every M instead of M - N."""
    return keep_mask(scores, _nm(spec.m - spec.n, spec.m))


def groups_of_four(scores, spec, group="row"):
    """N:M hard-wired to groups of 4 (the ADMM reference's 2:4 branch), N scaled to match."""
    return keep_mask(scores, _nm(spec.n * 4 // spec.m, 4))


def assert_applied(W: torch.Tensor, W_pruned: torch.Tensor, keep: torch.Tensor) -> None:
    """Pruned entries are exactly +0.0, kept entries bit-identical to W, and a new tensor."""
    assert W_pruned.shape == W.shape and W_pruned.dtype == W.dtype
    assert W_pruned.data_ptr() != W.data_ptr()
    off = W_pruned[~keep]
    assert bool((off == 0).all()) and not bool(torch.signbit(off).any())
    assert torch.equal(W_pruned[keep], W[keep])


# ---------------------------------------------------------------- Wanda oracles

# W and sq_norm shared by the Wanda oracle; ||X_j|| = sqrt(sq_norm) = [1, 3, 1, 2].
WANDA_W = [[-4.0, 1.0, 2.0, -1.0], [3.0, -3.0, 3.0, 3.0]]
WANDA_SQ = [1.0, 9.0, 1.0, 4.0]


def test_wanda_oracle_unstructured(monkeypatch):
    # Scores |W| * ||X_j||: row 0 = [4, 3, 2, 2], row 1 = [3, 9, 3, 6].
    # 50% per row prunes 2 of each row: row 0 the two 2s (cols 2, 3);
    # row 1 the two 3s (cols 0, 2).
    W = _t(WANDA_W)
    W_pruned, keep = prune_wanda(W, _stats(WANDA_SQ), _rate(0.5))
    expected = _mask([[T, T, F, F], [F, T, F, T]])
    assert_mask(keep, expected)
    assert torch.equal(W_pruned, _t([[-4.0, 1.0, 0.0, 0.0], [0.0, -3.0, 0.0, 3.0]]))
    assert torch.equal(wanda_scores(W, _t(WANDA_SQ)), _t([[4, 3, 2, 2], [3, 9, 3, 6]]))

    def wanda(scores=None, select=None):
        """prune_wanda's mask with its score (or its selection) swapped for a wrong one."""

        def call():
            return prune_wanda(W, _stats(WANDA_SQ), _rate(0.5))[1]

        if select is not None:
            return mutant(monkeypatch, modules.pruning.wanda, "keep_mask", select, call)
        return mutant(monkeypatch, modules.pruning.wanda, "wanda_scores", scores, call)

    # Squared norm |W| * sq_norm: row 0 = [4, 9, 2, 4] -> prunes col 2, then the tied 4 at col 0.
    assert_differs(wanda(lambda W, sq, *_: W.abs() * sq), expected)
    # Whole-matrix ranking: the 4 lowest of [4,3,2,2,3,9,3,6] are both 2s and the first two 3s
    # (row 0 col 1, row 1 col 0): row 0 keeps only col 0.
    wrong_matrix = wanda(select=matrix_ranking)
    assert_mask(wrong_matrix, _mask([[T, F, F, F], [F, T, T, T]]))
    assert_differs(wrong_matrix, expected)
    # Without abs, W * ||X||: row 0 = [-4, 3, 2, -2] prunes cols 0 and 3.
    assert_differs(wanda(lambda W, sq, *_: W * sq.sqrt()), expected)
    # Plain per-row magnitude: row 0 |W| = [4, 1, 2, 1] prunes cols 1 and 3.
    assert_differs(wanda(lambda W, sq, *_: W.abs()), expected)


# N:M oracle: col 4 is a dead input (sq_norm 0): its score is 0 whatever |W| is.
NM_W = [[5.0, -1.0, 3.0, -2.0, 9.0, -7.0, 6.0, 4.0], [1.0, -2.0, 3.0, -4.0, -1.0, 2.0, -3.0, 4.0]]
NM_SQ = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
# Scores: row 0 = [5, 1, 3, 2 | 0, 7, 6, 4], row 1 = [1, 2, 3, 4 | 0, 2, 3, 4].
NM_EXPECTED = {
    # 1:4 keeps the largest of each group of 4.
    (1, 4): [[T, F, F, F, F, T, F, F], [F, F, F, T, F, F, F, T]],
    # 2:4 keeps the two largest of each group of 4.
    (2, 4): [[T, F, T, F, F, T, T, F], [F, F, T, T, F, F, T, T]],
    # 3:4 prunes only the smallest of each group (the dead col 4 in the second group).
    (3, 4): [[T, F, T, T, F, T, T, T], [F, T, T, T, F, T, T, T]],
    # 4:8 keeps the 4 largest of all 8: row 0 = 7, 6, 5, 4; row 1 prunes 0, 1 and the two 2s.
    (4, 8): [[T, F, F, F, F, T, T, T], [F, F, T, T, F, F, T, T]],
}


@pytest.mark.parametrize("n,m", list(NM_EXPECTED))
def test_wanda_oracle_nm(monkeypatch, n, m):
    W = _t(NM_W)
    W_pruned, keep = prune_wanda(W, _stats(NM_SQ), _nm(n, m))
    expected = _mask(NM_EXPECTED[(n, m)])
    assert_mask(keep, expected)
    assert_applied(W, W_pruned, keep)

    def call():
        return prune_wanda(W, _stats(NM_SQ), _nm(n, m))[1]

    if m == 4 and n != 2:
        # Pruning N instead of M - N = keeping M - N: for 1:4 and 3:4 that is the other mask.
        assert_differs(mutant(monkeypatch, modules.pruning.wanda, "keep_mask", swapped_nm, call), expected)
    if m == 8:
        # Groups hard-wired to 4 (the ADMM reference's 2:4 branch) give the 2:4 mask instead.
        assert_differs(
            mutant(monkeypatch, modules.pruning.wanda, "keep_mask", groups_of_four, call), expected
        )
    # Ignoring the activations (magnitude): the dead col 4 has the largest |W| of row 0.
    magnitude = mutant(monkeypatch, modules.pruning.wanda, "wanda_scores", lambda W, sq, *_: W.abs(), call)
    assert_differs(magnitude, expected)


def test_wanda_oracle_alpha_search_downwards():
    # Scores (sq_norm = 1): row 0 = [1, 1, 1, 1] (sum 4), row 1 = [10, 2, 1, 3] (sum 16).
    # Sorted cumulative sums: row 0 = [1, 2, 3, 4], row 1 = [1, 3, 6, 16]. Target 25% = 2 of 8.
    # alpha 0.4: row 0 prunes cum <= 1.6 (1), row 1 cum <= 6.4 (3): 4/8 = 0.5 > 0.25, go down.
    # alpha 0.2: row 0 cum <= 0.8 (0), row 1 cum <= 3.2 (2: scores 1, 2): 2/8 = 0.25. Done.
    W = _t([[1.0, -1.0, 1.0, -1.0], [10.0, -2.0, 1.0, 3.0]])
    stats = _stats([1.0, 1.0, 1.0, 1.0])
    expected = _mask([[T, T, T, T], [T, F, F, T]])
    keep, alpha, achieved = alpha_keep(wanda_scores(W, stats.sq_norm), 0.25)
    assert_mask(keep, expected)
    assert alpha == pytest.approx(0.2, abs=1e-12) and achieved == 0.25
    W_pruned, keep2 = prune_wanda(W, stats, _rate(0.25), alpha_search=True)
    assert_mask(keep2, expected)
    assert_applied(W, W_pruned, keep2)
    # Plain Wanda at 25% prunes one weight of every row, including row 0.
    assert_differs(prune_wanda(W, stats, _rate(0.25))[1], expected)
    # Not searching (stopping at the starting alpha 0.4, where target 0.5 is met) prunes 4 weights.
    no_search, alpha_start, _ = alpha_keep(wanda_scores(W, stats.sq_norm), 0.5)
    assert alpha_start == 0.4
    assert_differs(no_search, expected)


def test_wanda_oracle_alpha_search_upwards(monkeypatch):
    # Same scores, target 62.5% = 5 of 8. alpha 0.4 gives 4/8 < 0.625, go up to 0.6:
    # row 0 prunes cum <= 2.4 (2: cols 0, 1 by the stable sort), row 1 cum <= 9.6 (3). 5/8.
    W = _t([[1.0, -1.0, 1.0, -1.0], [10.0, -2.0, 1.0, 3.0]])
    keep, alpha, achieved = alpha_keep(wanda_scores(W, torch.ones(4)), 0.625)
    expected = _mask([[F, F, T, T], [T, F, F, F]])
    assert_mask(keep, expected)
    assert alpha == pytest.approx(0.6, abs=1e-12) and achieved == 0.625

    # Whole-matrix ranking at 62.5% prunes the five 1s: all of row 0 and row 1's col 2.
    def by_matrix(scores, target):
        return keep_mask(scores, _rate(target), "matrix"), None, None

    wrong = mutant(
        monkeypatch,
        modules.pruning.wanda,
        "alpha_keep",
        by_matrix,
        lambda: prune_wanda(W, _stats([1.0] * 4), _rate(0.625), alpha_search=True)[1],
    )
    assert_mask(wrong, _mask([[F, F, F, F], [T, T, F, T]]))
    assert_differs(wrong, expected)
    assert_mask(prune_wanda(W, _stats([1.0] * 4), _rate(0.625), alpha_search=True)[1], expected)


# ------------------------------------------------------------ Magnitude oracles


def test_magnitude_oracle_matrix_vs_row():
    W = _t([[-1.0, 2.0, -3.0, 4.0], [10.0, -20.0, 30.0, -40.0]])
    # Whole matrix, 50% = 4 of 8: |W| 1, 2, 3, 4 are all in row 0.
    W_pruned, keep = prune_magnitude(W, None, _rate(0.5))
    expected_matrix = _mask([[F, F, F, F], [T, T, T, T]])
    assert_mask(keep, expected_matrix)
    assert_applied(W, W_pruned, keep)
    # Per row, 2 of 4 each: the two smallest of each row.
    _, keep_row = prune_magnitude(W, None, _rate(0.5), group="row")
    expected_row = _mask([[F, F, T, T], [F, F, T, T]])
    assert_mask(keep_row, expected_row)
    assert_differs(keep_row, keep)  # the two groups give different masks here
    # The sign never matters: without abs the 4 lowest of W are -40, -20, -3, -1 and those of
    # -W are -30, -10, -4, -2, two masks other than the one |W| gives.
    assert_mask(prune_magnitude(-W, None, _rate(0.5))[1], expected_matrix)
    # The reference's `|W| <= sorted[int(numel * s)]` prunes one extra weight (5, not 4).
    thresh = torch.sort(W.abs().flatten()).values[int(W.numel() * 0.5)]
    assert int((W.abs() <= thresh).sum()) == 5 and int((~keep).sum()) == 4


def test_magnitude_oracle_nm_and_ties():
    W = _t([[3.0, -1.0, 2.0, -5.0]])
    _, keep14 = prune_magnitude(W, None, _nm(1, 4))
    _, keep34 = prune_magnitude(W, None, _nm(3, 4))
    assert_mask(keep14, _mask([[F, F, F, T]]))  # keeps |-5|
    assert_mask(keep34, _mask([[T, F, T, T]]))  # prunes |-1|
    assert_differs(keep14, keep34)  # N vs M - N swapped would swap these two
    # Ties are broken by position: the earlier of equal |W| is pruned first.
    W = _t([[1.0, -1.0, 1.0, -1.0, 2.0, -2.0]])
    _, keep = prune_magnitude(W, None, _rate(0.5), group="row")
    assert_mask(keep, _mask([[F, F, F, T, T, T]]))


# ------------------------------------------------------------------ GBLM oracles

# Raw per-sample gradients of one weight row (two calibration samples), chosen as 3-4-5
# triangles so that G = sqrt(sum_k (100 g_k)^2) is exact: [0.5, 0.8, 5, 3].
GBLM_G1 = [0.003, 0.0048, 0.03, 0.018]
GBLM_G2 = [-0.004, 0.0064, -0.04, 0.024]
GBLM_W = [[2.0, -1.0, 1.0, -1.0], [-10.0, 10.0, 10.0, -10.0]]
GBLM_SQ = [16.0, 9.0, 1.0, 0.25]  # ||X_j|| = [4, 3, 1, 0.5]
GBLM_GRAD = [[0.5, 0.8, 5.0, 3.0], [1.0, 1.0, 1.0, 1.0]]


def test_gblm_oracle(monkeypatch):
    g = torch.tensor([GBLM_G1, GBLM_G2], dtype=torch.float64)
    assert torch.allclose(((100 * g) ** 2).sum(0).sqrt(), torch.tensor(GBLM_GRAD[0], dtype=torch.float64))
    W = _t(GBLM_W)
    stats = _stats(GBLM_SQ, GBLM_GRAD)
    # Row 0: |W| * (G + ||X||) = [2, 1, 1, 1] * [4.5, 3.8, 6, 3.5] = [9, 3.8, 6, 3.5] -> prune cols 3, 1.
    # Row 1: 10 * ([1, 1, 1, 1] + [4, 3, 1, 0.5]) = [50, 40, 20, 15] -> prune cols 3, 2.
    expected = _mask([[T, F, T, F], [T, T, F, F]])
    W_pruned, keep = prune_gblm(W, stats, _rate(0.5))
    assert_mask(keep, expected)
    assert_applied(W, W_pruned, keep)
    assert torch.allclose(gblm_scores(W, stats.sq_norm, stats.grad), _t([[9, 3.8, 6, 3.5], [50, 40, 20, 15]]))

    wrong = {  # each a wrong gblm_scores(W, sq_norm, G, nsamples)
        "gradient term only, |W| * G = [1, .8, 5, 3]": lambda W, sq, G, n=1, *_: W.abs() * G,
        "Wanda term only, |W| * ||X|| = [8, 3, 1, .5]": lambda W, sq, G, n=1, *_: W.abs() * sq.sqrt(),
        "no x100 (G / 100): Wanda term dominates": lambda W, sq, G, n=1, *_: W.abs() * (G / 100 + sq.sqrt()),
        "x100 applied twice: gradient term dominates": lambda W, sq, G, n=1, *_: (
            W.abs() * (G * 100 + sq.sqrt())
        ),
        "sum of squares without the root, G^2 = [.25, .64, 25, 9]": lambda W, sq, G, n=1, *_: (
            W.abs() * (G**2 + sq.sqrt())
        ),
        "squared norm in the Wanda term, [16, 9, 1, .25]": lambda W, sq, G, n=1, *_: W.abs() * (G + sq),
    }

    def call():
        return prune_gblm(W, stats, _rate(0.5))[1]

    for name, scores in wrong.items():
        assert not torch.equal(
            mutant(monkeypatch, modules.pruning.gblm, "gblm_scores", scores, call), expected
        ), name
    # Whole-matrix ranking: row 1's scores all exceed row 0's, so row 0 loses everything.
    wrong_matrix = mutant(monkeypatch, modules.pruning.gblm, "keep_mask", matrix_ranking, call)
    assert_mask(wrong_matrix, _mask([[F, F, F, F], [T, T, T, T]]))


def test_gblm_oracle_nsamples_scales_the_wanda_term():
    # nsamples=16 divides sq_norm by 16, i.e. ||X|| by 4: [1, .75, .25, .125].
    # Row 0: [2, 1, 1, 1] * ([.5, .8, 5, 3] + that) = [3, 1.55, 5.25, 3.125] -> prune cols 1, 0.
    W = _t(GBLM_W)
    stats = _stats(GBLM_SQ, GBLM_GRAD)
    _, keep = prune_gblm(W, stats, _rate(0.5), nsamples=16)
    expected = _mask([[F, F, T, T], [T, T, F, F]])
    assert_mask(keep, expected)
    assert_differs(prune_gblm(W, stats, _rate(0.5))[1], expected)


def test_gblm_oracle_nm(monkeypatch):
    # 1:4 on the same rows keeps the top score of each row: row 0 col 0 (9), row 1 col 0 (50).
    # With the gradient term only, row 0 keeps col 2 (5) instead.
    W = _t(GBLM_W)
    stats = _stats(GBLM_SQ, GBLM_GRAD)
    _, keep = prune_gblm(W, stats, _nm(1, 4))
    expected = _mask([[T, F, F, F], [T, F, F, F]])
    assert_mask(keep, expected)

    def call():
        return prune_gblm(W, stats, _nm(1, 4))[1]

    gradient_only = mutant(
        monkeypatch, modules.pruning.gblm, "gblm_scores", lambda W, sq, G, n=1, *_: W.abs() * G, call
    )
    assert_differs(gradient_only, expected)
    assert_differs(mutant(monkeypatch, modules.pruning.gblm, "keep_mask", swapped_nm, call), expected)


# ------------------------------------------------------------------ Invariants

SHAPES = [(3, 8), (5, 16), (4, 24)]
RATES = [0.0, 0.3, 0.5, 0.77, 0.9]


def _random_layer(shape: tuple[int, int], seed: int, dead: int = 0) -> tuple[torch.Tensor, LayerStats]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g)
    X = torch.randn(32, shape[1], generator=g) * torch.rand(shape[1], generator=g) * 3
    if dead:
        X[:, :dead] = 0.0
    grad = torch.rand(shape, generator=g) * 2
    return W, LayerStats(tokens=32, sq_norm=(X**2).sum(0), gram=X.T @ X, grad=grad)


def _scores(method: str, W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    if method == "magnitude":
        return W.abs()
    if method == "wanda":
        return wanda_scores(W, stats.sq_norm)
    return gblm_scores(W, stats.sq_norm, stats.grad)


def _prune(method: str, W: torch.Tensor, stats: LayerStats, spec: SparsitySpec, **options):
    fn = {"magnitude": prune_magnitude, "wanda": prune_wanda, "gblm": prune_gblm}[method]
    return fn(W, stats, spec, **options)


def _py_keep_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent oracle: per row, prune the k smallest by (score, column index)."""
    rows = []
    for row in scores.tolist():
        pruned = set(sorted(range(len(row)), key=lambda j: (row[j], j))[:k])
        rows.append([j not in pruned for j in range(len(row))])
    return _mask(rows)


def test_prune_count_is_the_floor_of_the_rate_as_written():
    assert prune_count(100, 0.29) == 29  # int(100 * 0.29) == 28
    assert int(100 * 0.29) == 28
    assert prune_count(8, 0.5) == 4 and prune_count(24, 0.77) == 18 and prune_count(7, 0.0) == 0
    W = torch.arange(1.0, 101.0).unsqueeze(0)
    assert int((~prune_wanda(W, LayerStats(1, torch.ones(100)), _rate(0.29))[1]).sum()) == 29
    assert int((~prune_magnitude(W, None, _rate(0.29), group="row")[1]).sum()) == 29
    assert int((~prune_magnitude(W.reshape(10, 10), None, _rate(0.29))[1]).sum()) == 29


@pytest.mark.parametrize("method", ["magnitude", "wanda", "gblm"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_unstructured_invariants(method, shape, seed):
    W, stats = _random_layer(shape, seed)
    W_before = W.clone()
    options = {"group": "row"} if method == "magnitude" else {}
    for s in RATES:
        W_pruned, keep = _prune(method, W, stats, _rate(s), **options)
        assert_applied(W, W_pruned, keep)
        k = math.floor(shape[1] * s + 1e-9)
        assert (~keep).sum(dim=1).tolist() == [k] * shape[0], (method, s)
        scores = _scores(method, W, stats)
        # Selection is by score: inside each row every kept score >= every pruned score.
        for r in range(shape[0]):
            if 0 < k < shape[1]:
                assert scores[r][keep[r]].min() >= scores[r][~keep[r]].max()
        W_again, keep_again = _prune(method, W, stats, _rate(s), **options)
        assert torch.equal(keep, keep_again) and torch.equal(W_pruned, W_again)
    assert torch.equal(W, W_before)  # never in place


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_magnitude_matrix_count(shape, seed):
    W, _ = _random_layer(shape, seed)
    for s in RATES:
        W_pruned, keep = prune_magnitude(W, None, _rate(s))
        assert int((~keep).sum()) == math.floor(W.numel() * s + 1e-9)
        assert_applied(W, W_pruned, keep)
        if 0 < (~keep).sum() < W.numel():
            assert W.abs()[keep].min() >= W.abs()[~keep].max()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "gblm"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_nm_invariants(method, n, m, seed):
    W, stats = _random_layer((6, 24), seed)
    W_before = W.clone()
    W_pruned, keep = _prune(method, W, stats, _nm(n, m))
    assert_applied(W, W_pruned, keep)
    groups = keep.reshape(6, -1, m)
    assert bool((groups.sum(-1) == n).all())
    scores = _scores(method, W, stats).reshape(6, -1, m)
    kept_min = torch.where(groups, scores, torch.inf).amin(-1)
    pruned_max = torch.where(~groups, scores, -torch.inf).amax(-1)
    assert bool((kept_min >= pruned_max).all())
    assert torch.equal(keep, _prune(method, W, stats, _nm(n, m))[1])
    assert torch.equal(W, W_before)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "gblm"])
def test_ties_are_broken_by_position(method):
    # Small integers and perfect-square sq_norm make the scores exact and full of ties.
    g = torch.Generator().manual_seed(3)
    W = torch.randint(-3, 4, (6, 12), generator=g).float()
    sq_norm = torch.tensor([0.0, 1.0, 4.0, 9.0] * 3)
    grad = torch.randint(0, 3, (6, 12), generator=g).float()
    stats = LayerStats(tokens=4, sq_norm=sq_norm, grad=grad)
    options = {"group": "row"} if method == "magnitude" else {}
    scores = _scores(method, W, stats)
    assert len(set(scores.flatten().tolist())) < scores.numel() // 2  # many ties
    for s in (0.25, 0.5, 0.75):
        _, keep = _prune(method, W, stats, _rate(s), **options)
        assert_mask(keep, _py_keep_rows(scores, prune_count(12, s)))


@pytest.mark.parametrize("method", ["wanda", "gblm"])
def test_dead_inputs_are_pruned_first(method):
    W, stats = _random_layer((5, 16), seed=4, dead=3)
    if method == "gblm":
        stats.grad[:, :3] = 0.0  # a dead input also has no gradient on its weights
    _, keep = _prune(method, W, stats, _rate(0.25))  # 4 per row: the 3 dead ones and one more
    assert not bool(keep[:, :3].any())
    assert (~keep).sum(1).tolist() == [4] * 5


# (seed 2, target 0.3 needs alpha ~0.038: the reference's stop at a 0.001-wide bracket misses it.)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.6])
def test_alpha_search_invariants(seed, target):
    W, stats = _random_layer((32, 128), seed)
    W_pruned, keep = prune_wanda(W, stats, _rate(target), alpha_search=True)
    assert_applied(W, W_pruned, keep)
    assert abs(float((~keep).float().mean()) - target) <= 0.001
    _, alpha, achieved = alpha_keep(wanda_scores(W, stats.sq_norm), target)
    assert 0.0 <= alpha <= 0.8 and achieved == float((~keep).float().mean())
    scores = wanda_scores(W, stats.sq_norm)
    for r in range(32):  # each row prunes a lowest-score prefix
        if 0 < int((~keep[r]).sum()) < 128:
            assert scores[r][keep[r]].min() >= scores[r][~keep[r]].max()
    # Rows differ in how much they lose (that is the point of the variant).
    assert len(set((~keep).sum(1).tolist())) > 1
    assert torch.equal(keep, prune_wanda(W, stats, _rate(target), alpha_search=True)[1])


def test_alpha_search_warns_when_the_target_cannot_be_reached(caplog):
    # 4 weights can only be 0, 25, 50, 75 or 100% pruned: 30% is out of reach.
    with caplog.at_level("WARNING", logger="modules.pruning.wanda"):
        keep, _, achieved = alpha_keep(_t([[1.0, 2.0, 3.0, 4.0]]), 0.3)
    assert abs(achieved - 0.3) > 0.001 and "not reached" in caplog.text
    assert achieved == float((~keep).float().mean())


# ----------------------------------------------------------------------- Errors


@pytest.mark.parametrize("method", ["magnitude", "wanda", "gblm"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_raises(method, bad):
    W, stats = _random_layer((3, 8), 0)
    W[1, 2] = bad
    with pytest.raises(ValueError, match=r"^W: .*(NaN|Inf)"):
        _prune(method, W, stats, _rate(0.5))


@pytest.mark.parametrize("method", ["wanda", "gblm"])
def test_non_finite_stats_raise(method):
    W, stats = _random_layer((3, 8), 0)
    stats.sq_norm[3] = math.inf
    with pytest.raises(NonFiniteError, match=r"stats\.sq_norm: 0 NaN and 1 Inf"):
        _prune(method, W, stats, _rate(0.5))


def test_non_finite_gradient_raises():
    W, stats = _random_layer((3, 8), 0)
    stats.grad[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"stats\.grad: 1 NaN"):
        prune_gblm(W, stats, _rate(0.5))


def test_check_finite_names_the_tensor():
    check_finite("ok", torch.ones(3), None, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"^layers\.0\.q_proj \(tensor 2 of 2\): 2 NaN and 0 Inf"):
        check_finite("layers.0.q_proj", torch.ones(3), torch.tensor([math.nan, 1.0, math.nan]))


def test_gblm_without_gradient_says_which_step_is_missing():
    W, stats = _random_layer((3, 8), 0)
    stats.grad = None
    with pytest.raises(ValueError, match="gradient step .* must run before pruning"):
        prune_gblm(W, stats, _rate(0.5))


def test_bad_options_and_shapes_raise():
    W, stats = _random_layer((3, 8), 0)
    with pytest.raises(SpecError, match="alpha_search needs an unstructured sparsity, not pattern 2:4"):
        prune_wanda(W, stats, _nm(2, 4), alpha_search=True)
    with pytest.raises(SpecError, match='group: "column" is not one of matrix, row'):
        prune_magnitude(W, None, _rate(0.5), group="column")
    with pytest.raises(ValueError, match=r"sq_norm has shape \(7,\), expected \(8,\)"):
        prune_wanda(W, LayerStats(4, torch.ones(7)), _rate(0.5))
    with pytest.raises(ValueError, match=r"grad has shape \(8, 3\)"):
        prune_gblm(W, LayerStats(4, torch.ones(8), grad=torch.ones(8, 3)), _rate(0.5))
    with pytest.raises(SpecError, match="M=8 does not divide the input width 12"):
        prune_wanda(torch.ones(2, 12), LayerStats(4, torch.ones(12)), _nm(4, 8))


# -------------------------------------------------------------------------- OWL


def test_outlier_ratio_oracle():
    # Mean over all 10 values = (1+1+1+20 + 6) / 10 = 2.9; 5 x mean = 14.5: only 20 is above.
    block = [_t([1.0, 1.0, 1.0, 20.0]), torch.ones(6)]
    assert outlier_ratio(block) == pytest.approx(0.1)
    # Per-tensor means would find none: 20 < 5 x 5.75 in the first tensor.
    assert outlier_ratio(block[0]) == 0.0
    assert outlier_ratio(block, m=10.0) == 0.0  # 20 < 29
    assert outlier_ratio(torch.zeros(4)) == 0.0  # nothing above 0
    with pytest.raises(ValueError, match="NaN"):
        outlier_ratio(_t([1.0, math.nan]))


def test_streamed_outlier_ratio_is_the_ratio_of_all_scores_together():
    """Two sweeps over pieces of a block (as the engine streams expert groups) give exactly the
    ratio of the whole block in one tensor: the mean is taken over all pieces, not per piece."""
    g = torch.Generator().manual_seed(0)
    pieces = [torch.rand(64, 32, generator=g) * scale for scale in (1.0, 30.0, 0.1, 4.0)]
    pieces[2][0, :5] = 400.0  # outliers of the whole block in a piece of small scores
    whole = torch.cat([p.flatten() for p in pieces]).double()
    expected = int((whole > 2.0 * whole.mean()).sum()) / whole.numel()
    calls = []

    def scores():
        calls.append(1)
        for p in pieces:
            yield from p.split(16)  # pieces of pieces, one at a time

    assert streamed_outlier_ratio(scores, m=2.0) == expected == outlier_ratio(pieces, m=2.0)
    assert len(calls) == 2
    per_piece = sum(int((p.double() > 2.0 * p.double().mean()).sum()) for p in pieces) / whole.numel()
    assert per_piece != expected  # the data tells the two rules apart
    with pytest.raises(ValueError, match="no scores"):
        streamed_outlier_ratio(lambda: iter([]))


def test_owl_rates_oracle_in_band():
    # Ratios 0..3 normalise to [0, 2/3, 4/3, 2] * lam, mean lam: shifts [-lam, -lam/3, lam/3, lam].
    # Rates = target - shift: the block with most outliers gets the lowest sparsity.
    rates = owl_rates([0.0, 1.0, 2.0, 3.0], target=0.5, lam=0.08)
    assert rates == pytest.approx([0.58, 0.5 + 0.08 / 3, 0.5 - 0.08 / 3, 0.42], abs=1e-12)
    # Here OWL's code is already within the band: within_band=False gives the same.
    assert owl_rates([0.0, 1.0, 2.0, 3.0], 0.5, 0.08, within_band=False) == pytest.approx(rates, abs=1e-12)
    # The ratio's scale (OWL prints percent) does not matter.
    assert owl_rates([0.0, 100.0, 200.0, 300.0], 0.5) == pytest.approx(rates, abs=1e-12)
    # The inverted allocation (more outliers -> more sparsity) is the plausible wrong variant.
    assert owl_rates([3.0, 2.0, 1.0, 0.0], 0.5) != pytest.approx(rates, abs=1e-6)


def test_owl_rates_oracle_skewed():
    # Ratios [0, 0, 0, 1]: normalised [0, 0, 0, 2 lam], mean lam/2, shifts [-lam/2]*3 + [3 lam/2].
    # OWL's code: [0.54, 0.54, 0.54, 0.38], the last block 1.5 lam under the target.
    code = owl_rates([0.0, 0.0, 0.0, 1.0], 0.5, 0.08, within_band=False)
    assert code == pytest.approx([0.54, 0.54, 0.54, 0.38], abs=1e-12)
    # Within the band the shifts shrink by lam / (1.5 lam) = 2/3: [0.5 + lam/3]*3 + [0.42].
    banded = owl_rates([0.0, 0.0, 0.0, 1.0], 0.5, 0.08)
    assert banded == pytest.approx([0.5 + 0.08 / 3] * 3 + [0.42], abs=1e-12)


def test_owl_rates_oracle_near_zero_and_equal():
    # Target 0.05 < lam: rates may not go below 0, so shifts shrink by 0.05 / 0.08.
    rates = owl_rates([0.0, 1.0, 2.0, 3.0], target=0.05, lam=0.08)
    assert rates == pytest.approx([0.1, 0.05 + 0.05 / 3, 0.05 - 0.05 / 3, 0.0], abs=1e-12)
    assert owl_rates([2.0, 2.0, 2.0], 0.6) == [0.6, 0.6, 0.6]
    assert owl_rates([0.0, 5.0], 0.0) == [0.0, 0.0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.0, 0.05, 0.5, 0.7, 0.9, 0.97])
@pytest.mark.parametrize("lam", [0.0, 0.08, 0.2])
@pytest.mark.parametrize("within_band", [True, False])
def test_owl_rates_invariants(seed, target, lam, within_band):
    g = torch.Generator().manual_seed(seed)
    n = 2 + seed * 5
    ratios = (torch.rand(n, generator=g) ** 3 * 10).tolist()
    rates = owl_rates(ratios, target, lam, within_band=within_band)
    assert len(rates) == n
    assert abs(sum(rates) / n - target) <= 1e-6
    assert all(0.0 <= r < 1.0 for r in rates)
    width = lam if within_band else 2 * lam
    assert all(target - width - 1e-12 <= r <= target + width + 1e-12 for r in rates)
    by_ratio = [r for _, r in sorted(zip(ratios, rates, strict=True))]
    assert all(a >= b - 1e-12 for a, b in zip(by_ratio, by_ratio[1:], strict=False))


def test_owl_rates_errors():
    with pytest.raises(ValueError, match="no ratios"):
        owl_rates([], 0.5)
    with pytest.raises(ValueError, match=r"target 1.0 is outside \[0, 1\)"):
        owl_rates([1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        owl_rates([1.0, 2.0], 0.5, lam=-0.1)
    with pytest.raises(ValueError, match="finite"):
        owl_rates([1.0, math.nan], 0.5)
