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
  one ``C_in^2 C_out`` product; ``W0`` itself is not stored either (``W`` and ``d`` are).
- ``W + U`` is the only state carried across iterations (buffer ``A``):
  ``Z = A * mask``, the new ``U = A - Z`` (exact), ``Z - U = Z - (A - Z)``.
- An iteration runs by chunks of ``CHUNK_ROWS`` rows: each chunk's work buffer,
  and for the per-row comparison group its selection scores, stay chunk-sized, so the
  loop holds ``G_rho^-1``, ``A`` and the bool mask, little else: at most about half the
  reference's peak (which is then the factorisation's two ``C_in x C_in`` matrices).
  Products with the bool mask, never ``masked_fill`` or ``where`` (about ten times
  slower on CPU).
- ``G_rho^-1`` is formed once from the Cholesky factor (``cholesky_inverse``; never a
  general ``inverse``) and applied by one ``addmm_`` per chunk in the weights' own
  layout, so no transposes. Two triangular solves cost the same flops but run 1.2-1.4x
  slower than one product on CPU. The explicit inverse is safe here: after normalisation
  ``diag G <= 1``, so ``lambda_max(G) <= C_in``, and ``c = lam * mean(diag G) + rho`` (1.1
  by default) is added: ``cond(G_rho) <= 1 + C_in / c``. The Cholesky step still reports
  (and retries) an indefinite matrix.
- ``precision="mixed"`` runs the products of every iteration but the last ``FP32_TAIL``
  (2) with bf16 operands, then finishes in fp32. On the benchmark's layers the
  reconstruction error equals fp32's to the fourth significant digit; on a fixed mask
  the weights differ from fp32's by 3e-4 (relative, Frobenius; 5e-4 with no fp32 tail,
  2e-4 with five), far below bf16 storage rounding. Where bf16 products are native this
  takes 0.5-0.7 of fp32's time (``make bench``). But on a whole model the flipped mask
  choices add up: on the embedded model ADMM-Grad's 70% perplexity moves by up to 1.7%
  against fp32. ``"auto"`` (default) therefore keeps fp32 wherever fp32 alone still
  prunes in at most 0.4 of the reference code's time, which the benchmark measures for
  input widths up to ``FP32_MAX_INPUTS`` (1024), and picks ``"mixed"`` only for wider
  inputs where bf16 products are native (CUDA with bf16, or a CPU that oneDNN runs bf16
  on: AVX-512 or AMX); the pruning report records the choice.
- The normalised ``(C_in, C_in)`` Gram matrix and the factor are freed once inverted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from modules.errors import TopiaryError
from modules.pruning.numerics import check_gram, damped_cholesky
from modules.pruning.sparsity import SparsitySpec, SpecError, lowest_mask, nm_lowest, prune_count
from modules.pruning.stats import LayerStats
from modules.pruning.traits import ADMM_ITERS, ADMM_KS, FP32_MAX_INPUTS

SELECTORS = ("magnitude", "wanda", "gblm", "sparsegpt", "mask")
GROUPS = ("row", "matrix")
PRECISIONS = ("auto", "fp32", "mixed")
EPS = 1e-8
FP32_TAIL = 2  # precision="mixed": the last iterations run in fp32
CHUNK_ROWS = 128  # rows per chunk of an iteration (fewer make the products slower on CPU)

# reselect(scores, step) -> keep-mask of that step. ``scores`` is ``|W + U|`` in the
# normalised space (all rows, or a chunk of rows), a scratch tensor it may overwrite.
Reselect = Callable[[torch.Tensor, int], torch.Tensor]


def range_problems(iters: int, lam: float, rho: float, ks: int | None = None) -> list[str]:
    """Every out-of-range option, one message each (checked when the config loads, and here)."""
    problems = []
    if iters < 0:
        problems.append(f"iters={iters} must be >= 0 (ADMM iterations; 20 by default)")
    if lam < 0:
        problems.append(f"lam={lam} must be >= 0 (damping as a fraction of the mean diagonal; 0.1)")
    if rho <= 0:
        problems.append(f"rho={rho} must be > 0 (ADMM penalty; 1.0 by default)")
    if ks is not None and not 0 <= ks <= iters:
        problems.append(f"ks={ks} must be within [0, iters={iters}] (gradual-selection iterations)")
    return problems


def _check_options(iters: int, lam: float, rho: float, ks: int | None = None) -> None:
    problems = range_problems(iters, lam, rho, ks)
    if problems:
        raise SpecError("; ".join(problems))


def resolve_precision(precision: str, device: torch.device, inputs: int | None = None) -> str:
    """``"fp32"`` or ``"mixed"`` for ``precision`` on a linear with ``inputs`` input features.

    ``"auto"``: fp32 up to :data:`FP32_MAX_INPUTS` inputs; wider (or ``inputs=None``),
    mixed where bf16 products are native, else fp32.
    """
    if precision not in PRECISIONS:
        raise SpecError(f'precision: "{precision}" is not one of {", ".join(PRECISIONS)}')
    if precision != "auto":
        return precision
    if inputs is not None and inputs <= FP32_MAX_INPUTS:
        return "fp32"
    if device.type == "cuda":
        return "mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type == "cpu":
        return "mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return "fp32"


