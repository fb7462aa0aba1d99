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
from modules.engine.expert_groups import GroupedExperts, expert_count, expert_params, expert_units, ranges
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


def load_block(job: Job, index: int, pruned: list[str], reader: CheckpointReader | None = None) -> nn.Module:
    """Block ``index``'s trunk on the job's device: dense from the checkpoint (or ``reader``), then
    each pruned file applied. Its fused experts stay on the meta device: the passes read them a
    group at a time (:func:`grouped_experts`).

    A pruned file maps full parameter names to new weights, or ``<name>.keep`` to a
    keep-mask (the weight is then zero off the mask).
    """
    model, own, _ = checkpoint_of(job)
    prefix, blocks = find_blocks(model)
    skip = frozenset(expert_params(blocks[index]))
    block = (reader or own).materialize(blocks[index], f"{prefix}.{index}", job.device, skip=skip)
    trunk = {f"{prefix}.{index}.{n}": p for n, p in block.named_parameters() if n not in skip}
    apply_pruned(trunk, pruned, job.device)
    return block


def expert_rows(
    job: Job, where: str, rows: tuple[int, int], pruned: list[str], reader: CheckpointReader | None = None
) -> torch.Tensor:
    """Experts ``a`` to ``b - 1`` (``rows``) of the fused parameter ``where`` (its full name), on the
    job's device, from the checkpoint (or ``reader``), each pruned file's matrices of those experts
    applied (``<where>.<e>``, ``<where>.<e>.keep``: :mod:`modules.engine.expert_groups`)."""
    model, own, _ = checkpoint_of(job)
    tensor = (reader or own).tensor(where, model.get_parameter(where), job.device, rows)
    own.peak_bytes = max(own.peak_bytes, own.resident_bytes + tensor.numel() * tensor.element_size())
    apply_pruned({f"{where}.{e}": tensor[j] for j, e in enumerate(range(*rows))}, pruned, job.device)
    return tensor


def grouped_experts(
    job: Job,
    index: int,
    block: nn.Module,
    pruned: list[str],
    groups: list[tuple[int, int]] | None = None,
    collect: tuple[int, int] | None = None,
    reader: CheckpointReader | None = None,
) -> GroupedExperts | None:
    """How a pass runs block ``index``'s fused experts: ``groups`` (default: all of the run's expert
    groups, :func:`expert_groups`) read from the checkpoint (or ``reader``) with ``pruned`` applied,
    ``collect``'s statistics gathered; None for a block without fused experts."""
    if not expert_params(block):
        return None
    prefix = blocks_of(job)[0]
    own, held = checkpoint_of(job)[1], {}

    def load(name: str, a: int, b: int) -> torch.Tensor:
        rows = expert_rows(job, f"{prefix}.{index}.{name}", (a, b), pruned, reader)
        held[name] = rows.numel() * rows.element_size()  # a group's rows, each replacing the last group's
        own.peak_bytes = max(own.peak_bytes, own.resident_bytes + sum(held.values()))
        return rows

    return GroupedExperts(
        block, load, expert_groups(job, block) if groups is None else groups, collect=collect
    )


def expert_groups(job: Job, block: nn.Module) -> list[tuple[int, int]]:
    """The block's expert groups under the job's ``expert_group`` (none without fused experts)."""
    count = expert_count(block)
    return ranges(count, job.request.expert_group) if count else []


def apply_pruned(params: dict[str, torch.Tensor], pruned: list[str], device: str) -> None:
    """Apply the pruned files, in order, to ``params`` (full parameter names, or ``<name>.<e>``:
    a view of expert ``e``'s matrix of a fused tensor): a new weight under its name, or
    ``<name>.keep``, a keep-mask (the weight is zeroed off it). Only the entries of ``params``
    are read; an update's ``<name>.mask`` (its record of the mask, which its weights hold) is
    not one of them."""
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


def pruning_groups(job: Job, groups: list[list[str]], block: nn.Module) -> list[list[str]]:
    """What of ``block`` is pruned one after another: its linears, each statistics group of
    ``groups`` (linears reading the same input) with ``true_sequential``, else all of them as one;
    then its fused experts, one expert group at a time (units, :func:`modules.engine.expert_groups.unit`),
    the first with the last linears (its statistics come from the same pass)."""
    linear = groups if job.request.true_sequential else [[n for g in groups for n in g]]
    units = expert_units(block, job.request.expert_group)
    if not units:
        return linear
    return [*linear[:-1], linear[-1] + units[0], *units[1:]]
