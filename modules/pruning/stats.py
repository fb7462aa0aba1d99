"""Calibration statistics of a linear's input: a leaf module, imported by every method.

It imports nothing of Topiary's, so a method file and the registry (which imports every
method) never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerStats:
    """Calibration statistics of one linear's input ``X`` (T tokens x C_in), all fp32.

    ``sq_norm[j] = sum_t X[t, j]^2`` (Wanda's norm is its root); ``gram = X^T X`` summed,
    not averaged; ``grad`` is GBLM's ``sqrt(sum_k (100 g_k)^2)`` per weight. ``scratch``:
    the tensors are this linear's own copies, which a method may overwrite (a streamed
    stage reads them per linear; in memory the linears of a group share one object).
    """

    tokens: int
    sq_norm: torch.Tensor
    gram: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    scratch: bool = False
