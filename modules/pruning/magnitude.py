"""Magnitude pruning: score ``|W|``, no calibration data.

The Wanda paper's magnitude baseline compares all weights of a matrix at once
(``group="matrix"``, the default); ``group="row"`` compares within each output row.
N:M always works on groups of M consecutive inputs of a row, whatever ``group`` says.
"""

from __future__ import annotations

import torch

from modules.pruning.sparsity import SparsitySpec, SpecError, abs_scores, check_finite, keep_mask
from modules.pruning.stats import LayerStats

GROUPS = ("matrix", "row")


def prune_magnitude(
    W: torch.Tensor, stats: LayerStats | None, spec: SparsitySpec, group: str = "matrix"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the smallest ``|W|``: ``W`` off :func:`magnitude_keep`'s mask.

    Returns:
        ``(W_pruned, keep)``: a new tensor equal to ``W`` where ``keep`` and exactly zero
        elsewhere, and the boolean keep-mask.
    """
    keep = magnitude_keep(W, stats, spec, group)
    return W.masked_fill(~keep, 0), keep


def magnitude_keep(
    W: torch.Tensor,
    stats: LayerStats | None,
    spec: SparsitySpec,
    group: str = "matrix",
    *,
    overwrite: bool = False,
) -> torch.Tensor:
    """The keep-mask of the largest ``|W|``.

    Unstructured: ``group="matrix"`` prunes ``floor(numel * s)`` weights of the whole
    matrix, ``group="row"`` prunes ``floor(C_in * s)`` of every row. Ties are broken by a
    stable sort (the earlier index is pruned first). Unlike the Wanda repository's
    ``W_metric <= thresh``, the count is exact: ties at the threshold keep their weights.

    Args:
        W: Weight ``(C_out, C_in)``, fp32 (scores are computed in fp32 in any case).
        stats: Unused; magnitude needs no calibration statistics (may be ``None``).
        spec: Unstructured rate or N:M pattern.
        group: Comparison group of an unstructured rate: ``"matrix"`` or ``"row"``.
        overwrite: ``|W|`` may take ``W``'s memory (``W`` is then lost; the masks stage).

    Returns:
        The boolean keep-mask.
    """
    if group not in GROUPS:
        raise SpecError(f'group: "{group}" is not one of {", ".join(GROUPS)}')
    if W.dim() != 2:
        raise ValueError(f"magnitude: W must be 2-D (C_out, C_in), got shape {tuple(W.shape)}")
    check_finite("W", W)
    scores = abs_scores(W, overwrite)
    return keep_mask(scores, spec, group=group)
