"""ADMM weight update on a fixed mask (ADMM1) and with gradual mask selection (ADMM-Grad).

Boza, 2024, "Fast and Effective Weight Update for Pruned Large Language Models":
minimise ``||X W^T - X Z^T||^2`` over ``Z`` restricted to a mask, by ADMM on the split
``W = Z``. The steps (``shared/guide/ALGORITHMS.md``):

1. ``G = X^T X``; ``d = sqrt(diag G) + 1e-8``; ``G <- G / (d d^T)``; ``W <- W * d``.
2. ``G += lam * mean(diag G) * I`` *before* ``B = G W^T`` (pulls towards the dense weights).
3. ``G += rho * I``; one Cholesky factorisation ``G = L L^T``.
4. ``U = 0``; ``iters`` times: ``Z = (W + U) * mask``; ``U += W - Z``;
   ``W = G^-1 (B + rho (Z - U))``.
5. Result ``(W + U) * mask / d`` after the last update (as the reference code), exactly
   zero off the mask.

Implementation (same iterates as the reference, less memory and time):

- ``B`` is never formed: with ``G_lam = G_rho - rho I``,
  ``G_rho^-1 (B + rho V) = W0 + rho G_rho^-1 (V - W0)`` where ``W0 = W * d``. This saves
  one ``C_in^2 C_out`` product.
- ``W + U`` is the only state carried across iterations (buffer ``A``): ``Z = A * mask``,
  the new ``U = A * (1 - mask)`` and ``Z - U = A * (2 mask - 1)``. Besides the Cholesky
  factor, three ``C_in x C_out`` buffers live during the loop (``A``, the work buffer
  ``R`` that is also the selection scratch, and ``W0``), plus bool masks.
- ``G_rho^-1`` is applied as ``cholesky_solve`` does, by two triangular solves with the
  factor (no explicit inverse), but in place in ``R`` with ``solve_triangular(out=R)``:
  ``torch.cholesky_solve`` clones the factor and the right-hand side on every call.
- The buffers are transposed, ``(C_in, C_out)`` as in the reference code: left solves on
  a row-major right-hand side are measurably faster on CPU than right solves.
- The normalised ``(C_in, C_in)`` Gram matrix is freed once factored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from modules.errors import TopiaryError
from modules.registry import LayerStats
from modules.sparsegpt import check_gram, damped_cholesky, light_threads, num_threads
from modules.sparsity import SparsitySpec, SpecError, lowest_mask, nm_lowest, prune_count

SELECTORS = ("magnitude", "wanda", "gblm", "sparsegpt", "mask")
GROUPS = ("row", "matrix")
EPS = 1e-8

# select(scores, step) -> new keep-mask, or None to keep the current one. ``scores`` is
# ``|W + U|`` in the normalised space, in a scratch buffer the selector may overwrite.
Reselect = Callable[[torch.Tensor, int], "torch.Tensor | None"]


def _check_options(iters: int, lam: float, rho: float) -> None:
    if iters < 0:
        raise SpecError(f"iters: {iters} must be >= 0 (ADMM iterations; 20 by default)")
    if lam < 0:
        raise SpecError(f"lam: {lam} must be >= 0 (damping as a fraction of the mean diagonal; 0.1)")
    if rho <= 0:
        raise SpecError(f"rho: {rho} must be > 0 (ADMM penalty; 1.0 by default)")


@torch.no_grad()
def admm_update(
    W: torch.Tensor,
    gram: torch.Tensor,
    keep: torch.Tensor | None,
    iters: int = 20,
    lam: float = 0.1,
    rho: float = 1.0,
    reselect: Reselect | None = None,
    reselect_steps: int | None = None,
    what: str = "admm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ADMM iterations of the module docstring, on a fixed or re-selected mask.

    Args:
        W: Weight ``(C_out, C_in)``, fp32; not modified.
        gram: ``X^T X`` ``(C_in, C_in)``, fp32; not modified.
        keep: Initial keep-mask (True = kept); may be ``None`` if ``reselect`` returns a
            mask at step 0.
        iters: ADMM iterations.
        lam: Damping ``lam * mean(diag G)`` of the normalised Gram matrix.
        rho: ADMM penalty.
        reselect: Called at the start of every iteration ``k`` (0-based) with
            ``|W + U|`` (a scratch tensor it may overwrite) and ``k``; returns a new
            keep-mask or ``None`` to keep the current one.
        reselect_steps: Call ``reselect`` only in the first ``reselect_steps``
            iterations (default: all).
        what: Name for messages.

    Returns:
        ``(W_pruned, keep)`` with ``W_pruned`` exactly zero off the final ``keep``.
    """
    _check_options(iters, lam, rho)
    W = W.float()
    if iters == 0:
        if keep is None:
            raise ValueError(f"{what}: no mask to apply (iters=0 and no initial keep-mask)")
        return W.masked_fill(~keep, 0), keep
    d = gram.diagonal().float().sqrt().add_(EPS)
    G = gram.float().div(d.unsqueeze(1)).div_(d)
    L = damped_cholesky(G, lam * float(G.diagonal().mean()) + rho, f"{what}: normalised X^T X")
    del G
    # Transposed layout (C_in, C_out), as the reference: G^-1 R^T is then two left
    # triangular solves on a row-major right-hand side, measurably faster than right solves.
    W0 = W.t().mul(d.unsqueeze(1)).contiguous()  # normalised dense weights, transposed
    A = W0.clone()  # W + U, with U = 0
    R = torch.empty_like(A)
    keep_t = None if keep is None else keep.t().contiguous()
    scores = R.view(W.shape)  # R is free at selection time: reuse it as (C_out, C_in) scratch
    threads = torch.get_num_threads()
    with num_threads(light_threads()):  # elementwise work; the solves inside use all threads
        for k in range(iters):
            if reselect is not None and (reselect_steps is None or k < reselect_steps):
                scores.copy_(A.t()).abs_()  # copy_ has a blocked transpose; abs(out=) does not
                new = reselect(scores, k)
                if new is not None:
                    keep, keep_t = new, new.t().contiguous()
            if keep_t is None:
                raise ValueError(f"{what}: no mask at iteration {k}")
            _admm_step(A, R, W0, L, keep_t, rho, threads)
        del R, scores, L, W0
        A.masked_fill_(~keep_t, 0).div_(d.unsqueeze(1))
        return A.t().contiguous(), keep


