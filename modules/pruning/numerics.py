"""Numerics shared by the pruning methods: input checks, a damped Cholesky, thread counts.

A leaf of :mod:`modules.pruning`: it imports only torch and the leaves ``errors``,
``sparsity`` and ``stats``, so every method can use it without importing another method.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from modules.errors import TopiaryError
from modules.pruning.sparsity import check_finite
from modules.pruning.stats import LayerStats

log = logging.getLogger("topiary")

CHOLESKY_RETRIES = 4  # damping x10 each time: up to 10^4 times the requested damping


class CholeskyError(TopiaryError):
    """A Gram/Hessian matrix that stays non positive-definite even after heavy damping."""


def check_gram(method: str, W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """The Gram matrix of ``stats``, checked against ``W`` (shape, finiteness, token count)."""
    if W.dim() != 2:
        raise ValueError(f"{method}: W must be 2-D (C_out, C_in), got shape {tuple(W.shape)}")
    gram = stats.gram
    if gram is None:
        raise ValueError(f"{method}: stats.gram is missing (collect X^T X: the method needs 'gram')")
    c_in = W.shape[1]
    if tuple(gram.shape) != (c_in, c_in):
        raise ValueError(
            f"{method}: stats.gram has shape {tuple(gram.shape)}, expected ({c_in}, {c_in}) "
            f"for W of shape {tuple(W.shape)}"
        )
    if stats.tokens <= 0:
        raise ValueError(f"{method}: stats.tokens is {stats.tokens}; the statistics saw no token")
    check_finite(f"{method}: W", W)
    check_finite(f"{method}: stats.gram", gram)
    return gram


def damped_cholesky(H: torch.Tensor, damp: float, what: str, retries: int = CHOLESKY_RETRIES) -> torch.Tensor:
    """Lower Cholesky factor of ``H + damp * I``; ``H``'s diagonal is modified in place.

    If the factorisation fails (``H`` indefinite or singular beyond ``damp``), the damping
    is raised ten-fold and the factorisation retried, up to ``retries`` times, with a
    warning on the ``topiary`` logger each time. It never falls back to the identity.

    Args:
        H: Symmetric ``(n, n)`` fp32 matrix, owned by the caller and free to modify.
        damp: Absolute damping added to the diagonal (e.g. ``0.01 * mean(diag H)``).
        what: Name of the matrix for messages (method and layer).
        retries: How many ten-fold raises to try.

    Raises:
        CholeskyError: Still not positive-definite at ``damp * 10**retries``.
    """
    diag = H.diagonal()
    scale = float(diag.abs().mean()) or 1.0
    total = damp if damp > 0 else 0.0
    diag.add_(total)
    for attempt in range(retries + 1):
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            return L
        if attempt == retries:
            break
        new = total * 10 if total > 0 else 1e-6 * scale
        log.warning(
            "%s: Cholesky failed (leading minor %d not positive) with damping %.3g; retrying with %.3g",
            what,
            int(info),
            total,
            new,
        )
        diag.add_(new - total)
        total = new
    raise CholeskyError(
        f"{what}: the matrix is not positive-definite even with damping {total:.3g} "
        f"({retries} ten-fold raises); the calibration statistics are unusable (check for "
        "overflow, or collect more calibration tokens)"
    )


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run the enclosed ops on ``n`` intra-op threads, then restore the previous count.

    Memory-bound elementwise steps and tiny per-column updates run on few threads, the
    compute-bound factorisations and products on all: on a busy machine OpenMP's barriers
    make small ops many times slower with several threads than with one. The count is the
    whole process's, so only the main thread changes it: in a sweep's worker thread it would
    change the count under the other members' feet, and two such threads restoring in the
    wrong order would leave the process on one thread for good.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_layer(method: str, W: torch.Tensor, sq_norm: torch.Tensor | None) -> None:
    """Shapes and finiteness of a weight and its inputs' squared norms; clear errors otherwise."""
    if W.dim() != 2:
        raise ValueError(f"{method}: W must be 2-D (C_out, C_in), got shape {tuple(W.shape)}")
    if sq_norm is None:
        raise ValueError(f"{method}: stats.sq_norm is missing (collect calibration statistics first)")
    if tuple(sq_norm.shape) != (W.shape[1],):
        raise ValueError(
            f"{method}: stats.sq_norm has shape {tuple(sq_norm.shape)}, expected ({W.shape[1]},) "
            f"for W of shape {tuple(W.shape)}"
        )
    check_finite("W", W)
    check_finite("stats.sq_norm", sq_norm)
    if bool((sq_norm < 0).any()):
        raise ValueError(f"{method}: stats.sq_norm has negative entries; it must be a sum of squares")
