"""Paired comparisons of a pruned model with its dense model, with 95% intervals.

Both models are scored on the same items (zero-shot) and the same windows (perplexity),
so their difference is measured item by item: most items are answered alike by both, and
only the discordant ones carry the difference. Comparing two independent intervals would
throw that pairing away and need several times more items for the same resolution.

Method: a **paired percentile bootstrap** with a fixed seed (:data:`SEED`,
:data:`ITERS` resamples, :data:`CONFIDENCE`), for every figure:

- zero-shot, per task: resample items (the same draw for both models, so each item's pair
  of answers stays together); the statistic is 100 x (pruned acc - dense acc), in points.
- zero-shot mean over tasks: the tasks are fixed, so items are resampled within each
  task independently (a stratified bootstrap) and the mean of the per-task differences is
  taken, exactly as the headline mean weighs tasks (unweighted by size).
- perplexity: resample windows; the statistics are the ratio pruned / dense and the
  difference pruned - dense of exp(total NLL / total tokens) over the same resampled
  windows.

Why the bootstrap rather than an exact McNemar test: the gate needs an *interval* on the
drop (its upper bound against a threshold in points), for the mean over tasks as well as
per task, and for perplexity; McNemar gives only a p-value for one task. The exact
McNemar p-value (two-sided, binomial on the discordant pairs) is reported per task beside
the interval, as a check that needs no resampling. The windows of a text are not fully
independent (neighbours share topics), so the perplexity interval is somewhat narrow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NotRequired, TypedDict

import numpy as np

from modules.errors import TopiaryError

CONFIDENCE = 0.95
ITERS = 10_000
SEED = 0
_CHUNK = 1_000  # resamples drawn at a time (memory: chunk x items indices)


def _quantiles(reps: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _resampled_sums(columns: np.ndarray, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Sums of each column of ``columns`` (n, k) over ``iters`` resamples of its n rows."""
    n = columns.shape[0]
    out = np.empty((iters, columns.shape[1]), dtype=np.float64)
    for start in range(0, iters, _CHUNK):
        stop = min(start + _CHUNK, iters)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = columns[idx].sum(axis=1)
    return out