def _admm_step(
    A: torch.Tensor,
    R: torch.Tensor,
    W0: torch.Tensor,
    L: torch.Tensor,
    keep_t: torch.Tensor,
    rho: float,
    threads: int,
) -> None:
    """One iteration in place on ``A = W + U`` (transposed layout); ``R`` is the work buffer."""
    torch.sub(A, W0, out=R)  # R = A - W0
    A.masked_fill_(keep_t, 0)  # A = U_k = A * (1 - mask)
    R.sub_(A, alpha=2)  # R = Z - U - W0
    with num_threads(threads):
        torch.linalg.solve_triangular(L, R, upper=False, out=R)
        torch.linalg.solve_triangular(L.mT, R, upper=True, out=R)  # R = G^-1 (Z - U - W0)
    A.add_(R, alpha=rho).add_(W0)  # A = U_k + W_{k+1}


def _select(selector: str, W: torch.Tensor, stats: LayerStats, spec: SparsitySpec) -> torch.Tensor:
    """Keep-mask of another method, used as ADMM1's fixed mask."""
    if stats.sq_norm is None and stats.gram is not None:
        stats = replace(stats, sq_norm=stats.gram.diagonal().clone())
    if selector == "magnitude":
        from modules.magnitude import prune_magnitude

        return prune_magnitude(W, stats, spec)[1]
    if selector == "wanda":
        from modules.wanda import prune_wanda

        return prune_wanda(W, stats, spec)[1]
    if selector == "gblm":
        from modules.gblm import prune_gblm

        return prune_gblm(W, stats, spec)[1]
    if selector == "sparsegpt":
        from modules.sparsegpt import prune_sparsegpt

        return prune_sparsegpt(W, stats, spec)[1]
    if selector == "mask":
        raise TopiaryError('selector: "mask" needs the keep-mask passed as mask= (e.g. with mask_file)')
    raise TopiaryError(f"selector: {selector!r} is not one of {', '.join(SELECTORS)}")


