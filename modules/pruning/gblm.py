"""GBLM-Pruner: prune by ``|W| * G + |W| * ||X_j||_2`` within each output row (Das et al., 2023).

``G`` is the "l2" gradient aggregate ``sqrt(sum_k (100 g_k)^2)`` over the calibration
samples, computed by the gradient step of the pipeline (one dense forward+backward per
sample) and passed here as ``stats.grad``. This module only scores and selects.
"""

from __future__ import annotations

import torch

from modules.pruning.numerics import check_layer
from modules.pruning.sparsity import SparsitySpec, abs_scores, check_finite, keep_mask
from modules.pruning.stats import LayerStats


def gblm_scores(
    W: torch.Tensor, sq_norm: torch.Tensor, grad: torch.Tensor, nsamples: int = 1, overwrite: bool = False
) -> torch.Tensor:
    """``|W| * grad + |W| * sqrt(sq_norm / nsamples)`` in fp32.

    Args:
        W: Weight ``(C_out, C_in)``.
        sq_norm: ``sum_t X[t, j]^2`` per input ``j``, shape ``(C_in,)``.
        grad: ``sqrt(sum_k (100 g_k)^2)`` per weight, shape of ``W`` (already scaled by 100).
        nsamples: Divisor of ``sq_norm``. Unlike Wanda's, GBLM's ranking depends on the
            scale of the activation term relative to the gradient term. The reference
            code's activation term is ``sqrt(sum_t x^2 / nsamples)`` (nsamples = number of
            calibration sequences, its ``scaler_row``), while ``G`` is a plain sum over
            samples; pass the number of calibration sequences to match it. The default 1
            uses ``sq_norm`` as given.
        overwrite: Compute the scores in ``W``'s own memory (an fp32 ``W`` the caller no
            longer needs). The same values: the two products are summed in either order.
    """
    Wa = abs_scores(W, overwrite)
    by_grad = Wa * grad.float()
    return Wa.mul_((sq_norm.float() / nsamples).sqrt().unsqueeze(0)).add_(by_grad)


def prune_gblm(
    W: torch.Tensor, stats: LayerStats, spec: SparsitySpec, nsamples: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """GBLM-Pruner on one linear: ``W`` off :func:`gblm_keep`'s mask.

    Returns:
        ``(W_pruned, keep)``: a new tensor, exactly zero off ``keep``, and the mask.
    """
    keep = gblm_keep(W, stats, spec, nsamples)
    return W.masked_fill(~keep, 0), keep


def gblm_keep(
    W: torch.Tensor, stats: LayerStats, spec: SparsitySpec, nsamples: int = 1, *, overwrite: bool = False
) -> torch.Tensor:
    """GBLM-Pruner's keep-mask of one linear.

    Unstructured: prune the ``floor(C_in * s)`` lowest scores of every output row (stable
    sort). N:M: prune the ``M - N`` lowest of every M consecutive inputs of a row.

    Args:
        W: Weight ``(C_out, C_in)``, fp32.
        stats: Needs ``stats.sq_norm`` and ``stats.grad`` (the l2 gradient aggregate,
            shape of ``W``).
        spec: Unstructured rate or N:M pattern.
        nsamples: See :func:`gblm_scores`.
        overwrite: The scores may take ``W``'s memory (``W`` is then lost; the masks stage).

    Returns:
        The boolean keep-mask.
    """
    check_layer("gblm", W, stats.sq_norm)
    grad = stats.grad
    if grad is None:
        raise ValueError(
            "gblm: stats.grad is missing; the gradient step (a dense forward+backward per "
            "calibration sample, giving sqrt(sum_k (100 g_k)^2) per weight) must run before pruning"
        )
    if grad.shape != W.shape:
        raise ValueError(f"gblm: stats.grad has shape {tuple(grad.shape)}, expected W's {tuple(W.shape)}")
    check_finite("stats.grad", grad)
    if bool((grad < 0).any()):
        raise ValueError(
            "gblm: stats.grad has negative entries; it must be the l2 aggregate sqrt(sum (100 g)^2)"
        )
    if nsamples < 1:
        raise ValueError(f"gblm: nsamples must be >= 1, got {nsamples}")
    return keep_mask(gblm_scores(W, stats.sq_norm, grad, nsamples, overwrite), spec, group="row")