@torch.no_grad()
def admm_update(
    W: torch.Tensor,
    gram: torch.Tensor,
    keep: torch.Tensor | None,
    iters: int = ADMM_ITERS,
    lam: float = 0.1,
    rho: float = 1.0,
    reselect: Reselect | None = None,
    reselect_steps: int = 0,
    rowwise: bool = False,
    what: str = "admm",
    precision: str = "auto",
    gram_scratch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ADMM iterations of the module docstring, on a fixed or re-selected mask.

    Args:
        W: Weight ``(C_out, C_in)``, fp32; not modified.
        gram: ``X^T X`` ``(C_in, C_in)``, fp32; not modified.
        keep: Initial keep-mask (True = kept); ``None`` if ``reselect`` gives the first.
        iters: ADMM iterations.
        lam: Damping ``lam * mean(diag G)`` of the normalised Gram matrix.
        rho: ADMM penalty.
        reselect: ``reselect(scores, k)`` gives the keep-mask of iteration ``k``
            (0-based) from ``scores = |W + U|``, a scratch tensor it may overwrite.
        reselect_steps: Call ``reselect`` at the start of iterations ``0..reselect_steps-1``.
        rowwise: ``reselect`` decides each row from that row alone, so it may be called
            on chunks of rows (less memory); else once on the whole matrix.
        what: Name for messages.
        precision: ``"fp32"``, ``"mixed"`` or ``"auto"`` (see the module docstring).
        gram_scratch: ``gram`` is the caller's scratch copy: normalised in place (one
            ``C_in x C_in`` buffer less; the same values).

    Returns:
        ``(W_pruned, keep)`` with ``W_pruned`` exactly zero off the final ``keep``.
    """
    _check_options(iters, lam, rho)
    low_iters = iters - FP32_TAIL if resolve_precision(precision, W.device, W.shape[1]) == "mixed" else 0
    W = W.float()
    if keep is None and not (reselect is not None and reselect_steps > 0 and iters > 0):
        raise ValueError(f"{what}: no keep-mask and no re-selection to make one")
    if iters == 0:
        return W * keep, keep
    d, Ginv = _normalised_inverse(gram, lam, rho, what, gram_scratch)
    Glow = Ginv.bfloat16() if low_iters > 0 else None
    A = W * d  # W + U, with U = 0
    if keep is None:
        keep = torch.empty(W.shape, dtype=torch.bool, device=W.device)
    elif rowwise and reselect_steps > 0:
        keep = keep.clone()  # re-selected in place below; the caller's mask stays as given
    rows = min(CHUNK_ROWS, W.shape[0])
    # Chunk buffers, allocated once: work buffer, mask as floats, bf16 operand and product.
    R, M = torch.empty(2, rows, W.shape[1], device=W.device)
    R16 = P16 = None
    if low_iters > 0:
        R16, P16 = torch.empty(2, rows, W.shape[1], dtype=torch.bfloat16, device=W.device)
    for k in range(iters):
        if k < reselect_steps:
            keep = _reselect(A, keep, reselect, k, rowwise, R)
        if k == low_iters:
            Glow = R16 = P16 = None
        _iteration(A, keep, W, d, Ginv, rho, (R, M), (Glow, R16, P16))
    del Ginv
    return A.mul_(keep).div_(d), keep  # Z = (W + U) * mask, de-normalised


def _normalised_inverse(
    gram: torch.Tensor, lam: float, rho: float, what: str, gram_scratch: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3: ``d = sqrt(diag G) + eps`` and ``G_rho^-1`` of the normalised, damped ``G``
    (``gram`` normalised in place when it is the caller's fp32 scratch copy)."""
    d = gram.diagonal().float().sqrt().add_(EPS)
    in_place = gram_scratch and gram.dtype == torch.float32
    G = (gram.div_(d.unsqueeze(1)) if in_place else gram.float().div(d.unsqueeze(1))).div_(d)
    L = damped_cholesky(G, lam * float(G.diagonal().mean()) + rho, f"{what}: normalised X^T X")
    del G
    return d, torch.cholesky_inverse(L)  # symmetric, so R @ Ginv = (Ginv @ R^T)^T


def _reselect(
    A: torch.Tensor, keep: torch.Tensor, reselect: Reselect, k: int, rowwise: bool, R: torch.Tensor
) -> torch.Tensor:
    """The keep-mask of iteration ``k`` from ``|A|``: by chunks of ``R``'s rows into ``keep``
    (``rowwise``), else on the whole matrix."""
    if not rowwise:
        return reselect(A.abs(), k)
    rows = R.shape[0]
    for a, m in zip(A.split(rows), keep.split(rows), strict=True):
        m.copy_(reselect(torch.abs(a, out=R[: len(a)]), k))
    return keep


