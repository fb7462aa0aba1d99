"""What the stages of one streamed prune share, per thread: the checkpoint's
skeleton and the Trainer of its passes (the :class:`modules.engine.request.Job` says which); a
block or its call arguments loaded for a stage.

The skeleton and the Trainer are mutable state, cached per thread
(:func:`open_checkpoint`, :func:`trainer_of`): runs of one process share neither, so two
sweep steps on one Dask or thread-pool worker each load blocks into their own skeleton
and run their own Trainer.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import nn

from modules.engine.blocks import BlockArgs, find_blocks
from modules.engine.files import load
from modules.engine.models import DTYPES
from modules.engine.request import Job
from modules.engine.statistics import joined, make_trainer
from modules.engine.streaming import CheckpointReader, saved_names, skeleton


def _per_thread(fn: Callable) -> Callable:
    """``fn`` cached per thread, two entries (keys) per thread: see the module docstring."""
    local = threading.local()

    @functools.wraps(fn)
    def cached(*key):
        entries = local.__dict__.setdefault("entries", {})
        if key not in entries:
            if len(entries) >= 2:
                entries.pop(next(iter(entries)))
            entries[key] = fn(*key)
        return entries[key]

    return cached


@_per_thread
def open_checkpoint(model_dir: str, dtype: str) -> tuple[nn.Module, CheckpointReader, set[str]]:
    """The meta-device skeleton of ``model_dir``, its reader and the names ``save_pretrained``
    writes (tied copies left out), one per thread and checkpoint."""
    model = skeleton(model_dir, DTYPES[dtype])
    saved = set(saved_names(model))  # before any load: loading unties tied weights
    return model, CheckpointReader(model_dir, model), saved


def checkpoint_of(job: Job) -> tuple[nn.Module, CheckpointReader, set[str]]:
    """:func:`open_checkpoint` of the job's checkpoint and dtype."""
    return open_checkpoint(job.model_dir, job.dtype)


def blocks_of(job: Job) -> tuple[str, nn.ModuleList]:
    """The decoder blocks' prefix and the (meta) blocks of the job's model."""
    return find_blocks(checkpoint_of(job)[0])


def trainer_of(job: Job) -> L.Trainer:
    """The Trainer of the job's passes: the DDP one this process joined, else one per device."""
    return joined() or _trainer_on(job.device)


@_per_thread
def _trainer_on(device: str) -> L.Trainer:
    """One Trainer per device and thread, kept for every stage the thread runs (a Trainer
    holds on to the blocks it ran)."""
    return make_trainer(torch.device(device))


def load_block(job: Job, index: int, pruned: list[str]) -> nn.Module:
    """Block ``index`` on the job's device: dense from the checkpoint, then each pruned file applied.

    A pruned file maps full parameter names to new weights, or ``<name>.keep`` to a
    keep-mask (the weight is then zero off the mask).
    """
    model, reader, _ = checkpoint_of(job)
    prefix, blocks = find_blocks(model)
    block = reader.materialize(blocks[index], f"{prefix}.{index}", job.device)
    apply_pruned({f"{prefix}.{index}.{n}": p for n, p in block.named_parameters()}, pruned, job.device)
    return block


def apply_pruned(params: dict[str, torch.Tensor], pruned: list[str], device: str) -> None:
    """Apply the pruned files, in order, to ``params`` (full parameter names): a new weight
    under its name, or ``<name>.keep``, a keep-mask (the weight is zeroed off it). Only the
    entries of ``params`` are read; an update's ``<name>.mask`` (its record of the mask, which
    its weights hold) is not one of them."""
    with torch.no_grad():
        for path in pruned:
            for name, param in params.items():  # one tensor read at a time, never a block's
                found = load(path, device, [name, f"{name}.keep"])
                if name in found:
                    param.copy_(found[name])
                if f"{name}.keep" in found:
                    param.masked_fill_(found[f"{name}.keep"].logical_not_(), 0)
                del found


def release(job: Job, module: nn.Module, recurse: bool = True) -> None:
    """Put ``module`` (a block, or with ``recurse=False`` one linear) back on the meta device."""
    checkpoint_of(job)[1].release(module, recurse=recurse)


def load_block_args(path: str | Path, device: str) -> BlockArgs:
    """The blocks' call arguments that :func:`modules.engine.stages.capture` pickled (the run's own file)."""
    args = torch.load(str(path), map_location=device, weights_only=False)
    return BlockArgs(tuple(args["args"]), dict(args["kwargs"]))


def pruning_groups(job: Job, groups: list[list[str]]) -> list[list[str]]:
    """The linears of a block in the groups pruned one after another: each statistics group of
    ``groups`` (linears reading the same input) with ``true_sequential``,
    else all of them as one."""
    return groups if job.request.true_sequential else [[n for g in groups for n in g]]