def prune_admm(
    W: torch.Tensor,
    stats: LayerStats,
    spec: SparsitySpec,
    selector: str = "wanda",
    mask: torch.Tensor | None = None,
    iters: int = 20,
    lam: float = 0.1,
    rho: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM1: the ADMM weight update on a fixed mask.

    The mask is ``mask`` when given (a boolean keep-mask shaped like ``W``; ``selector``
    is then ignored, and ``spec`` is not checked against it), otherwise that of
    ``selector``: ``"wanda"`` (default), ``"magnitude"`` (whole-matrix, its default),
    ``"gblm"`` (needs ``stats.grad``) or ``"sparsegpt"`` (its mask only; its weights are
    discarded and re-fitted here).

    Args:
        W: Weight ``(C_out, C_in)``, fp32; not modified.
        stats: Needs ``stats.gram`` (``X^T X`` summed) and what the selector needs.
        spec: Target sparsity for the selector.
        selector: One of :data:`SELECTORS` (``"mask"`` means: use ``mask``).
        mask: User-given keep-mask (True = kept).
        iters: ADMM iterations (20).
        lam: Damping fraction (0.1).
        rho: ADMM penalty (1.0).

    Returns:
        ``(W_pruned, keep)``: a new tensor, exactly zero off ``keep``, and the mask.
    """
    gram = check_gram("admm", W, stats)
    _check_options(iters, lam, rho)
    if mask is not None:
        if tuple(mask.shape) != tuple(W.shape):
            raise TopiaryError(
                f"mask: shape {tuple(mask.shape)} does not match the weight's {tuple(W.shape)}"
            )
        keep = mask.to(device=W.device, dtype=torch.bool)
    else:
        keep = _select(selector, W, stats, spec)
    return admm_update(W, gram, keep, iters, lam, rho, what="admm")


def grad_sparsity(s: float, t: int, ks: int) -> float:
    """ADMM-Grad's schedule ``s_t = s - s (1 - t / ks)^3``; ``s`` itself once ``t >= ks``."""
    if t >= ks:
        return s
    return s - s * (1.0 - t / ks) ** 3


def grad_keep(scores: torch.Tensor, spec: SparsitySpec, t: int, ks: int, group: str = "row") -> torch.Tensor:
    """ADMM-Grad's keep-mask at step ``t`` (1-based) from ``scores = |W + U|``.

    Unstructured rate ``s``: prune exactly ``floor(C_in * s_t)`` of each row
    (``group="row"``) or ``floor(numel * s_t)`` of the matrix (``group="matrix"``).

    N:M: the candidates are the ``M - N`` lowest of every M consecutive inputs of a row
    (the N:M mask of the current scores). Among the candidates only, prune the lowest
    ``floor(C_in * s_t)`` per row (or ``floor(numel * s_t)`` per matrix), where
    ``s = (M - N) / M``; the other candidates are kept for now. Every intermediate mask
    is thus a superset of an N:M mask, and at ``t >= ks`` the mask *is* the N:M mask.

    Ties: the earlier weight is pruned (row-major order), the count is exact.
    ``scores`` may be overwritten.
    """
    if group not in GROUPS:
        raise SpecError(f'group: "{group}" is not one of {", ".join(GROUPS)}')
    if spec.is_nm:
        spec.check_width(scores.shape[-1])
        candidates = nm_lowest(scores, spec.n, spec.m)
        if t >= ks:
            return ~candidates
        scores.masked_fill_(~candidates, float("inf"))
    s_t = grad_sparsity(spec.target, t, ks)
    if group == "row":
        return ~lowest_mask(scores, prune_count(scores.shape[-1], s_t))
    flat = scores.reshape(-1)
    return ~lowest_mask(flat, prune_count(flat.numel(), s_t)).reshape(scores.shape)


def prune_admm_grad(
    W: torch.Tensor,
    stats: LayerStats,
    spec: SparsitySpec,
    iters: int = 20,
    ks: int = 15,
    lam: float = 0.1,
    rho: float = 1.0,
    group: str = "row",
) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM-Grad: ADMM with the mask re-selected from ``|W + U|`` during the first ``ks`` iterations.

    At iteration ``t = 1..ks`` the mask is :func:`grad_keep` at ``s_t = s - s (1 - t/ks)^3``
    (so ``s_ks = s``); iterations ``ks+1..iters`` keep that final mask. Selection is in
    the normalised space (``|W + U|`` with ``W`` scaled by ``d``), where ``|W|`` is
    Wanda's score. ``ks = 0`` selects once at ``s`` before the first iteration.

    Known defects of the reference code, not copied: its default (whole-matrix) branch
    re-selects at the final ``s`` every time (here: the schedule ``s_t``); its 2:4 branch
    is hard-wired to groups of 4 (here: any N:M, see :func:`grad_keep`); it thresholds
    with ``>=``, keeping extra weights on ties (here: exact counts).

    Args:
        W: Weight ``(C_out, C_in)``, fp32; not modified.
        stats: Needs ``stats.gram`` (``X^T X`` summed).
        spec: Unstructured rate or N:M pattern.
        iters: ADMM iterations (20).
        ks: Iterations with gradual selection (15); ``0 <= ks <= iters``.
        lam: Damping fraction (0.1).
        rho: ADMM penalty (1.0).
        group: Comparison group: ``"row"`` (per output row, default, as Wanda) or
            ``"matrix"`` (the reference code's default).

    Returns:
        ``(W_pruned, keep)``: a new tensor, exactly zero off ``keep``, and the mask.
    """
    gram = check_gram("admm-grad", W, stats)
    _check_options(iters, lam, rho)
    if group not in GROUPS:
        raise SpecError(f'group: "{group}" is not one of {", ".join(GROUPS)}')
    if not 0 <= ks <= iters:
        raise SpecError(f"ks: {ks} must be within [0, iters={iters}] (gradual-selection iterations)")
    if spec.is_nm:
        spec.check_width(W.shape[1])
    keep = None
    if ks == 0:
        d = gram.diagonal().float().sqrt().add_(EPS)
        keep = grad_keep(W.float().abs() * d, spec, 0, 0, group)

    def reselect(scores: torch.Tensor, k: int) -> torch.Tensor | None:
        return grad_keep(scores, spec, k + 1, ks, group) if k < ks else None

    return admm_update(W, gram, keep, iters, lam, rho, reselect, reselect_steps=ks, what="admm-grad")
