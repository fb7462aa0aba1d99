"""SparseGPT, ADMM and ADMM-Grad: hand-worked oracles, invariants on random inputs, errors.

Each oracle is worked out by hand (or in closed form) and, where a plausible wrong
variant exists, the test also computes that variant and asserts that it differs.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import modules.pruning.admm as admm
from modules.errors import TopiaryError
from modules.pruning import sparsity
from modules.pruning.admm import admm_update, grad_keep, grad_sparsity, prune_admm, prune_admm_grad
from modules.pruning.numerics import CholeskyError
from modules.pruning.registry import get_method
from modules.pruning.sparsegpt import prune_sparsegpt
from modules.pruning.sparsity import SparsitySpec, SpecError, keep_mask, lowest_mask, nm_lowest, prune_count
from modules.pruning.stats import LayerStats
from modules.pruning.wanda import prune_wanda

ADMM = get_method("admm")


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _rate(s: float) -> SparsitySpec:
    return SparsitySpec(rate=s)


def _nm(n: int, m: int) -> SparsitySpec:
    return SparsitySpec(n=n, m=m)


def _stats_from_x(X: torch.Tensor) -> LayerStats:
    return LayerStats(tokens=X.shape[0], sq_norm=X.pow(2).sum(0), gram=X.T @ X)


def _stats_from_gram(gram: torch.Tensor, tokens: int = 2) -> LayerStats:
    return LayerStats(tokens=tokens, sq_norm=gram.diagonal().clone(), gram=gram)


def _layer(c_out: int = 32, c_in: int = 64, tokens: int = 512, seed: int = 0):
    """Random weight and correlated inputs with heavy-tailed (log-normal) channel scales."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(1.2 * torch.randn(c_in, generator=g))
    mix = torch.randn(8, c_in, generator=g) * 0.7
    X = (torch.randn(tokens, c_in, generator=g) + torch.randn(tokens, 8, generator=g) @ mix) * scale
    W = torch.randn(c_out, c_in, generator=g)
    return W, X


def _rel_err(X: torch.Tensor, W: torch.Tensor, Wp: torch.Tensor) -> float:
    return float((X @ (W - Wp).T).norm() / (X @ W.T).norm())


def assert_valid(W: torch.Tensor, Wp: torch.Tensor, keep: torch.Tensor) -> None:
    """The registry contract: same shape, bool mask, exactly zero off the mask, finite."""
    assert Wp.shape == W.shape and keep.shape == W.shape and keep.dtype == torch.bool
    assert bool(torch.isfinite(Wp).all())
    assert bool((Wp[~keep] == 0).all())


def assert_nm(keep: torch.Tensor, n: int, m: int) -> None:
    kept = keep.reshape(keep.shape[0], -1, m).sum(-1)
    assert bool((kept == n).all()), f"not {n}:{m}: kept per group {kept.unique().tolist()}"


# ----------------------------------------------------------------------------- shared helpers


def test_lowest_mask_is_exact_and_stable_on_ties():
    scores = torch.randint(0, 4, (16, 40)).float()  # many ties
    for k in (0, 1, 7, 20, 39, 40):
        expected = torch.zeros_like(scores, dtype=torch.bool)
        if k:
            expected.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
        got = lowest_mask(scores, k)
        assert torch.equal(got, expected)
        assert bool((got.sum(1) == k).all())
    wrong = scores <= scores.kthvalue(20, dim=1, keepdim=True).values  # the reference's `<=`
    assert not torch.equal(wrong, lowest_mask(scores, 20))
    flat = scores.reshape(-1)  # one long row: the other code path
    for k in (1, 100, 317, 639):
        expected = torch.zeros_like(flat, dtype=torch.bool)
        expected[torch.sort(flat, stable=True).indices[:k]] = True
        assert torch.equal(lowest_mask(flat, k), expected)


