"""Sparsity specifications and the mask selection shared by every pruner.

Masks are boolean tensors shaped like the weight, ``True`` where a weight is KEPT.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

import torch

from modules.errors import TopiaryError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class SpecError(TopiaryError):
    """A sparsity setting that cannot be honoured; the message names the value."""


class NonFiniteError(TopiaryError):
    """A weight or statistic holds NaN or Inf; the message names the tensor."""


@dataclass(frozen=True)
class SparsitySpec:
    """Either an unstructured rate (fraction pruned) or an N:M pattern (N kept of every M)."""

    rate: float = 0.0
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def target(self) -> float:
        """Fraction of weights pruned."""
        return 1.0 - self.n / self.m if self.is_nm else self.rate

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.rate:g}"

    def with_rate(self, rate: float) -> SparsitySpec:
        """The same kind of spec at another unstructured rate (used by OWL and ADMM-Grad)."""
        return SparsitySpec(rate=rate)

    def check_width(self, in_features: int, where: str = "") -> None:
        """N:M needs M to divide the input width of every pruned linear."""
        if self.is_nm and in_features % self.m:
            raise SpecError(
                f"pattern: {self}: M={self.m} does not divide the input width {in_features}"
                + (f" of {where}" if where else "")
            )


def parse_spec(sparsity: float | str | None = None, pattern: str | None = None) -> SparsitySpec:
    """Validate ``--sparsity`` / ``--pattern``; exactly one must be given."""
    if (sparsity is None) == (pattern is None):
        raise SpecError("give exactly one of sparsity (a rate in [0, 1)) or pattern (N:M, like 2:4)")
    if pattern is not None:
        m = _NM.match(str(pattern))
        if not m:
            raise SpecError(f'pattern: "{pattern}" is not N:M (expected like "2:4", 0 < N < M)')
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise SpecError(f'pattern: "{pattern}" needs 0 < N < M (like "2:4" or "4:8")')
        return SparsitySpec(n=n, m=mm)
    try:
        rate = float(sparsity)
    except (TypeError, ValueError):
        raise SpecError(f"sparsity: {sparsity!r} is not a number (expected a rate in [0, 1))") from None
    if not 0.0 <= rate < 1.0:
        raise SpecError(f"sparsity: {rate} is outside [0, 1)")
    return SparsitySpec(rate=rate)


def check_finite(name: str, *tensors: torch.Tensor | None) -> None:
    """Raise :class:`NonFiniteError` if any tensor holds NaN or Inf (``None`` is skipped).

    Args:
        name: What the tensors are, for the message (e.g. ``"layers.3.mlp.up_proj weight"``).
        *tensors: Tensors to check; with several, the message says which one failed.
    """
    for i, t in enumerate(tensors):
        if t is None or bool(torch.isfinite(t).all()):
            continue
        which = name if len(tensors) == 1 else f"{name} (tensor {i + 1} of {len(tensors)})"
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise NonFiniteError(
            f"{which}: {nan} NaN and {inf} Inf among {t.numel()} values (shape {tuple(t.shape)}); "
            "pruning needs finite weights and statistics (fp16 overflow in calibration is a usual cause)"
        )


def prune_count(n: int, rate: float) -> int:
    """``floor(n * rate)`` of the rate as written: 0.29 of 100 is 29, not ``int(28.999999999999996)``."""
    return math.floor(Decimal(repr(float(rate))) * n)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k lowest entries along the last dim (stable: ties prune the earlier)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        mask.scatter_(-1, idx, True)
    return mask


def keep_mask(scores: torch.Tensor, spec: SparsitySpec, group: str = "row") -> torch.Tensor:
    """Keep-mask from scores (higher = more important).

    ``group`` is the comparison group of an unstructured rate: ``"row"`` prunes
    ``floor(C_in * rate)`` per output row, ``"matrix"`` prunes ``floor(numel * rate)``
    over the whole matrix. N:M prunes the ``M - N`` lowest of every M consecutive inputs.
    """
    scores = scores.float()
    if spec.is_nm:
        spec.check_width(scores.shape[-1])
        groups = scores.reshape(*scores.shape[:-1], -1, spec.m)
        return ~_lowest(groups, spec.m - spec.n).reshape(scores.shape)
    if group == "row":
        return ~_lowest(scores, prune_count(scores.shape[-1], spec.rate))
    if group == "matrix":
        return ~_lowest(scores.reshape(-1), prune_count(scores.numel(), spec.rate)).reshape(scores.shape)
    raise SpecError(f'group: "{group}" is not one of row, matrix')
