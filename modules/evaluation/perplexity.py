"""Perplexity over non-overlapping windows (the WikiText-2 protocol of ALGORITHMS.md)."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from modules.errors import TopiaryError


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """exp(mean next-token NLL) over all windows, accumulated in fp64 on the host.

    Returns ``{"ppl", "nll", "tokens", "windows", "seqlen", "window_nll"}``; ``tokens``
    counts the predicted positions (seqlen - 1 per window); ``window_nll`` is each window's
    summed NLL, in window order, what a paired comparison of two models over the same
    windows needs (:func:`modules.evaluation.intervals.paired_perplexity`).

    Raises:
        TopiaryError: bad windows or batch size, a weight holding NaN/Inf (named), or a
            non-finite result.
    """
    from modules.engine.models import check_finite_weights

    check_windows(windows, batch_size)
    check_finite_weights(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_window: list[float] = []
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=f"ppl@{windows.shape[1]}", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        per_window += window_nll(model(input_ids=batch).logits, batch)
    model.train(was_training)
    return perplexity_result(per_window, windows)


def check_windows(windows: torch.Tensor, batch_size: int) -> None:
    """Raise a :class:`TopiaryError` unless windows are ``(n >= 1, seqlen >= 2)`` and ``batch_size >= 1``."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise TopiaryError(f"windows: shape {tuple(windows.shape)} is not (n >= 1, seqlen >= 2)")
    if batch_size < 1:
        raise TopiaryError(f"batch_size: {batch_size} must be at least 1")


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> list[float]:
    """Each window's summed next-token NLL (fp64) from its ``logits`` ``(b, seq, vocab)``."""
    logits = logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch[:, 1:].reshape(-1).to(logits.device),
        reduction="none",
    )
    return nll.view(batch.shape[0], -1).double().sum(dim=1).tolist()


def perplexity_result(per_window: list[float], windows: torch.Tensor) -> dict:
    """The result dict of :func:`perplexity` from the windows' summed NLLs."""
    from modules.engine.models import check_finite_metric

    count = windows.shape[0] * (windows.shape[1] - 1)
    mean = check_finite_metric(f"ppl@{windows.shape[1]}: mean NLL", math.fsum(per_window) / count)
    return {
        "ppl": check_finite_metric(f"ppl@{windows.shape[1]}", math.exp(mean)),
        "nll": mean,
        "tokens": count,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "window_nll": per_window,
    }
