"""The pruning methods by name, with what statistics each needs.

Every method is a pure function ``(W, stats, spec, **options) -> (W_pruned, keep)`` on
fp32 tensors: ``W`` is ``(C_out, C_in)``, ``keep`` a boolean mask (True = kept) and
``W_pruned`` is exactly zero where ``keep`` is False.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from modules.errors import TopiaryError


@dataclass
class LayerStats:
    """Calibration statistics of one linear's input ``X`` (T tokens x C_in), all fp32.

    ``sq_norm[j] = sum_t X[t, j]^2`` (Wanda's norm is its root); ``gram = X^T X`` summed,
    not averaged; ``grad`` is GBLM's ``sqrt(sum_k (100 g_k)^2)`` per weight.
    """

    tokens: int
    sq_norm: torch.Tensor
    gram: torch.Tensor | None = None
    grad: torch.Tensor | None = None


PruneFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """A registered pruner: its function, the statistics it needs, and a one-line summary.

    ``data_free`` methods read no statistics at all (not even ``sq_norm``; they are called
    with ``stats=None``): the driver runs no calibration pass for them unless the
    reconstruction error is asked for.
    """

    name: str
    fn: PruneFn
    needs: frozenset[str]
    summary: str
    data_free: bool = False


def _methods() -> dict[str, Method]:
    from modules.admm import prune_admm, prune_admm_grad
    from modules.gblm import prune_gblm
    from modules.magnitude import prune_magnitude
    from modules.sparsegpt import prune_sparsegpt
    from modules.wanda import prune_wanda

    table = [
        Method("magnitude", prune_magnitude, frozenset(), "|W|, whole matrix or per row", data_free=True),
        Method("wanda", prune_wanda, frozenset(), "|W| * ||X_j||, per output row"),
        Method("sparsegpt", prune_sparsegpt, frozenset({"gram"}), "OBS mask and update, column blocks"),
        Method("gblm", prune_gblm, frozenset({"grad"}), "|W| * (G + ||X_j||), per output row"),
        Method("admm", prune_admm, frozenset({"gram"}), "ADMM weight update on a fixed mask"),
        Method("admm-grad", prune_admm_grad, frozenset({"gram"}), "ADMM with gradual mask selection"),
    ]
    return {m.name: m for m in table}


METHOD_NAMES = ("magnitude", "wanda", "sparsegpt", "gblm", "admm", "admm-grad")


def get_method(name: str) -> Method:
    """Look a method up by name; an unknown name lists the valid ones."""
    methods = _methods()
    if name not in methods:
        raise TopiaryError(f"method: {name!r} is not one of {', '.join(METHOD_NAMES)}")
    return methods[name]
