"""Perplexity over non-overlapping windows (the WikiText-2 protocol of ALGORITHMS.md).

:func:`perplexity` runs a model in memory; :func:`perplexity_streamed` gives the same
result for a checkpoint read one decoder block at a time (:mod:`modules.engine.streaming`).
Both compute the logits a few positions at a time (:func:`head_nll`), so host memory does not
grow with vocabulary x window x batch.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import NotRequired, TypedDict

import torch
from torch import nn
from tqdm import tqdm

from modules.engine.blocks import block_output, find_blocks, head_logits
from modules.engine.models import check_finite_metric, check_finite_weights
from modules.engine.names import check_device, resolve_model
from modules.engine.streaming import (
    ActivationStore,
    CheckpointReader,
    capture_block_inputs,
    outer_modules,
    skeleton,
)
from modules.errors import TopiaryError

# Bound on one chunk's fp32 logits (rows x vocab x 4 bytes), see head_chunk. The head's output,
# its fp32 copy and cross-entropy's log-softmax each hold one such tensor, so the evaluation's
# transient memory beyond the hidden states is about three times this.
HEAD_CHUNK_BYTES = 64 * 2**20


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
    windows needs (:func:`modules.evaluation.intervals.paired_perplexity`). The base model
    runs each batch without the head; :func:`head_nll` then scores the last block's output.

    Raises:
        TopiaryError: bad windows or batch size, a weight holding NaN/Inf (named), or a
            non-finite result.
    """

    check_windows(windows, batch_size)
    check_finite_weights(model)
    device = next(model.parameters()).device
    _, blocks = find_blocks(model)
    was_training = model.training
    model.eval()
    per_window: list[float] = []
    batches = range(0, windows.shape[0], batch_size)
    try:
        for start in tqdm(batches, desc=f"ppl@{windows.shape[1]}", disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(device)
            per_window += head_nll(model, blocks, *last_hidden(model, blocks, batch), batch)
    finally:
        model.train(was_training)
    return perplexity_result(per_window, windows)


def check_windows(windows: torch.Tensor, batch_size: int) -> None:
    """Raise a :class:`TopiaryError` unless windows are ``(n >= 1, seqlen >= 2)`` and ``batch_size >= 1``."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise TopiaryError(f"windows: shape {tuple(windows.shape)} is not (n >= 1, seqlen >= 2)")
    if batch_size < 1:
        raise TopiaryError(f"batch_size: {batch_size} must be at least 1")


def head_chunk(batch: int, vocab: int) -> int:
    """Positions per head call: the most whose fp32 logits (batch x positions x vocab x 4
    bytes) fit in :data:`HEAD_CHUNK_BYTES`, at least one."""
    return max(1, HEAD_CHUNK_BYTES // (batch * vocab * 4))


def last_hidden(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """The last block's output on ``input_ids`` from the base model (no head), and whether
    the blocks return tuples (what :func:`modules.engine.blocks.head_logits` replays)."""

    last: dict = {}

    def keep(_module, _args, out):
        last.update(hidden=block_output(out), as_tuple=isinstance(out, tuple))

    hook = blocks[-1].register_forward_hook(keep)
    try:
        model.base_model(input_ids=input_ids, use_cache=False)
    finally:
        hook.remove()
    return last["hidden"], last["as_tuple"]


def head_nll(
    model: nn.Module,
    blocks: nn.ModuleList,
    hidden: torch.Tensor,
    as_tuple: bool,
    batch: torch.Tensor,
) -> list[float]:
    """Each window's summed next-token NLL (fp64) from the last block's output ``hidden`` ``(b, seq, d)``.

    The logits (:func:`head_logits`) are computed on :func:`head_chunk` positions at a time:
    position ``t`` is scored against token ``t + 1``, the last position predicts nothing.
    Each token's NLL is computed in fp32 from fp32 logits and the window's sum taken in fp64
    over all its tokens at once, as from the whole logits tensor.
    """
    n, seq = batch.shape
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    step = head_chunk(n, vocab)
    nll = []
    for s in range(0, seq - 1, step):
        e = min(s + step, seq - 1)
        logits = head_logits(model, blocks, hidden[:, s:e], as_tuple).float()
        targets = batch[:, s + 1 : e + 1].reshape(-1).to(logits.device)
        token_nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets, reduction="none"
        )
        nll.append(token_nll.view(n, -1))
    return torch.cat(nll, dim=1).double().sum(dim=1).tolist()


class Perplexity(TypedDict):
    """A perplexity result (its JSON form: a task persists it, MLflow logs it in ``evaluation.json``)."""

    ppl: float
    nll: float
    """Mean next-token NLL."""
    tokens: int
    """Predicted tokens."""
    windows: int
    seqlen: int
    """Window length in tokens."""
    window_nll: list[float]
    """Each window's summed NLL, in order (what a paired comparison reads)."""
    seconds: NotRequired[float]
    """This and the fields below: added by the task (``tasks.evaluate.perplexity``)."""
    peak_mem_mb: NotRequired[float]
    peak_gpu_mb: NotRequired[float]
    provenance: NotRequired[dict[str, str]]
    streamed: NotRequired[bool]


def perplexity_result(per_window: list[float], windows: torch.Tensor) -> Perplexity:
    """The result of :func:`perplexity` from the windows' summed NLLs."""

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
        per_window: list[float] = []
        try:
            for nm, m in outer:
                reader.materialize(m, nm, device, recurse=False)
                check_finite_weights(m)
            for s in range(0, n, batch_size):
                hidden = store.inputs[s : s + batch_size].to(device)
                per_window += head_nll(
                    model, blocks, hidden, as_tuple, windows[s : s + batch_size].to(device)
                )
        finally:
            for _, m in outer:
                reader.release(m, recurse=False)
    return perplexity_result(per_window, windows)