def mcnemar_exact(dense_only: int, pruned_only: int) -> float:
    """Two-sided exact McNemar p-value: 2 x the smaller binomial tail of the discordant pairs.

    Args:
        dense_only: items the dense model answers right and the pruned one wrong.
        pruned_only: items the pruned model answers right and the dense one wrong.

    Returns:
        ``min(1, 2 P(X <= min(b, c)))`` for ``X ~ Binomial(b + c, 1/2)``; 1.0 when no item
        is discordant.
    """
    n = dense_only + pruned_only
    if n == 0:
        return 1.0
    k = min(dense_only, pruned_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n  # exact ints: 2.0**n overflows past 1023
    return min(1.0, 2.0 * tail)


def _as_vector(name: str, values: Sequence[float]) -> np.ndarray:
    vec = np.asarray(values, dtype=np.float64)
    if vec.ndim != 1 or vec.size == 0:
        raise TopiaryError(f"paired comparison: {name} has no items")
    return vec


def paired_accuracy(
    dense: Mapping[str, Sequence[float]],
    pruned: Mapping[str, Sequence[float]],
    iters: int = ITERS,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> PairedAccuracy:
    """Zero-shot difference pruned - dense, in points, with paired bootstrap intervals.

    Args:
        dense: task -> per-item correctness (1 or 0) of the dense model, in item order.
        pruned: the same for the pruned model, on the same items in the same order.
        iters: bootstrap resamples.
        seed: seed of the resampling (the same seed gives the same interval).
        confidence: coverage of the interval.

    Returns:
        ``{"tasks": {task: {"diff", "lo", "hi", "n", "dense_only", "pruned_only",
        "mcnemar_p"}}, "mean": {"diff", "lo", "hi", "n"}, "confidence", "iters", "seed",
        "method"}``; ``diff``/``lo``/``hi`` are points (100 x fractions), negative when the
        pruned model is worse. ``mean.n`` is the number of items over all tasks.

    Raises:
        TopiaryError: the two models were not scored on the same tasks and item counts.
    """
    if list(dense) != list(pruned) or not dense:
        raise TopiaryError(f"paired comparison: tasks differ (dense {list(dense)}, pruned {list(pruned)})")
    rng = np.random.default_rng(seed)
    tasks, reps = {}, []
    for name in dense:
        d, p = _as_vector(f"dense {name}", dense[name]), _as_vector(f"pruned {name}", pruned[name])
        if d.shape != p.shape:
            raise TopiaryError(f"paired comparison: task {name} has {d.size} dense and {p.size} pruned items")
        delta = 100.0 * (p - d)
        rep = _resampled_sums(delta[:, None], iters, rng)[:, 0] / delta.size
        lo, hi = _quantiles(rep, confidence)
        dense_only, pruned_only = int(((d > 0) & (p <= 0)).sum()), int(((p > 0) & (d <= 0)).sum())
        tasks[name] = {
            "diff": float(delta.mean()),
            "lo": lo,
            "hi": hi,
            "n": int(delta.size),
            "dense_only": dense_only,
            "pruned_only": pruned_only,
            "mcnemar_p": mcnemar_exact(dense_only, pruned_only),
        }
        reps.append(rep)
    lo, hi = _quantiles(np.mean(reps, axis=0), confidence)
    mean = {
        "diff": float(np.mean([t["diff"] for t in tasks.values()])),
        "lo": lo,
        "hi": hi,
        "n": sum(t["n"] for t in tasks.values()),
    }
    return {
        "tasks": tasks,
        "mean": mean,
        "confidence": confidence,
        "iters": iters,
        "seed": seed,
        "method": "paired percentile bootstrap over items (stratified by task for the mean)",
    }


def accuracy_interval(
    acc: Mapping[str, Sequence[float]], iters: int = ITERS, seed: int = SEED, confidence: float = CONFIDENCE
) -> dict:
    """One model's mean accuracy over tasks (points) with a stratified bootstrap interval.

    This is the unpaired interval of a single model, for reports; comparing two models goes
    through :func:`paired_accuracy`, which is several times tighter.

    Returns:
        ``{"acc", "lo", "hi", "n"}``, accuracies in points.
    """
    rng = np.random.default_rng(seed)
    reps, means = [], []
    for name, values in acc.items():
        vec = 100.0 * _as_vector(name, values)
        reps.append(_resampled_sums(vec[:, None], iters, rng)[:, 0] / vec.size)
        means.append(float(vec.mean()))
    lo, hi = _quantiles(np.mean(reps, axis=0), confidence)
    return {"acc": float(np.mean(means)), "lo": lo, "hi": hi, "n": sum(len(v) for v in acc.values())}


class PairedPerplexity(TypedDict):
    """:func:`paired_perplexity`'s result: pruned / dense and pruned - dense, with intervals."""

    ratio: float
    ratio_lo: float
    ratio_hi: float
    diff: float
    diff_lo: float
    diff_hi: float
    ppl_dense: float
    ppl_pruned: float
    windows: int
    confidence: float
    iters: int
    seed: int
    method: str


class PairedAccuracy(TypedDict):
    """:func:`paired_accuracy`'s result: per task and for the mean, ``{"diff", "lo", "hi", "n", ...}``
    in points (pruned - dense)."""

    tasks: dict[str, dict[str, float]]
    mean: dict[str, float]
    confidence: float
    iters: int
    seed: int
    method: str


class Paired(TypedDict):
    """The paired comparison of a pruned model with its dense one (``tasks.evaluate.paired``)."""

    ppl: PairedPerplexity
    zeroshot: PairedAccuracy | None
    """None when zero-shot is disabled."""
    seconds: NotRequired[float]
    peak_mem_mb: NotRequired[float]
    peak_gpu_mb: NotRequired[float]


def paired_perplexity(
    dense_nll: Sequence[float],
    pruned_nll: Sequence[float],
    tokens: Sequence[float] | float,
    iters: int = ITERS,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> PairedPerplexity:
    """Perplexity ratio and difference pruned vs dense, with paired bootstrap intervals over windows.

    Args:
        dense_nll: summed next-token NLL of each window, dense model.
        pruned_nll: the same windows, pruned model.
        tokens: predicted tokens of each window (one number when all windows are alike).
        iters: bootstrap resamples.
        seed: seed of the resampling.
        confidence: coverage of the intervals.

    Returns:
        ``{"ratio", "ratio_lo", "ratio_hi", "diff", "diff_lo", "diff_hi", "ppl_dense",
        "ppl_pruned", "windows", "confidence", "iters", "seed", "method"}``; ``ratio`` is
        pruned / dense, ``diff`` pruned - dense (perplexity units).

    Raises:
        TopiaryError: the two models were not scored on the same number of windows.
    """
    d, p = _as_vector("dense windows", dense_nll), _as_vector("pruned windows", pruned_nll)
    if d.shape != p.shape:
        raise TopiaryError(f"paired comparison: {d.size} dense and {p.size} pruned windows")
    t = np.broadcast_to(np.asarray(tokens, dtype=np.float64), d.shape)
    sums = _resampled_sums(np.stack([d, p, t], axis=1), iters, np.random.default_rng(seed))
    ppl_d, ppl_p = np.exp(sums[:, 0] / sums[:, 2]), np.exp(sums[:, 1] / sums[:, 2])
    ratio_lo, ratio_hi = _quantiles(np.exp((sums[:, 1] - sums[:, 0]) / sums[:, 2]), confidence)
    diff_lo, diff_hi = _quantiles(ppl_p - ppl_d, confidence)
    dense_ppl, pruned_ppl = math.exp(d.sum() / t.sum()), math.exp(p.sum() / t.sum())
    return {
        "ratio": pruned_ppl / dense_ppl,
        "ratio_lo": ratio_lo,
        "ratio_hi": ratio_hi,
        "diff": pruned_ppl - dense_ppl,
        "diff_lo": diff_lo,
        "diff_hi": diff_hi,
        "ppl_dense": dense_ppl,
        "ppl_pruned": pruned_ppl,
        "windows": int(d.size),
        "confidence": confidence,
        "iters": iters,
        "seed": seed,
        "method": "paired percentile bootstrap over windows",
    }
