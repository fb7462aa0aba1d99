"""SparseGPT: OBS-style mask selection and weight update in column blocks (Frantar & Alistarh, 2023).

With ``H = (2/T) X^T X`` (dampened) and ``U`` the upper Cholesky factor of ``H^-1``,
the columns of ``W`` are swept left to right. Pruning column ``j`` of a row costs
``w_j^2 / U_jj^2``; its error ``e_j = w_j / U_jj`` is spread over the later columns
with row ``j`` of ``U``. Inside a block of columns the updates are applied at once per
column; the later blocks get one matrix product per block ("lazy batch" update).

The damped Cholesky and the thread helpers it shares with ADMM live in
:mod:`modules.pruning.numerics`.
"""

from __future__ import annotations

import logging

import torch

from modules.pruning.numerics import check_gram, damped_cholesky, num_threads
from modules.pruning.sparsity import (
    SparsitySpec,
    SpecError,
    lowest_mask,
    nm_lowest,
    prune_count,
)
from modules.pruning.stats import LayerStats

log = logging.getLogger("topiary")

SUB_BLOCK = 32  # columns updated one by one before a matrix product (two-level lazy update)


def _upper_inverse_factor(
    gram: torch.Tensor, tokens: int, percdamp: float, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: ``U`` upper with ``H^-1 = U^T U`` for the dampened ``H = (2/T) X^T X``.

    Uses ``P H P = L L^T`` with ``P`` the reversal permutation; then
    ``U = P L^-1 P`` is upper triangular and ``U^T U = H^-1``. One Cholesky and one
    triangular inverse, instead of the reference's Cholesky, full inverse and second
    Cholesky. ``dead`` marks inputs with ``H_jj == 0`` (their diagonal is set to 1).
    """
    H = gram.flip(0, 1)  # a copy; the caller's statistics stay untouched
    H.mul_(2.0 / tokens)
    diag = H.diagonal()
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    L = damped_cholesky(H, percdamp * float(diag.mean()), what)
    del H
    eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False, left=False, out=eye)
    del L
    return Linv.flip(0, 1), dead.flip(0)


def range_problems(blocksize: int | None, percdamp: float | None) -> list[str]:
    """Every out-of-range option, one message each (checked when the config loads, and here);
    None is not checked."""
    problems = []
    if blocksize is not None and blocksize < 1:
        problems.append(f"blocksize={blocksize} must be >= 1 (columns per lazy-update block; 128 by default)")
    if percdamp is not None and percdamp < 0:
        problems.append(
            f"percdamp={percdamp} must be >= 0 (damping as a fraction of the mean diagonal; 0.01)"
        )
    return problems


def _nm_block_size(blocksize: int, spec: SparsitySpec) -> tuple[int, int]:
    """Block and sub-block sizes; for N:M both are multiples of M so groups never straddle."""
    m = spec.m if spec.is_nm else 1
    block = max(m, blocksize // m * m)
    sub = min(block, max(m, SUB_BLOCK // m * m))
    return block, sub


@torch.no_grad()
def prune_sparsegpt(
    W: torch.Tensor,
    stats: LayerStats,
    spec: SparsitySpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT mask selection and OBS weight update of one linear.

    Steps: ``H = (2/T) gram``; dead inputs (``H_jj == 0``) get ``H_jj = 1`` and a zero
    column; ``H += percdamp * mean(diag H) * I`` (raised ten-fold on Cholesky failure,
    with a warning); ``U`` = upper Cholesky factor of ``H^-1``. Columns are swept in
    blocks of ``blocksize``:

    - unstructured: at the start of each block, prune exactly
      ``floor(C_out * block_width * rate)`` weights of the block with the lowest
      ``w^2 / U_jj^2`` over the whole block (the reference code's comparison group; its
      ``<=`` threshold prunes one more plus ties, this prunes the exact count; ties
      prune the earlier weight in row-major order);
    - N:M: at every M-th column, prune the ``M - N`` lowest ``w^2 / U_jj^2`` of the next
      M columns of each row, from the weights already updated by the earlier columns
      (``blocksize`` is rounded down to a multiple of M).

    Each pruned weight's error ``w_j / U_jj`` is spread over the later columns with row
    ``j`` of ``U``: column by column inside sub-blocks of 32 columns, by one matrix
    product for the rest of the block, and by one product for all later blocks.

    Args:
        W: Weight ``(C_out, C_in)``, fp32; not modified.
        stats: Needs ``stats.gram`` (``X^T X`` summed over ``stats.tokens`` tokens).
        spec: Unstructured rate or N:M pattern.
        blocksize: Columns per lazy-update block (128 as in the paper).
        percdamp: Damping as a fraction of the mean diagonal of ``H``.

    Returns:
        ``(W_pruned, keep)``: a new tensor, exactly zero off ``keep``, and the mask.

    Raises:
        CholeskyError: ``H`` stays indefinite even after the damping retries.
    """
    gram = check_gram("sparsegpt", W, stats)
    problems = range_problems(blocksize, percdamp)
    if problems:
        raise SpecError("; ".join(problems))
    c_out, c_in = W.shape
    if spec.is_nm:
        spec.check_width(c_in)
    block, sub = _nm_block_size(blocksize, spec)
    U, dead = _upper_inverse_factor(gram.float(), stats.tokens, percdamp, "sparsegpt: H = (2/T) X^T X")

    WT = W.float().t().contiguous()  # (C_in, C_out): a column of W is a contiguous row here
    WT[dead] = 0
    pruned = torch.zeros(c_in, c_out, dtype=torch.bool, device=W.device)
    err = torch.empty(block, c_out, dtype=WT.dtype, device=W.device)
    threads = torch.get_num_threads()
    with num_threads(1):  # tiny per-column ops on one thread; the products inside use all
        _sweep_blocks(WT, U, pruned, err, spec, block, sub, threads)
    del U, err
    return WT.t().contiguous(), ~pruned.t().contiguous()


def _sweep_blocks(
    WT: torch.Tensor,
    U: torch.Tensor,
    pruned: torch.Tensor,
    err: torch.Tensor,
    spec: SparsitySpec,
    block: int,
    sub: int,
    threads: int,
) -> None:
    """The column sweep of :func:`prune_sparsegpt`, in place on ``WT`` and ``pruned``."""
    c_in, c_out = WT.shape
    for i1 in range(0, c_in, block):
        i2 = min(i1 + block, c_in)
        W1, U1, P1, E1 = WT[i1:i2], U[i1:i2, i1:i2], pruned[i1:i2], err[: i2 - i1]
        dinv = U1.diagonal().reciprocal().unsqueeze(1)
        if not spec.is_nm:
            score = (W1.abs() * dinv).t().reshape(-1)  # row-major order of W's block
            k = prune_count(score.numel(), spec.rate)
            P1.copy_(lowest_mask(score, k).reshape(c_out, i2 - i1).t())
        scale = P1 * dinv  # error = w / U_jj on pruned weights, 0 on kept ones
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            _sweep_columns(W1, U1, P1, E1, dinv, scale, j1, j2, spec)
            if j2 < i2 - i1:
                with num_threads(threads):
                    W1[j2:].addmm_(U1[j1:j2, j2:].t(), E1[j1:j2], alpha=-1)
        W1.masked_fill_(P1, 0)
        if i2 < c_in:
            with num_threads(threads):
                WT[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)


def _sweep_columns(
    W1: torch.Tensor,
    U1: torch.Tensor,
    P1: torch.Tensor,
    E1: torch.Tensor,
    dinv: torch.Tensor,
    scale: torch.Tensor,
    j1: int,
    j2: int,
    spec: SparsitySpec,
) -> None:
    """Columns ``j1..j2-1`` of a block, one by one (transposed layout: a column is a row).

    Decides the N:M groups that start here, writes each column's error ``w / U_jj`` (zero
    where kept) into ``E1`` and spreads it over the rest of the sub-block.
    """
    for i in range(j1, j2):
        if spec.is_nm and i % spec.m == 0:
            group = W1[i : i + spec.m].abs() * dinv[i : i + spec.m]
            P1[i : i + spec.m] = nm_lowest(group.t(), spec.n, spec.m).t()
            torch.mul(P1[i : i + spec.m], dinv[i : i + spec.m], out=scale[i : i + spec.m])
        torch.mul(W1[i], scale[i], out=E1[i])
        if i + 1 < j2:
            # rank-1 update; addcmul_ is far faster than addr_ on CPU
            W1[i + 1 : j2].addcmul_(U1[i, i + 1 : j2].unsqueeze(1), E1[i], value=-1)