def _iteration(
    A: torch.Tensor,
    keep: torch.Tensor,
    W: torch.Tensor,
    d: torch.Tensor,
    Ginv: torch.Tensor,
    rho: float,
    buffers: tuple[torch.Tensor, torch.Tensor],
    low: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
) -> None:
    """One ADMM iteration (step 4) on ``A = W + U`` in place, by chunks of rows: with the bf16
    ``G_rho^-1`` and its buffers of ``low`` when given, else in fp32 with ``Ginv``."""
    R, M = buffers
    Glow, R16, P16 = low
    rows = R.shape[0]
    for a, m, w in zip(A.split(rows), keep.split(rows), W.split(rows), strict=True):
        n = len(a)  # the last chunk may be short
        r = torch.mul(a, M[:n].copy_(m), out=R[:n])  # Z (a bool operand would be cast anew)
        a.sub_(r)  # U_{k+1} = A - Z
        r.sub_(a).addcmul_(w, d, value=-1)  # Z - U - W0
        a.addcmul_(w, d)  # U_{k+1} + W0
        if Glow is not None:
            torch.mm(R16[:n].copy_(r), Glow, out=P16[:n])
            a.add_(r.copy_(P16[:n]), alpha=rho)
        else:
            a.addmm_(r, Ginv, alpha=rho)  # U_{k+1} + W_{k+1}


def prune_admm(
    W: torch.Tensor,
    stats: LayerStats,
    spec: SparsitySpec,
    mask: torch.Tensor | None = None,
    iters: int = ADMM_ITERS,
    lam: float = 0.1,
    rho: float = 1.0,
    precision: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM1: the ADMM weight update on a fixed mask.

    The mask is ``mask``, a boolean keep-mask shaped like ``W`` (``spec`` is not checked
    against it). Through the registry (``get_method("admm").run``) the option
    ``selector`` gives it instead: the mask of ``"wanda"`` (default), ``"magnitude"``
    (whole-matrix, its default), ``"gblm"`` (needs ``stats.grad``) or ``"sparsegpt"``
    (its mask only; its weights are discarded and re-fitted here).

    Args:
        W: Weight ``(C_out, C_in)``, fp32; not modified.
        stats: Needs ``stats.gram`` (``X^T X`` summed).
        spec: Target sparsity (of the selector that gave ``mask``).
        mask: The keep-mask (True = kept).
        iters: ADMM iterations (20).
        lam: Damping fraction (0.1).
        rho: ADMM penalty (1.0).
        precision: ``"auto"`` (default), ``"fp32"`` or ``"mixed"`` (bf16 products but
            for the last ``FP32_TAIL`` iterations; see the module docstring).

    Returns:
        ``(W_pruned, keep)``: a new tensor, exactly zero off ``keep``, and the mask.
    """
    gram = check_gram("admm", W, stats)
    _check_options(iters, lam, rho)
    resolve_precision(precision, W.device)
    if mask is None:
        raise TopiaryError("admm: needs a keep-mask (mask=, or the registry's selector option)")
    if tuple(mask.shape) != tuple(W.shape):
        raise TopiaryError(f"mask: shape {tuple(mask.shape)} does not match the weight's {tuple(W.shape)}")
    keep = mask.to(device=W.device, dtype=torch.bool)
    return admm_update(
        W, gram, keep, iters, lam, rho, what="admm", precision=precision, gram_scratch=stats.scratch
    )


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
    iters: int = ADMM_ITERS,
    ks: int = ADMM_KS,
    lam: float = 0.1,
    rho: float = 1.0,
    group: str = "row",
    precision: str = "auto",
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
        precision: ``"auto"`` (default), ``"fp32"`` or ``"mixed"`` (bf16 products but
            for the last ``FP32_TAIL`` iterations; see the module docstring).

    Returns:
        ``(W_pruned, keep)``: a new tensor, exactly zero off ``keep``, and the mask.
    """
    gram = check_gram("admm-grad", W, stats)
    _check_options(iters, lam, rho, ks)
    if group not in GROUPS:
        raise SpecError(f'group: "{group}" is not one of {", ".join(GROUPS)}')
    resolve_precision(precision, W.device)
    if spec.is_nm:
        spec.check_width(W.shape[1])
    keep = None
    if ks == 0:
        d = gram.diagonal().float().sqrt().add_(EPS)
        keep = grad_keep(W.float().abs() * d, spec, 0, 0, group)

    def reselect(scores: torch.Tensor, k: int) -> torch.Tensor:
        return grad_keep(scores, spec, k + 1, ks, group)

    return admm_update(
        W,
        gram,
        keep,
        iters,
        lam,
        rho,
        reselect,
        reselect_steps=ks,
        rowwise=group == "row",
        what="admm-grad",
        precision=precision,
        gram_scratch=stats.scratch,
    )
