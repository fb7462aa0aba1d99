"""The streamed passes over the whole model that come before the per-block stages.

- :func:`owl_rates`: OWL's dense pass, the per-block sparsity rates.
- :func:`gradients`: GBLM's gradient aggregates by a block-wise backward over the checkpoint.

Each holds one decoder block at a time (with the modules outside the blocks for the
backward), read from the checkpoint when needed and released after.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from modules.engine.backward import blockwise_gradients
from modules.engine.blocks import BlockArgs, block_experts, block_linears, find_blocks
from modules.engine.experts import each_expert
from modules.engine.files import load
from modules.engine.job import (
    blocks_of,
    expert_groups,
    expert_rows,
    grouped_experts,
    load_block,
    load_block_args,
    open_checkpoint,
    release,
    trainer_of,
)
from modules.engine.models import DTYPES
from modules.engine.ranks import from_zero, rank_and_world, writes
from modules.engine.request import Job
from modules.engine.stages import capture
from modules.engine.statistics import run_pass
from modules.engine.streaming import available_memory, outer_modules
from modules.errors import TopiaryError
from modules.process import large_allocations_mapped, remove_stale, temp_sibling
from modules.pruning.owl import owl_rates as rates_of
from modules.pruning.owl import streamed_outlier_ratio
from modules.pruning.sparsity import check_finite, overflow_hint
from modules.pruning.wanda import wanda_scores


def owl_rates(job: Job, calib: str) -> dict:
    """OWL's dense pass, streamed: per-block outlier ratios of Wanda scores, and the rates.

    The same computation as the in-memory reference's (``tests/engine/oracle.py``), one
    block in memory at a time; its activations stay in memory (OWL needs the whole dense
    pass before the first block is pruned).
    """
    request = job.request
    if request.spec.is_nm:
        raise TopiaryError(f"owl: needs an unstructured sparsity rate, not pattern {request.spec}")
    owl_job = Job(job.model_dir, job.dtype, job.device, str(job.path / "owl"), job.request, job.nsamples)
    captured = from_zero(capture, owl_job, calib)
    hidden = load(captured["inputs"], job.device)["hidden"]
    block_args = load_block_args(captured["args"], job.device)
    ratios = []
    try:
        for i in range(captured["blocks"]):
            block = load_block(job, i, [])
            try:
                outputs = torch.zeros_like(hidden)
                ratios.append(_owl_ratio(job, i, block, hidden, block_args, outputs))
                hidden = outputs
            finally:
                release(job, block)
    finally:
        from_zero(shutil.rmtree, owl_job.path, ignore_errors=True)  # each rank has read it
    rates = rates_of(ratios, request.spec.rate, request.owl_lambda)
    return {"m": request.owl_m, "lambda": request.owl_lambda, "ratios": ratios, "rates": rates}


def _owl_ratio(
    job: Job, index: int, block: nn.Module, hidden: torch.Tensor, block_args: BlockArgs, outputs: torch.Tensor
) -> float:
    """Block ``index``'s outlier ratio of Wanda scores, from one dense pass over ``hidden`` (its
    outputs go to ``outputs``) and one more per later expert group, each collecting only that
    group's per-expert sums: every expert's matrix is scored on its own statistics (under
    ``moe_calibration``), read again one group of one fused tensor at a time for each sweep of
    :func:`streamed_outlier_ratio`."""
    request, linears = job.request, block_linears(block, routers=job.request.routers)
    groups = expert_groups(job, block)
    run = {"block_args": block_args, "batch_size": request.batch_size,
           "experts": request.moe_calibration if groups else None}  # fmt: skip
    first = run_pass(trainer_of(job), block, hidden, collect=set(linears), outputs=outputs,
                     grouped=grouped_experts(job, index, block, [], collect=groups[0] if groups else None),
                     **run)  # fmt: skip
    sums = [first.experts]
    for rows in groups[1:]:
        grouped = grouped_experts(job, index, block, [], [rows], rows)
        sums.append(run_pass(trainer_of(job), block, hidden, collect=set(), grouped=grouped, **run).experts)
    for lname, lin in linears.items():
        hint = overflow_hint(lin.weight.dtype)
        check_finite(f"block {index} {lname} input statistics", first.stats[lname].sq_norm, hint=hint)
    prefix = blocks_of(job)[0]

    def scores():
        for lname, lin in linears.items():
            yield wanda_scores(lin.weight.detach(), first.stats[lname].sq_norm)
        for pname, transposed in block_experts(block).items():  # tensor by tensor, experts in order
            where = f"{prefix}.{index}.{pname}"
            for rows, group in zip(groups, sums, strict=True):
                tensor = expert_rows(job, where, rows, [])
                for _, W, layer in each_expert(tensor, pname, where, transposed, group, first=rows[0]):
                    yield wanda_scores(W, layer.sq_norm, overwrite=True)
                del tensor

    return streamed_outlier_ratio(scores, request.owl_m)


@large_allocations_mapped()
def gradients(
    model_dir: str,
    dtype: str,
    device: str,
    input_ids: torch.Tensor,
    directory: str | Path,
    activations: str = "auto",
    state: str | Path | None = None,
    log: logging.Logger | logging.LoggerAdapter | None = None,
) -> Path:
    """GBLM's gradient aggregates without the whole model: :func:`modules.engine.backward.blockwise_gradients`
    on the checkpoint's skeleton, each block read when a sweep needs it and released after.

    Holds the embeddings, final norm and head (the modules outside the blocks), one block,
    and the blocks' inputs: on the host (``activations="memory"``) or in files of the resume
    state, mapped back one block at a time (``mmap``: a disk of about ``2 sqrt(n_blocks)``
    block inputs instead of memory, for one more forward sweep); ``auto`` maps when all
    blocks' inputs need more than half the available memory.

    ``state`` is the resume folder (see ``blockwise_gradients``; this rank's files go in a
    subfolder named after the device type and the world, and those of another device or
    world are removed). None: a temporary folder beside ``directory``, removed at the end,
    and a killed call starts again. ``log`` says where the inputs are and where a call
    resumes (default: the ``topiary`` logger).
    """
    model, reader, _ = open_checkpoint(model_dir, dtype)
    prefix, blocks = find_blocks(model)
    outer = outer_modules(model, prefix)
    live: list[int] = []

    def block_of(i: int) -> nn.Module:
        for j in live:
            reader.release(blocks[j])
        live[:] = [i]
        return reader.materialize(blocks[i], f"{prefix}.{i}", device)

    kind = _gradient_inputs(model, len(blocks), input_ids, dtype, activations)
    log = log or logging.getLogger("topiary")
    where = "in memory" if kind == "memory" else "on disk by segments (one more forward)"
    if writes():
        log.info("gradients: block inputs %s (activations: %s)", where, activations)
    root, folder = (
        _gradient_state(state, directory, device) if state is not None or kind == "mmap" else (None, None)
    )
    for name, module in outer:
        reader.materialize(module, name, device, recurse=False)
    try:
        return blockwise_gradients(
            model,
            input_ids,
            directory,
            load_block=block_of,
            state=folder,
            in_memory=kind == "memory",
            log=log,
        )
    finally:
        if state is None and root is not None:
            shutil.rmtree(root, ignore_errors=True)
        for j in live:
            reader.release(blocks[j])
        for _, module in outer:
            reader.release(module, recurse=False)


def _gradient_inputs(
    model: nn.Module, blocks: int, input_ids: torch.Tensor, dtype: str, activations: str
) -> str:
    """Where the block-wise backward holds the blocks' inputs: ``activations``, or for ``auto``
    ``mmap`` when all blocks' inputs need more than half the available memory."""
    if activations != "auto":
        return activations
    width = model.get_input_embeddings().embedding_dim
    need = blocks * input_ids.numel() * width * DTYPES[dtype].itemsize
    return "mmap" if need > 0.5 * available_memory() else "memory"


def _gradient_state(state: str | Path | None, directory: str | Path, device: str) -> tuple[Path, Path]:
    """The resume folder (``state``, else a temporary sibling of ``directory``) and this rank's
    subfolder in it; another device type's or world's subfolders are removed."""
    rank, world = rank_and_world()
    root = Path(state) if state else temp_sibling(Path(directory).resolve().parent / "grads-state")
    mine = f"{torch.device(device).type}-of-{world}"
    if writes() and root.is_dir():
        for other in root.glob("*-rank*"):
            if other.is_dir() and other.name.rpartition("-rank")[0] != mine:
                shutil.rmtree(other, ignore_errors=True)
    folder = root / f"{mine}-rank{rank}"
    if folder.is_dir():
        remove_stale([folder])  # a killed write's temporary file
    return root, folder
