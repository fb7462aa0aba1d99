"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2024).

Per decoder block ``l``, ``r_l`` = share of the block's Wanda scores above ``m`` times
their mean (:func:`outlier_ratio`). Blocks with more outliers get lower sparsity
(:func:`owl_rates`), as in OWL's code:

    n_l  = (r_l - min r) / (max r - min r) * 2 * lam        # in [0, 2 lam]
    d_l  = n_l - mean(n)                                     # density shift, mean 0
    s_l  = target - d_l                                      # OWL: 1 - (1 - target + d_l)

The mean of ``s_l`` is the target by construction. OWL's paper states
``s_l in [target - lam, target + lam]``, but its code only guarantees that when
``mean(n) == lam``; in general one side reaches ``2 lam`` (ratios ``0, 0, 0, 1`` give
``target - 1.5 lam`` for the last block). With ``within_band=True`` (default) every shift
is multiplied by the largest ``c <= 1`` that puts all rates in
``[max(0, target - lam), target + min(lam, (1 - target) / 2)]``: the mean and the order
are unchanged, and where OWL's code already stays in the band the result is the same.
``within_band=False`` keeps OWL's code (shrinking only to stay inside ``[0, 1)``).
Rates are kept in ``[0, 1)`` by the same uniform shrink, not by clipping (which would move the mean).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from modules.pruning.sparsity import check_finite


def outlier_ratio(scores: torch.Tensor | Sequence[torch.Tensor], m: float = 5.0) -> float:
    """Share (0..1) of scores strictly above ``m`` times their mean.

    Args:
        scores: One tensor, or the score tensors of every linear of a block: their mean
            is taken over all values together, as OWL does on the concatenated block.
        m: Outlier threshold as a multiple of the mean (OWL's ``Hyper_m``, ~5).

    Returns:
        Fraction of outliers (OWL prints it in percent; :func:`owl_rates` is
        invariant to that scale).
    """
    tensors = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    return streamed_outlier_ratio(lambda: iter(tensors), m)


def streamed_outlier_ratio(scores: Callable[[], Iterable[torch.Tensor]], m: float = 5.0) -> float:
    """:func:`outlier_ratio` of the tensors that ``scores()`` yields, never holding more than one:
    ``scores`` is called twice (the mean over all values, then the count above ``m`` times it)
    and must yield the same tensors in the same order each time."""
    if not m > 0:
        raise ValueError(f"outlier_ratio: m must be > 0, got {m}")
    total, summed = 0, 0.0
    for t in scores():
        check_finite("outlier scores", t)
        total += t.numel()
        summed += float(t.double().sum())
    if total == 0:
        raise ValueError("outlier_ratio: no scores given")
    threshold = m * (summed / total)
    above, seen = 0, 0
    for t in scores():
        seen += t.numel()
        above += int((t.double() > threshold).sum())
    if seen != total:
        raise ValueError(f"outlier_ratio: the second sweep saw {seen} scores, the first {total}")
    return above / total


def owl_rates(
    ratios: Sequence[float], target: float, lam: float = 0.08, within_band: bool = True
) -> list[float]:
    """Per-block sparsity from per-block outlier ratios; see the module docstring for the formula.

    Args:
        ratios: Outlier ratio of each block (any common scale: fraction or percent).
        target: Mean sparsity over blocks, in ``[0, 1)``.
        lam: Half-width of the band around ``target`` (OWL's ``Lamda``).
        within_band: Keep every rate within ``target +- lam`` (the paper's claim); if
            False, OWL's code as is (its rates can reach ``target +- 2 lam``).

    Returns:
        One rate per block: mean ``target`` (to rounding), each in ``[0, 1)``, and a block
        with a higher ratio never gets a higher rate. Equal ratios give ``target`` for all.
    """
    r = [float(x) for x in ratios]
    if not r:
        raise ValueError("owl_rates: no ratios given")
    if not all(math.isfinite(x) for x in r):
        raise ValueError(f"owl_rates: ratios must be finite, got {r}")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"owl_rates: target {target} is outside [0, 1)")
    if not lam >= 0.0:
        raise ValueError(f"owl_rates: lam must be >= 0, got {lam}")
    lo_r, hi_r = min(r), max(r)
    if hi_r == lo_r or lam == 0.0:
        return [target] * len(r)
    n = [(x - lo_r) / (hi_r - lo_r) * 2.0 * lam for x in r]
    mean_n = sum(n) / len(n)
    shift = [x - mean_n for x in n]  # density shift; the rate moves the other way
    below = min(lam, target) if within_band else target  # how far a rate may go under target
    above = min(lam, (1.0 - target) / 2.0) if within_band else 1.0 - target
    c = 1.0
    for d in shift:
        if d > 0:
            c = min(c, below / d)
        elif d < 0:
            c = min(c, above / -d)
    rates = [target - c * d for d in shift]
    drift = sum(rates) / len(rates) - target
    return [min(max(x - drift, 0.0), math.nextafter(1.0, 0.0)) for x in rates]