def test_kth_smallest_bracket_and_fallback(monkeypatch):
    monkeypatch.setattr(sparsity, "FLAT_DIRECT", 100)  # take the bracketed path on a short vector
    monkeypatch.setattr(sparsity, "FLAT_SAMPLE", 16)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 30, (1000,), generator=g).float()  # ties everywhere
    for k in (1, 99, 500, 777, 1000):
        assert sparsity.kth_smallest(x, k) == x.kthvalue(k).values
    x = torch.rand(1000, generator=g)
    x[::62] = 1e3  # the strided sample sees only these: the bracket misses, fallback
    assert sparsity.kth_smallest(x, 500) == x.kthvalue(500).values
    assert bool((lowest_mask(x, 500).sum() == 500).all())


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (2, 8), (1, 3)])
def test_nm_lowest_matches_a_stable_sort_with_ties(n, m):
    # keep_mask is built on nm_lowest, so the oracle is an independent stable sort per group.
    scores = torch.randint(0, 3, (8, 4 * m)).float()
    groups = scores.reshape(8, -1, m)
    expected = torch.zeros_like(groups, dtype=torch.bool)
    expected.scatter_(-1, torch.sort(groups, dim=-1, stable=True).indices[..., : m - n], True)
    assert torch.equal(nm_lowest(scores, n, m), expected.reshape(scores.shape))
    assert torch.equal(keep_mask(scores, _nm(n, m)), ~expected.reshape(scores.shape))


# ----------------------------------------------------------------------------- SparseGPT oracles


