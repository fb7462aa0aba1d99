"""Perplexity over non-overlapping windows (the WikiText-2 protocol of ALGORITHMS.md).

:func:`perplexity` runs a model in memory; :func:`perplexity_streamed` gives the same
result for a checkpoint read one decoder block at a time (:mod:`modules.engine.streaming`).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn
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


class _Replay(nn.Module):
    """Stands in for a decoder block in the final forward: the first returns the stored
    last hidden states, the others pass theirs on."""

    def __init__(self, block: nn.Module, as_tuple: bool):
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.as_tuple = as_tuple
        if hasattr(block, "attention_type"):  # read by some models' forward to pick the mask
            self.attention_type = block.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.hidden if self.hidden is not None else hidden_states
        return (out,) if self.as_tuple else out


@torch.no_grad()
def perplexity_streamed(
    model_dir: str | Path,
    windows: torch.Tensor,
    device: torch.device | str = "cpu",
    *,
    dtype: torch.dtype | None = None,
    batch_size: int = 8,
    activations: str = "auto",
    activations_dir: str | Path | None = None,
) -> dict:
    """:func:`modules.evaluation.perplexity.perplexity` of a checkpoint, one block in memory at a time.

    Embeddings -> every block on all windows (one block loaded at a time, the hidden
    states in an :class:`ActivationStore`) -> the model's own forward with its blocks
    replaced by replays of the last hidden states, so its final norm, head and any
    post-processing run as in the whole model (the input embeddings are not loaded then:
    the forward is fed zeros as ``inputs_embeds``, which the replay ignores).

    Returns:
        The result dict of :func:`perplexity`.
    """
    from modules.engine.blocks import block_output, find_blocks
    from modules.engine.models import check_finite_weights
    from modules.engine.names import check_device, resolve_model
    from modules.engine.streaming import (
        ActivationStore,
        CheckpointReader,
        capture_block_inputs,
        outer_modules,
        skeleton,
    )

    check_windows(windows, batch_size)
    model_dir = Path(resolve_model(str(model_dir)))
    device = check_device(str(device))
    model = skeleton(model_dir, dtype)
    prefix, blocks = find_blocks(model)
    n = windows.shape[0]
    as_tuple = False
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(CheckpointReader(model_dir, model))
        store, block_args = capture_block_inputs(
            reader,
            model,
            prefix,
            blocks,
            windows,
            device,
            lambda shape, dt: ActivationStore(shape, dt, activations, activations_dir),
        )
        stack.enter_context(store)
        args = block_args.to(device)
        for i, block in enumerate(blocks):
            reader.materialize(block, f"{prefix}.{i}", device)
            try:
                check_finite_weights(block)
                for s in range(0, n, batch_size):
                    out = block(store.inputs[s : s + batch_size].to(device), *args.args, **args.kwargs)
                    as_tuple = isinstance(out, tuple)
                    store.outputs[s : s + batch_size] = block_output(out).to(store.outputs.device)
            finally:
                reader.release(block)
            store.swap()
        embed = model.get_input_embeddings()
        outer = [(nm, m) for nm, m in outer_modules(model, prefix) if m is not embed]
        real = list(blocks)
        replays = [_Replay(b, as_tuple) for b in real]
        per_window: list[float] = []
        try:
            for nm, m in outer:
                reader.materialize(m, nm, device, recurse=False)
                check_finite_weights(m)
            for i, r in enumerate(replays):
                blocks[i] = r
            for s in range(0, n, batch_size):
                hidden = store.inputs[s : s + batch_size].to(device)
                replays[0].hidden = hidden
                logits = model(inputs_embeds=torch.zeros_like(hidden), use_cache=False).logits
                per_window += window_nll(logits, windows[s : s + batch_size])
        finally:
            for i, b in enumerate(real):
                blocks[i] = b
            for _, m in outer:
                reader.release(m, recurse=False)
    return perplexity_result(per_window, windows)
