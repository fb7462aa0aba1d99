"""Wanda: prune by ``|W_ij| * ||X_j||_2`` within each output row (Sun et al., 2023).

Also the paper's appendix variant (``alpha_search=True``): per row, prune the weights
whose cumulative sorted score stays within ``alpha * row_sum``, with ``alpha`` found
by bisection so that the whole matrix reaches the target sparsity.
"""

from __future__ import annotations

import logging

import torch

from modules.pruning.numerics import check_layer
from modules.pruning.sparsity import SparsitySpec, SpecError, abs_scores, keep_mask
from modules.pruning.stats import LayerStats

log = logging.getLogger(__name__)

ALPHA_RANGE = (0.0, 0.8)
ALPHA_START = 0.4
ALPHA_TOL = 0.001
ALPHA_BRACKET = 1e-6  # the reference stops at 0.001, too coarse where alpha is small


def wanda_scores(W: torch.Tensor, sq_norm: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``|W_ij| * sqrt(sq_norm_j)`` in fp32.

    Args:
        W: Weight ``(C_out, C_in)``.
        sq_norm: ``sum_t X[t, j]^2`` per input ``j`` (fp32); the root is taken here.
            Any constant factor (a mean over samples or tokens) leaves the per-row
            ranking unchanged. A dead input (``0``) scores ``0`` and is pruned first.
        overwrite: Compute the scores in ``W``'s own memory (an fp32 ``W`` the caller
            no longer needs); otherwise in one new weight-sized buffer.
    """
    scores = abs_scores(W, overwrite)
    return scores.mul_(sq_norm.float().sqrt().unsqueeze(0))


def alpha_keep(scores: torch.Tensor, target: float) -> tuple[torch.Tensor, float, float]:
    """Keep-mask of the Wanda variant for a target sparsity, by bisection on ``alpha``.

    Per row, sort the scores ascending (stable) and prune the prefix whose cumulative
    sum is ``<= alpha * row_sum``. ``alpha`` starts at 0.4 in ``[0, 0.8]`` and is
    bisected (as in the Wanda repository) until the achieved sparsity of the matrix is
    within 0.001 of ``target``. The repository also stops once the bracket is narrower
    than 0.001, which misses the target when the answer is a small alpha (30% of the
    weights may hold only 4% of the score mass); here the bracket may shrink to 1e-6,
    and a warning is logged if the target is still missed (a matrix too small to hit it).
    Also unlike the repository, the prune count per row is exact: ties at the threshold
    are not pruned in bulk, and a row with nothing under the threshold keeps everything.

    Args:
        scores: Non-negative ``(C_out, C_in)`` scores.
        target: Fraction of the matrix to prune.

    Returns:
        ``(keep, alpha, achieved)``: the mask, the final ``alpha`` and its sparsity.
    """
    scores = scores.float()
    sorted_scores, order = torch.sort(scores, dim=-1, stable=True)
    cum = torch.cumsum(sorted_scores.double(), dim=-1)
    row_sum = cum[:, -1:]

    def counts(a: float) -> torch.Tensor:
        return (cum <= a * row_sum).sum(dim=-1)

    lo, hi = ALPHA_RANGE
    alpha = ALPHA_START
    n = counts(alpha)
    achieved = float(n.sum()) / scores.numel()
    while abs(achieved - target) > ALPHA_TOL and hi - lo >= ALPHA_BRACKET:
        if achieved > target:
            alpha, hi = (alpha + lo) / 2.0, alpha
        else:
            alpha, lo = (alpha + hi) / 2.0, alpha
        n = counts(alpha)
        achieved = float(n.sum()) / scores.numel()
    if abs(achieved - target) > ALPHA_TOL:
        log.warning(
            "wanda alpha search: sparsity %.6f at alpha %.4f, target %.4f not reached within %.3f",
            achieved,
            alpha,
            target,
            ALPHA_TOL,
        )
    pruned_sorted = torch.arange(scores.shape[-1], device=scores.device).unsqueeze(0) < n.unsqueeze(1)
    keep = torch.empty_like(pruned_sorted).scatter_(-1, order, ~pruned_sorted)
    return keep, alpha, achieved


def prune_wanda(
    W: torch.Tensor, stats: LayerStats, spec: SparsitySpec, alpha_search: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda pruning of one linear: ``W`` off :func:`wanda_keep`'s mask.

    Returns:
        ``(W_pruned, keep)``: a new tensor, exactly zero off ``keep``, and the mask.
    """
    keep = wanda_keep(W, stats, spec, alpha_search)
    return W.masked_fill(~keep, 0), keep


def wanda_keep(
    W: torch.Tensor,
    stats: LayerStats,
    spec: SparsitySpec,
    alpha_search: bool = False,
    *,
    overwrite: bool = False,
) -> torch.Tensor:
    """Wanda's keep-mask of one linear.

    Unstructured: prune the ``floor(C_in * s)`` lowest scores of every output row
    (stable sort: on ties the earlier input is pruned). N:M: prune the ``M - N`` lowest of
    every M consecutive inputs of a row. ``alpha_search=True`` uses the appendix variant
    (:func:`alpha_keep`; unstructured only).

    Args:
        W: Weight ``(C_out, C_in)``, fp32.
        stats: Needs ``stats.sq_norm`` (``sum_t X[t, j]^2``, shape ``(C_in,)``).
        spec: Unstructured rate or N:M pattern.
        alpha_search: Use the per-row cumulative-score variant.
        overwrite: The scores may take ``W``'s memory (``W`` is then lost; the masks stage).

    Returns:
        The boolean keep-mask.
    """
    check_layer("wanda", W, stats.sq_norm)
    scores = wanda_scores(W, stats.sq_norm, overwrite)
    if alpha_search:
        if spec.is_nm:
            raise SpecError(
                f"wanda: alpha_search needs an unstructured sparsity, not pattern {spec}; "
                "drop alpha_search or give a rate"
            )
        keep, _, _ = alpha_keep(scores, spec.rate)
    else:
        keep = keep_mask(scores, spec, group="row")
    return keep