def test_sparsegpt_diagonal_hessian_is_a_block_mask_without_update(monkeypatch):
    # T = 2 tokens, so H = (2/T) gram = gram; H = diag(1, 4, 9, 16), mean 7.5,
    # damped diag h = (1.075, 4.075, 9.075, 16.075). No correlation: no update.
    # Scores w^2 h: row 0: 2.419, 4.075, 9.075, 10.288; row 1: 9.675, 16.3, 0.363, 16.075.
    # 50% over the block (8 weights): the 4 lowest are 0.363, 2.419, 4.075, 9.075, so row 0
    # keeps only its smallest weight (0.8, on the input with the largest norm).
    W = _t([[1.5, 1.0, 1.0, 0.8], [3.0, 2.0, 0.2, 1.0]])
    stats = _stats_from_gram(torch.diag(_t([1.0, 4.0, 9.0, 16.0])), tokens=2)
    Wp, keep = prune_sparsegpt(W, stats, _rate(0.5))
    expected = torch.tensor([[False, False, False, True], [True, True, False, True]])
    assert torch.equal(keep, expected)
    assert torch.equal(Wp, W * expected)  # kept weights untouched, bit for bit
    # plausible wrong variants, run through the method: the count compared per row (row 0
    # would keep its two largest), or |W| alone (magnitude keeps 3.0, 2.0, 1.5, 1.0)
    import modules.pruning.sparsegpt as sparsegpt

    def per_row(score, k):
        return lowest_mask(score.reshape(2, -1), k // 2).reshape(score.shape)

    monkeypatch.setattr(sparsegpt, "lowest_mask", per_row)
    assert torch.equal(prune_sparsegpt(W, stats, _rate(0.5))[1][0], torch.tensor([False, False, True, True]))
    monkeypatch.undo()
    from modules.pruning.magnitude import prune_magnitude

    assert not torch.equal(prune_magnitude(W, None, _rate(0.5))[1], keep)


def test_sparsegpt_in_a_worker_thread_leaves_the_thread_count_alone(monkeypatch):
    """torch's thread count is the process's: SparseGPT's one-thread column sweep must not set
    it from a sweep's worker thread (the other members would run under it, and two such
    threads restoring out of order leave one thread for good). Same bytes either way."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(64, 256, generator=g), torch.randn(512, 256, generator=g)
    calls, real = [], torch.set_num_threads

    def spy(n):
        calls.append(threading.current_thread() is threading.main_thread())
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", spy)
    main = prune_sparsegpt(W, _stats_from_x(X), _rate(0.5))
    assert calls and all(calls)  # the main thread does set it
    calls.clear()
    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(prune_sparsegpt, W, _stats_from_x(X), _rate(0.5)).result()
    assert calls == []
    assert torch.equal(worker[0], main[0]) and torch.equal(worker[1], main[1])


def test_sparsegpt_obs_update_on_two_correlated_columns():
    # H = [[1, 1], [1, 4]] (T = 2, no damping). H^-1 = [[4, -1], [-1, 1]] / 3.
    # Scores: w0^2 / [H^-1]_00 = w0^2 * 3/4, w1^2 / U_11^2 = w1^2 * H_11 = 4 w1^2.
    # W = [1, 3]: 0.75 vs 36, prune column 0; OBS: w1 += w0 * H_01 / H_11 = 3 + 1/4.
    stats = _stats_from_gram(_t([[1.0, 1.0], [1.0, 4.0]]), tokens=2)
    Wp, keep = prune_sparsegpt(_t([[1.0, 3.0]]), stats, _rate(0.5), percdamp=0.0)
    assert torch.equal(keep, torch.tensor([[False, True]]))
    torch.testing.assert_close(Wp, _t([[0.0, 3.25]]), rtol=0, atol=1e-5)
    # The sign of the update follows the correlation: H_01 = -1 gives w1 = 3 - 1/4 (same
    # scores, H^-1 = [[4, 1], [1, 1]] / 3). No update (3), the wrong sign (2.75 for
    # H_01 = +1) or H_01 / H_00 (4) would miss one of the two values.
    anti = _stats_from_gram(_t([[1.0, -1.0], [-1.0, 4.0]]), tokens=2)
    Wn, keep_n = prune_sparsegpt(_t([[1.0, 3.0]]), anti, _rate(0.5), percdamp=0.0)
    assert torch.equal(keep_n, keep)
    torch.testing.assert_close(Wn, _t([[0.0, 2.75]]), rtol=0, atol=1e-5)
    # W = [3, 1]: 6.75 vs 4, prune column 1; an earlier column is never updated.
    Wp, keep = prune_sparsegpt(_t([[3.0, 1.0]]), stats, _rate(0.5), percdamp=0.0)
    assert torch.equal(keep, torch.tensor([[True, False]]))
    torch.testing.assert_close(Wp, _t([[3.0, 0.0]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("n", "expected_first_half"), [(4, 4), (2, 2)])
def test_sparsegpt_nm_with_m8_is_not_groups_of_4(n, expected_first_half):
    # Uncorrelated inputs, the 4 largest weights of every group of 8 in its first half:
    # 4:8 keeps the first half whole (2:4 hard-wiring would keep 2 + 2).
    g = torch.Generator().manual_seed(1)
    W = torch.rand(6, 16, generator=g) + 0.1
    W[:, 0:4] += 10
    W[:, 8:12] += 10
    stats = _stats_from_gram(torch.eye(16), tokens=2)
    Wp, keep = prune_sparsegpt(W, stats, _nm(n, 8))
    assert_valid(W, Wp, keep)
    assert_nm(keep, n, 8)
    first_half = keep.reshape(6, 2, 2, 4)[:, :, 0].sum(-1)
    assert bool((first_half == expected_first_half).all())
    torch.testing.assert_close(Wp, W * keep, rtol=0, atol=0)  # diagonal H: no update


def test_sparsegpt_ties_prune_the_exact_count():
    W = torch.ones(4, 8)
    Wp, keep = prune_sparsegpt(W, _stats_from_gram(torch.eye(8), tokens=2), _rate(0.5))
    assert int((~keep).sum()) == 16  # the reference's `<=` would prune all 32
    assert_valid(W, Wp, keep)


def _obs_reference(W, gram, tokens, spec, blocksize, percdamp=0.01):
    """SparseGPT written out plainly in fp64: one column at a time, and every pruned weight's
    error spread at once over *all* later columns (no lazy blocks, no sub-blocks).

    The mask groups are the method's: unstructured, the lowest ``w^2 / U_jj^2`` of each
    ``blocksize``-column block (exact count, ties by row-major order) chosen from the
    weights as they are when the sweep reaches the block; N:M, the ``M - N`` lowest of each
    group of M columns of a row, chosen when the sweep reaches the group.
    """
    H = gram.double() * (2.0 / tokens)
    W = W.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    d = U.diagonal()
    c_out, c_in = W.shape
    pruned = torch.zeros(c_out, c_in, dtype=torch.bool)
    for j in range(c_in):
        if not spec.is_nm and j % blocksize == 0:
            j2 = min(j + blocksize, c_in)
            score = (W[:, j:j2] ** 2 / d[j:j2] ** 2).reshape(-1)
            k = prune_count(score.numel(), spec.rate)
            flat = torch.zeros(score.numel(), dtype=torch.bool)
            flat[torch.sort(score, stable=True).indices[:k]] = True
            pruned[:, j:j2] = flat.reshape(c_out, j2 - j)
        if spec.is_nm and j % spec.m == 0:
            score = W[:, j : j + spec.m] ** 2 / d[j : j + spec.m] ** 2
            lowest = torch.sort(score, dim=1, stable=True).indices[:, : spec.m - spec.n]
            pruned[:, j : j + spec.m].scatter_(1, lowest, True)
        err = torch.where(pruned[:, j], W[:, j] / d[j], 0.0)
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    W[pruned] = 0.0
    return W, ~pruned


@pytest.mark.parametrize(
    ("spec", "blocksize", "sub_block"),
    [(_rate(0.5), 16, 32), (_rate(0.6), 16, 4), (_nm(2, 4), 16, 8), (_nm(4, 8), 24, 32)],
)
def test_sparsegpt_matches_a_plain_obs_sweep_over_several_blocks(monkeypatch, spec, blocksize, sub_block):
    # C_in = 3 x blocksize, correlated inputs: the later blocks only come out right when
    # the errors of the earlier blocks reach them (the lazy block update), and inside a
    # block when the sub-block products run (SUB_BLOCK < blocksize in two cases).
    import modules.pruning.sparsegpt as sparsegpt

    monkeypatch.setattr(sparsegpt, "SUB_BLOCK", sub_block)
    W, X = _layer(c_out=12, c_in=3 * blocksize, tokens=1024, seed=11)
    X[:, 5] = 0  # one dead input
    stats = _stats_from_x(X)
    Wp, keep = prune_sparsegpt(W, stats, spec, blocksize=blocksize)
    W_ref, keep_ref = _obs_reference(W, stats.gram, stats.tokens, spec, blocksize)
    assert torch.equal(keep, keep_ref)
    torch.testing.assert_close(Wp.double(), W_ref, rtol=1e-4, atol=1e-4)
    # the updates are large here: the weights moved well beyond the tolerance
    assert float((W_ref - W.double() * keep_ref).abs().max()) > 0.1


# ----------------------------------------------------------------------------- SparseGPT invariants


@pytest.mark.parametrize("spec", [_rate(0.5), _rate(0.3), _nm(2, 4), _nm(4, 8), _nm(2, 8)])
def test_sparsegpt_invariants(spec):
    W, X = _layer(c_out=24, c_in=80)
    stats = _stats_from_x(X)
    W0 = W.clone()
    Wp, keep = prune_sparsegpt(W, stats, spec, blocksize=32)
    assert torch.equal(W, W0)  # not modified in place
    assert_valid(W, Wp, keep)
    if spec.is_nm:
        assert_nm(keep, spec.n, spec.m)
    else:  # exact count per column block (32, 32, 16 columns)
        for i1, i2 in ((0, 32), (32, 64), (64, 80)):
            assert int((~keep[:, i1:i2]).sum()) == prune_count(24 * (i2 - i1), spec.rate)
    Wp2, keep2 = prune_sparsegpt(W, stats, spec, blocksize=32)
    assert torch.equal(Wp, Wp2) and torch.equal(keep, keep2)


def test_sparsegpt_dead_inputs():
    W, X = _layer(c_out=8, c_in=32)
    X[:, [3, 17]] = 0
    Wp, keep = prune_sparsegpt(W, _stats_from_x(X), _rate(0.5))
    assert_valid(W, Wp, keep)
    assert bool((Wp[:, [3, 17]] == 0).all())


def test_sparsegpt_cholesky_retry_logs_and_stays_finite(caplog):
    # unit diagonal, off-diagonal -0.1 over 16 inputs: smallest eigenvalue 1 - 15 * 0.1 = -0.5;
    # damping 0.01 fails, 0.1 fails, 1.0 succeeds
    gram = torch.full((16, 16), -0.1).fill_diagonal_(1.0)
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="topiary"):
        Wp, keep = prune_sparsegpt(W, _stats_from_gram(gram), _rate(0.5))
    assert_valid(W, Wp, keep)
    retries = [r for r in caplog.records if "Cholesky failed" in r.getMessage()]
    assert len(retries) == 2 and all(r.name == "topiary" for r in retries)


def test_sparsegpt_hopeless_matrix_raises():
    with pytest.raises(CholeskyError, match="sparsegpt.*not positive-definite"):
        prune_sparsegpt(torch.ones(2, 4), _stats_from_gram(-torch.eye(4)), _rate(0.5))
    assert issubclass(CholeskyError, TopiaryError)


def test_sparsegpt_bad_stats_are_clear_errors():
    W, X = _layer(c_out=4, c_in=8)
    stats = _stats_from_x(X)
    stats.gram[2, 3] = float("nan")
    with pytest.raises(TopiaryError, match="stats.gram.*NaN"):
        prune_sparsegpt(W, stats, _rate(0.5))
    with pytest.raises(ValueError, match="stats.gram is missing"):
        prune_sparsegpt(W, LayerStats(8, X.pow(2).sum(0)), _rate(0.5))
    with pytest.raises(SpecError, match="M=8 does not divide the input width 12"):
        prune_sparsegpt(torch.ones(2, 12), _stats_from_gram(torch.eye(12)), _nm(2, 8))


# ----------------------------------------------------------------------------- ADMM oracles


def _masked_least_squares(W, gram, keep, lam):
    """Closed-form fixed point of ADMM: per row, min (z - w)^T G_lam (z - w) over z on the mask
    (normalised space), i.e. z_K = w_K + G_lam[K, K]^-1 G_lam[K, P] w_P."""
    d = gram.diagonal().sqrt() + 1e-8
    G = (gram / d[:, None] / d[None, :]).double()
    G += lam * G.diagonal().mean() * torch.eye(len(d), dtype=G.dtype)
    Wn = (W * d).double()
    out = torch.zeros_like(Wn)
    for r in range(W.shape[0]):
        K, P = keep[r], ~keep[r]
        out[r, K] = Wn[r, K] + torch.linalg.solve(G[K][:, K], G[K][:, P] @ Wn[r, P])
    return (out / d).float()


def test_admm_converges_to_the_damped_masked_least_squares():
    W, X = _layer(c_out=4, c_in=12, tokens=64)
    stats = _stats_from_x(X)
    keep = prune_wanda(W, stats, _rate(0.5))[1]
    Wp, k = prune_admm(W, stats, _rate(0.5), mask=keep, iters=400)
    assert torch.equal(k, keep)
    expected = _masked_least_squares(W, stats.gram, keep, lam=0.1)
    torch.testing.assert_close(Wp, expected, rtol=1e-3, atol=1e-3)
    # wrong variant: damping after forming B (the fixed point is then undamped)
    wrong = _masked_least_squares(W, stats.gram, keep, lam=0.0)
    assert float((wrong - expected).abs().max()) > 0.05


def _plain_admm(W, gram, iters, keep=None, ks=0, rate=0.0, lam=0.1, rho=1.0):
    """ALGORITHMS.md's steps written out literally in fp64: explicit B, one solve per
    iteration, per-row gradual selection by a stable sort. The fast loop must match it."""
    d = gram.double().diagonal().sqrt() + 1e-8
    G = gram.double() / d[:, None] / d[None, :]
    Wn = W.double() * d
    G += lam * G.diagonal().mean() * torch.eye(len(d), dtype=G.dtype)
    B = G @ Wn.T
    G += rho * torch.eye(len(d), dtype=G.dtype)
    U = torch.zeros_like(Wn)
    for t in range(1, iters + 1):
        if t <= ks:
            s_t = rate - rate * (1 - t / ks) ** 3
            order = (Wn + U).abs().argsort(dim=1, stable=True)
            keep = torch.ones_like(Wn, dtype=torch.bool)
            keep.scatter_(1, order[:, : int(W.shape[1] * s_t)], False)
        Z = (Wn + U) * keep
        U = U + Wn - Z
        Wn = torch.linalg.solve(G, B + rho * (Z - U).T).T
    return ((Wn + U) * keep / d).float(), keep


def test_admm_iterates_match_the_plain_algorithm():
    W, X = _layer(c_out=12, c_in=32, seed=5)
    stats = _stats_from_x(X)
    keep = prune_wanda(W, stats, _rate(0.5))[1]
    for iters in (1, 2, 7):
        Wp, _ = prune_admm(W, stats, _rate(0.5), mask=keep, iters=iters, precision="fp32")
        torch.testing.assert_close(Wp, _plain_admm(W, stats.gram, iters, keep=keep)[0], rtol=1e-4, atol=1e-5)
    Wp, k = prune_admm_grad(W, stats, _rate(0.6), iters=9, ks=6, precision="fp32")
    expected, expected_keep = _plain_admm(W, stats.gram, 9, ks=6, rate=0.6)
    assert torch.equal(k, expected_keep)
    torch.testing.assert_close(Wp, expected, rtol=1e-4, atol=1e-5)
    # the tolerance tells iterations apart: an off-by-one in the loop would fail
    W7 = prune_admm(W, stats, _rate(0.5), mask=keep, iters=7, precision="fp32")[0]
    assert not torch.allclose(W7, _plain_admm(W, stats.gram, 6, keep=keep)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group", ["row", "matrix"])
def test_admm_row_chunks_give_the_same_result(monkeypatch, group):
    W, X = _layer(c_out=24, c_in=32, seed=7)
    stats = _stats_from_x(X)
    whole, keep = prune_admm_grad(W, stats, _rate(0.5), iters=8, ks=5, group=group, precision="fp32")
    monkeypatch.setattr(admm, "CHUNK_ROWS", 5)  # the last chunk is short
    chunked, keep_c = prune_admm_grad(W, stats, _rate(0.5), iters=8, ks=5, group=group, precision="fp32")
    assert torch.equal(keep, keep_c)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_admm_mixed_precision_matches_fp32():
    W, X = _layer(c_out=64, c_in=256, tokens=2048, seed=6)
    stats = _stats_from_x(X)
    keep = prune_wanda(W, stats, _rate(0.5))[1]
    for fn, kw in ((prune_admm, {"mask": keep}), (prune_admm_grad, {})):
        W32, k32 = fn(W, stats, _rate(0.5), precision="fp32", **kw)
        Wmx, kmx = fn(W, stats, _rate(0.5), precision="mixed", **kw)
        assert not torch.equal(W32, Wmx)  # the bf16 products did run
        assert float((kmx != k32).float().mean()) < 0.01
        e32, emx = _rel_err(X, W, W32), _rel_err(X, W, Wmx)
        assert abs(emx - e32) < 1e-3 * e32  # the same reconstruction (2e-5 here)
        if fn is prune_admm:  # fixed mask: the same weights up to bf16-level differences
            torch.testing.assert_close(Wmx, W32, rtol=0, atol=1e-2)  # 4e-3 here; weights ~1
    with pytest.raises(SpecError, match='precision: "half" is not one of auto, fp32, mixed'):
        prune_admm_grad(W, stats, _rate(0.5), precision="half")


def test_admm_grad_schedule_values():
    s, ks = 0.5, 15
    values = [grad_sparsity(s, t, ks) for t in range(1, ks + 1)]
    assert values[0] == pytest.approx(0.5 - 0.5 * (14 / 15) ** 3)
    assert values[-1] == s and all(a < b for a, b in zip(values, values[1:], strict=False))
    assert grad_sparsity(s, 20, ks) == s


@pytest.mark.parametrize("group", ["row", "matrix"])
def test_admm_grad_prunes_the_scheduled_count_at_every_step(monkeypatch, group):
    W, X = _layer(c_out=8, c_in=40)
    seen = []
    original = admm.grad_keep

    def spy(scores, spec, t, ks, group):
        keep = original(scores, spec, t, ks, group)
        seen.append((t, keep))
        return keep

    monkeypatch.setattr(admm, "grad_keep", spy)
    Wp, keep = prune_admm_grad(W, _stats_from_x(X), _rate(0.5), iters=8, ks=6, group=group)
    assert [t for t, _ in seen] == [1, 2, 3, 4, 5, 6]
    for t, k in seen:
        s_t = 0.5 - 0.5 * (1 - t / 6) ** 3  # written out: not the function under test
        if group == "row":
            assert bool(((~k).sum(1) == prune_count(40, s_t)).all())
        else:
            assert int((~k).sum()) == prune_count(320, s_t)
    assert torch.equal(keep, seen[-1][1])
    assert_valid(W, Wp, keep)


def test_admm_grad_schedule_differs_from_final_sparsity_every_step():
    # The reference's default branch selects at the final sparsity every step.
    W, X = _layer(c_out=16, c_in=48, seed=3)
    stats = _stats_from_x(X)
    Wp, keep = prune_admm_grad(W, stats, _rate(0.6), iters=10, ks=8)

    def final_every_step(scores, k):
        return grad_keep(scores, _rate(0.6), 8, 8, "row")

    Wf, keep_f = admm_update(
        W, stats.gram, None, 10, 0.1, 1.0, final_every_step, reselect_steps=8, rowwise=True
    )
    assert not torch.equal(keep, keep_f)
    assert float((Wp - Wf).abs().max()) > 1e-3


@pytest.mark.parametrize(("n", "expected_first_half"), [(4, 4), (2, 2)])
def test_admm_grad_nm_with_m8(n, expected_first_half):
    g = torch.Generator().manual_seed(2)
    W = torch.rand(6, 16, generator=g) + 0.1
    W[:, 0:4] += 10
    W[:, 8:12] += 10
    # 40 iterations: 25 on the final mask, so that ADMM has converged for the last check
    Wp, keep = prune_admm_grad(W, _stats_from_gram(torch.eye(16)), _nm(n, 8), iters=40)
    assert_valid(W, Wp, keep)
    assert_nm(keep, n, 8)
    assert bool((keep.reshape(6, 2, 2, 4)[:, :, 0].sum(-1) == expected_first_half).all())
    # uncorrelated inputs: the best weights on the mask are the dense ones
    torch.testing.assert_close(Wp, W * keep, rtol=1e-4, atol=1e-4)


def test_admm_grad_nm_schedule_stays_on_top_of_nm(monkeypatch):
    W, X = _layer(c_out=8, c_in=32)
    seen = []
    original = admm.grad_keep
    monkeypatch.setattr(admm, "grad_keep", lambda *a: seen.append(original(*a)) or seen[-1])
    _, keep = prune_admm_grad(W, _stats_from_x(X), _nm(2, 8), iters=6, ks=5)
    for t, k in enumerate(seen, start=1):
        pruned_per_group = (~k).reshape(8, -1, 8).sum(-1)
        assert bool((pruned_per_group <= 6).all())  # never beyond the N:M candidates
        assert bool(((~k).sum(1) == prune_count(32, 0.75 - 0.75 * (1 - t / 5) ** 3)).all())
    assert_nm(keep, 2, 8)


def test_admm_ties_prune_the_exact_count():
    W = torch.ones(4, 16)
    stats = _stats_from_gram(torch.eye(16))
    for group in ("row", "matrix"):
        Wp, keep = prune_admm_grad(W, stats, _rate(0.5), group=group)
        assert int((~keep).sum()) == 32
        if group == "row":
            assert bool(((~keep).sum(1) == 8).all())
        assert_valid(W, Wp, keep)


# ----------------------------------------------------------------------------- ADMM invariants


@pytest.mark.parametrize("spec", [_rate(0.5), _rate(0.7), _nm(2, 4), _nm(4, 8)])
@pytest.mark.parametrize("group", ["row", "matrix"])
def test_admm_grad_invariants(spec, group):
    W, X = _layer(c_out=16, c_in=48)
    stats = _stats_from_x(X)
    W0, G0 = W.clone(), stats.gram.clone()
    Wp, keep = prune_admm_grad(W, stats, spec, group=group)
    assert torch.equal(W, W0) and torch.equal(stats.gram, G0)
    assert_valid(W, Wp, keep)
    if spec.is_nm:
        assert_nm(keep, spec.n, spec.m)
    elif group == "row":
        assert bool(((~keep).sum(1) == prune_count(48, spec.rate)).all())
    else:
        assert int((~keep).sum()) == prune_count(W.numel(), spec.rate)
    Wp2, keep2 = prune_admm_grad(W, stats, spec, group=group)
    assert torch.equal(Wp, Wp2) and torch.equal(keep, keep2)


@pytest.mark.parametrize("selector", ["magnitude", "wanda", "sparsegpt"])
def test_admm_uses_the_selectors_mask(selector):
    from modules.pruning.magnitude import prune_magnitude

    W, X = _layer(c_out=8, c_in=32)
    stats = _stats_from_x(X)
    fn = {"magnitude": prune_magnitude, "wanda": prune_wanda, "sparsegpt": prune_sparsegpt}[selector]
    Wp, keep = ADMM.run(W, stats, _rate(0.5), selector=selector)
    assert torch.equal(keep, fn(W, stats, _rate(0.5))[1])
    assert_valid(W, Wp, keep)


def test_admm_gblm_selector_and_user_mask():
    W, X = _layer(c_out=8, c_in=32)
    stats = _stats_from_x(X)
    grad = torch.rand_like(W)
    with_grad = LayerStats(stats.tokens, stats.sq_norm, stats.gram, grad)
    from modules.pruning.gblm import prune_gblm

    _, keep = ADMM.run(W, with_grad, _rate(0.5), selector="gblm")
    assert torch.equal(keep, prune_gblm(W, with_grad, _rate(0.5))[1])
    mask = torch.rand(8, 32, generator=torch.Generator().manual_seed(5)) > 0.3
    Wp, keep = ADMM.run(W, stats, _rate(0.5), selector="mask", mask=mask)
    assert torch.equal(keep, mask)
    assert_valid(W, Wp, keep)


def test_admm_dead_inputs_and_retry(caplog):
    W, X = _layer(c_out=8, c_in=32)
    X[:, [0, 9]] = 0
    Wp, keep = prune_admm_grad(W, _stats_from_x(X), _rate(0.5))
    assert_valid(W, Wp, keep)
    # unit diagonal, off-diagonal -0.2 over 16 inputs: smallest eigenvalue 1 - 3 = -2 < -1.1
    gram = torch.full((16, 16), -0.2).fill_diagonal_(1.0)
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="topiary"):
        Wp, keep = ADMM.run(W, _stats_from_gram(gram), _rate(0.5))
    assert_valid(W, Wp, keep)
    assert any("admm" in r.getMessage() and "Cholesky failed" in r.getMessage() for r in caplog.records)


def test_admm_errors_name_the_option():
    W, X = _layer(c_out=4, c_in=8)
    stats = _stats_from_x(X)
    with pytest.raises(TopiaryError, match="selector: 'nope' is not one of magnitude, wanda"):
        ADMM.run(W, stats, _rate(0.5), selector="nope")
    with pytest.raises(TopiaryError, match='selector: "mask" needs'):
        ADMM.run(W, stats, _rate(0.5), selector="mask")
    with pytest.raises(TopiaryError, match="admm: needs a keep-mask"):
        prune_admm(W, stats, _rate(0.5))
    with pytest.raises(TopiaryError, match="mask: shape"):
        prune_admm(W, stats, _rate(0.5), mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(SpecError, match="ks=25 must be within"):
        prune_admm_grad(W, stats, _rate(0.5), ks=25)
    with pytest.raises(SpecError, match="rho"):
        prune_admm_grad(W, stats, _rate(0.5), rho=0.0)
    with pytest.raises(SpecError, match='group: "column"'):
        prune_admm_grad(W, stats, _rate(0.5), group="column")
    stats.gram[0, 0] = float("inf")
    with pytest.raises(TopiaryError, match="admm-grad: stats.gram"):
        prune_admm_grad(W, stats, _rate(0.5))


# ----------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("spec", [_rate(0.5), _nm(2, 4)])
def test_weight_updates_reconstruct_better_than_the_mask_alone(spec):
    W, X = _layer(c_out=48, c_in=96, tokens=768, seed=7)
    stats = _stats_from_x(X)
    wanda = _rel_err(X, W, prune_wanda(W, stats, spec)[0])
    sparsegpt = _rel_err(X, W, prune_sparsegpt(W, stats, spec)[0])
    admm1 = _rel_err(X, W, ADMM.run(W, stats, spec)[0])
    admm_grad = _rel_err(X, W, prune_admm_grad(W, stats, spec)[0])
    assert sparsegpt < wanda
    assert admm1 < wanda
    assert admm_grad <= admm1


@pytest.mark.parametrize("name", ["admm", "admm-grad"])
def test_scratch_statistics_are_normalised_in_place_to_the_same_result(name):
    """``LayerStats.scratch`` (a streamed stage's own copy): ADMM normalises the Gram matrix in
    its place, one C_in x C_in buffer less, and gives bit for bit the same weights and mask."""
    from dataclasses import replace

    W, X = _layer(seed=7)
    stats = _stats_from_x(X)
    options = {"iters": 4} | ({"ks": 3} if name == "admm-grad" else {"selector": "wanda"})
    method = get_method(name)
    expected = method.run(W, stats, _rate(0.5), **options)
    gram = stats.gram.clone()
    assert torch.equal(stats.gram, gram), "a shared Gram matrix was modified"
    got = method.run(W, replace(stats, gram=gram, scratch=True), _rate(0.5), **options)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(gram, stats.gram), "scratch=True made a copy anyway"
