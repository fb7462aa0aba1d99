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
SELECT_CHUNK = 1 << 20  # elements per topk call in lowest_mask (bounds its index tensor)
FLAT_DIRECT = 1 << 22  # kth_smallest: plain kthvalue up to this length
FLAT_SAMPLE = 1 << 16  # kth_smallest: sample size for the bracket


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
                f"{self}: M={self.m} does not divide the input width {in_features}"
                + (f" of {where}" if where else ""),
                key="pattern",
            )


def parse_spec(sparsity: float | str | None = None, pattern: str | None = None) -> SparsitySpec:
    """Validate ``--sparsity`` / ``--pattern``; exactly one must be given."""
    if (sparsity is None) == (pattern is None):
        raise SpecError("give exactly one of sparsity (a rate in [0, 1)) or pattern (N:M, like 2:4)")
    if pattern is not None:
        m = _NM.match(str(pattern))
        if not m:
            raise SpecError(f'"{pattern}" is not N:M (expected like "2:4", 0 < N < M)', key="pattern")
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise SpecError(f'"{pattern}" needs 0 < N < M (like "2:4" or "4:8")', key="pattern")
        return SparsitySpec(n=n, m=mm)
    try:
        rate = float(sparsity)
    except (TypeError, ValueError):
        raise SpecError(f"sparsity: {sparsity!r} is not a number (expected a rate in [0, 1))") from None
    if not 0.0 <= rate < 1.0:
        raise SpecError(f"sparsity: {rate} is outside [0, 1)")
    return SparsitySpec(rate=rate)


def check_finite(name: str, *tensors: torch.Tensor | None, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` if any tensor holds NaN or Inf (``None`` is skipped).

    Args:
        name: What the tensors are, for the message (e.g. ``"layers.3.mlp.up_proj weight"``).
        *tensors: Tensors to check; with several, the message says which one failed.
        hint: A likely cause, appended to the message (:func:`overflow_hint`).
    """
    for i, t in enumerate(tensors):
        if t is None or bool(torch.isfinite(t).all()):
            continue
        which = name if len(tensors) == 1 else f"{name} (tensor {i + 1} of {len(tensors)})"
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise NonFiniteError(
            f"{which}: {nan} NaN and {inf} Inf among {t.numel()} values (shape {tuple(t.shape)}); "
            f"pruning needs finite weights and statistics{hint}"
        )


def overflow_hint(dtype: torch.dtype) -> str:
    """The likely cause of non-finite statistics computed in ``dtype``: fp16's overflow, only in fp16."""
    if dtype != torch.float16:
        return ""
    return " (fp16 overflow in the forward pass is a usual cause: run in bfloat16 or float32)"


def abs_scores(W: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``|W|`` in fp32: in ``W``'s own memory with ``overwrite`` (an fp32 ``W`` the caller no
    longer needs: the masks stage's copy), else in a new buffer."""
    return W.abs_() if overwrite and W.dtype == torch.float32 else W.float().abs()


def prune_count(n: int, rate: float) -> int:
    """``floor(n * rate)`` of the rate as written: 0.29 of 100 is 29, not ``int(28.999999999999996)``."""
    return math.floor(Decimal(repr(float(rate))) * n)


def lowest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest entries along the last dim, exactly ``k`` per row.

    Same result as a stable sort (on ties the earlier index is taken) but finds the
    threshold by a selection (``topk`` per chunk of rows, :func:`kth_smallest` for one
    long row) and breaks ties only where the threshold is tied. Unlike
    ``scores <= threshold`` it never takes extra tied entries. Temporaries stay small:
    rows are handled in chunks of ``SELECT_CHUNK`` elements.
    """
    n = scores.shape[-1]
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    rows = scores.reshape(-1, n)
    out = torch.empty(rows.shape, dtype=torch.bool, device=scores.device)
    if rows.shape[0] == 1:
        thr = kth_smallest(rows[0], k)
        torch.le(rows, thr, out=out)
        if int(torch.count_nonzero(out)) > k:  # ties at the threshold: take the earliest
            torch.lt(rows, thr, out=out)
            need = k - int(torch.count_nonzero(out))
            out[0, torch.nonzero(rows[0] == thr).flatten()[:need]] = True
        return out.reshape(scores.shape)
    step = max(1, SELECT_CHUNK // n)
    for r, o in zip(rows.split(step), out.split(step), strict=True):
        thr = torch.topk(r, k, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)
        torch.le(r, thr, out=o)
        tied = (o.sum(-1, dtype=torch.int32) > k).nonzero().flatten()
        if tied.numel():  # rows with ties at the threshold: take the earliest tied entries
            sub, t = r[tied], thr[tied]
            keep = sub < t
            need = k - keep.sum(-1, keepdim=True)
            eq = sub == t
            keep |= eq & (eq.cumsum(-1) <= need)
            o[tied] = keep
    return out.reshape(scores.shape)


def kth_smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest value (1-based) of a 1-D tensor, exactly.

    ``kthvalue`` copies its input and builds an int64 index of it (12 bytes per entry);
    for a long vector this first brackets the answer with two quantiles of a strided
    sample, then selects only among the entries inside the bracket (bool masks and a
    short candidate vector), falling back to ``kthvalue`` if the bracket misses.
    """
    n = x.numel()
    if n <= FLAT_DIRECT:
        return x.kthvalue(k).values
    sample = x[:: n // FLAT_SAMPLE]
    m = sample.numel()
    q = k / n
    margin = 5.0 * math.sqrt(q * (1.0 - q) / m) + 2.0 / m  # five standard errors
    lo = sample.kthvalue(max(1, math.floor((q - margin) * m))).values
    hi = sample.kthvalue(min(m, math.ceil((q + margin) * m))).values
    below = int(torch.count_nonzero(x < lo))  # count_nonzero: no int64 copy, unlike sum()
    inside = x >= lo
    inside &= x <= hi
    if below < k <= below + int(torch.count_nonzero(inside)):
        return x[inside].kthvalue(k - below).values
    return x.kthvalue(k).values


def nm_lowest(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the ``m - n`` lowest of every ``m`` consecutive entries of the last dim.

    Ranks each entry inside its group by pairwise comparisons (ties: the earlier entry
    ranks lower, as a stable sort), which needs no index tensors: memory stays at one
    byte per weight even for a large matrix.
    """
    g = scores.reshape(*scores.shape[:-1], -1, m)
    rank = torch.zeros(g.shape, dtype=torch.uint8, device=scores.device)
    for i in range(m):
        gi = g[..., i : i + 1]
        # entries j that gi beats: gi < g_j, or equal with i before j
        rank[..., :i] += g[..., :i] > gi
        rank[..., i + 1 :] += g[..., i + 1 :] >= gi
    return (rank < m - n).reshape(scores.shape)


def keep_mask(scores: torch.Tensor, spec: SparsitySpec, group: str = "row") -> torch.Tensor:
    """Keep-mask from scores (higher = more important).

    ``group`` is the comparison group of an unstructured rate: ``"row"`` prunes
    ``floor(C_in * rate)`` per output row, ``"matrix"`` prunes ``floor(numel * rate)``
    over the whole matrix. N:M prunes the ``M - N`` lowest of every M consecutive inputs.
    """
    scores = scores.float()
    if spec.is_nm:
        spec.check_width(scores.shape[-1])
        return nm_lowest(scores, spec.n, spec.m).logical_not_()
    if group == "row":
        return lowest_mask(scores, prune_count(scores.shape[-1], spec.rate)).logical_not_()
    if group == "matrix":
        pruned = lowest_mask(scores.reshape(-1), prune_count(scores.numel(), spec.rate))
        return pruned.logical_not_().reshape(scores.shape)
    raise SpecError(f'group: "{group}" is not one of row, matrix')
