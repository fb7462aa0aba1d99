"""The stages of a streamed, per-block prune that run or write whole blocks, each from files to files.

The Prefect tasks of ``tasks/`` call them one per block (and per pruning group with
``true_sequential``); with the stages that prune weights (:mod:`modules.engine.weight_stages`)
they compute exactly what the in-memory reference (``tests/engine/oracle.py``) computes,
but no stage holds more than one decoder block, its activations and its statistics, and
every result is a file under the run's folder. :mod:`modules.engine.loop` runs them in order.

- :func:`capture`: the first block's inputs and call arguments, from the embeddings only.
- :func:`statistics`: one pass of block ``i`` (dense, or with its earlier groups pruned)
  over its inputs: each linear's ``sq_norm`` (and ``gram`` when the method needs it); in
  the first pass also the dense outputs (for the reconstruction error) and the groups.
- :func:`propagate`: the pruned block over its inputs: the next block's inputs, the
  block's reconstruction error and its shard of the output checkpoint.
- :func:`assemble`: the output folder: the blocks' shards, the tensors outside the blocks,
  the index, config, tokenizer, masks and report.
- :func:`replay`: a finished block's outputs again, from its verified shard, for a resume
  whose next inputs were damaged (:mod:`modules.engine.state` checks the records).

A stage's outputs are written to temporary names and renamed (:mod:`modules.process`), so
a killed stage leaves nothing under a final name and its re-run starts clean.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from modules.engine.blocks import (
    ROUTER,
    block_experts,
    block_linears,
    block_matrices,
    expert_matrix,
    find_blocks,
)
from modules.engine.files import hidden_states, load, masks_in, read_one, save, save_shared
from modules.engine.job import (
    blocks_of,
    checkpoint_of,
    load_block,
    load_block_args,
    pruning_groups,
    release,
    trainer_of,
)
from modules.engine.masks import blocks_path
from modules.engine.ranks import from_zero, writes
from modules.engine.report import BlockReport, LinearReport, PruneReport
from modules.engine.request import Job
from modules.engine.statistics import run_pass
from modules.engine.streaming import (
    ActivationStore,
    ShardWriter,
    block_tensors,
    capture_block_inputs,
    save_model_files,
)
from modules.errors import TopiaryError
from modules.process import building, pause_point, write_file


def capture(job: Job, calib_path: str) -> dict:
    """The first block's inputs (``inputs-0000.safetensors``) and other arguments (``args.pt``).

    The arguments (attention mask, rotary tables, cache positions) are the same for every
    window and block; they are pickled with ``torch.save`` into the run's own folder.
    """

    input_ids = load(calib_path)["input_ids"]
    model, reader, _ = checkpoint_of(job)
    prefix, blocks = find_blocks(model)
    stores = []

    def store_of(shape, dtype):

        stores.append(ActivationStore(shape, dtype, "memory", device="cpu"))
        return stores[-1]

    store, block_args = capture_block_inputs(
        reader, model, prefix, blocks, input_ids, torch.device(job.device), store_of
    )
    try:
        inputs = save({"hidden": store.inputs}, job.path / "acts" / "inputs-0000.safetensors")
        args = job.path / "acts" / "args.pt"
        with building(args) as tmp:
            torch.save({"args": list(block_args.to("cpu").args), "kwargs": block_args.to("cpu").kwargs}, tmp)
    finally:
        store.close()
    return {"inputs": str(inputs), "args": str(args), "blocks": len(blocks), "prefix": prefix}


def statistics(
    job: Job,
    index: int,
    group: int,
    inputs: str,
    args: str,
    pruned: list[str],
    groups: list[list[str]] | None = None,
) -> dict:
    """Statistics of block ``index``'s linears of pruning group ``group`` (:func:`pruning_groups`
    of ``groups``; all of the block's linears with ``group=0``).

    Group 0 runs the dense block: it also writes the dense outputs (``dense-*.safetensors``)
    and finds the statistics groups (``groups``: linears reading the same input). A later
    group (true-sequential) runs the block with the earlier groups' pruned weights (``pruned``).
    """
    request = job.request
    t = time.perf_counter()
    block = load_block(job, index, pruned)
    try:
        hidden = hidden_states(inputs, job.device, job.activations)
        linears = block_linears(block, routers=request.routers)
        run = {
            "block_args": load_block_args(args, job.device),
            "gram": "gram" in request.needs(),
            "batch_size": request.batch_size,
        }
        last = group == 0 or group == len(groups) - 1  # group 0 may be the last one: groups come from it
        run["experts"] = request.moe_calibration if last else None
        dense = None
        if group == 0:
            outputs = torch.zeros_like(hidden)
            first = run_pass(trainer_of(job), block, hidden, collect=set(linears), outputs=outputs, **run)
            missing = [n for n in linears if n not in first.stats]
            if missing:
                never = ", ".join(missing)
                raise TopiaryError(f"block {index}: linears never called in its forward: {never}")
            groups = [g for g in ([n for n in g if n in linears] for g in first.groups) if g]
            dense = str(
                save_shared({"hidden": outputs}, job.path / "acts" / f"dense-{index:04d}.safetensors")
            )
            stats, experts = first.stats, first.experts
        else:
            names = set(pruning_groups(job, groups)[group])
            result = run_pass(trainer_of(job), block, hidden, collect=names, **run)
            stats, experts = result.stats, result.experts
        ordered = pruning_groups(job, groups)
        names = ordered[group]
        tensors = dict(experts) if group == len(ordered) - 1 else {}  # the experts are pruned last
        seen = _expert_counts(tensors, request.moe_calibration)
        for n in names:
            s = stats[n]
            tensors[f"{n}.sq_norm"] = s.sq_norm
            tensors[f"{n}.tokens"] = torch.tensor(s.tokens)
            if s.gram is not None:
                tensors[f"{n}.gram"] = s.gram
        path = save_shared(tensors, job.path / "stats" / f"{index:04d}-{group}.safetensors")
        pause_point("statistics")  # test hook: the statistics of a block are durable
    finally:
        release(job, block)
    return {
        "stats": str(path),
        "dense": dense,
        "groups": groups,
        "linears": names,
        "experts": seen,
        "seconds": round(time.perf_counter() - t, 4),
    }


def _expert_counts(tensors: dict[str, torch.Tensor], mode: str) -> dict[str, dict]:
    """For the report, per fused expert tensor: the tokens routed to each expert and the statistics
    each was pruned on (``routed``, or ``all`` where the policy fell back or ``all`` was asked)."""
    out = {}
    for key, routed in tensors.items():
        if key.endswith(".routed"):
            name = key.removesuffix(".routed")
            fell = tensors[f"{name}.fallback"].tolist()
            out[name] = {
                "routed_tokens": routed.tolist(),
                "statistics": ["all" if mode == "all" or f else "routed" for f in fell],
            }
    return out


def propagate(
    job: Job,
    index: int,
    inputs: str | None,
    args: str | None,
    dense: str | None,
    pruned: list[str],
    setting: dict,
) -> dict:
    """Run the pruned block on its inputs: the next inputs, the error, the block's output shard.

    With ``inputs=None`` (a data-free method) nothing runs: the block is only written.
    ``setting`` holds the block's ``target``, ``setting`` and ``groups`` for its report.
    """

    t = time.perf_counter()
    model, reader, saved = checkpoint_of(job)
    prefix, blocks = find_blocks(model)
    block = load_block(job, index, pruned)
    try:
        error, outputs = None, None
        if inputs is not None:
            hidden = hidden_states(inputs, job.device, job.activations)
            reference = hidden_states(dense, job.device, job.activations)
            request = job.request
            last = run_pass(
                trainer_of(job),
                block,
                hidden,
                load_block_args(args, job.device),
                outputs=reference,
                reference=reference,
                batch_size=request.batch_size,
            )
            error = math.sqrt(last.err_sq / last.ref_sq) if last.ref_sq else 0.0
            path = job.path / "acts" / f"inputs-{index + 1:04d}.safetensors"
            outputs = str(save_shared({"hidden": reference}, path))
        name = f"{prefix}.{index}"
        routers = job.request.routers
        per_linear = {n: zeros_of(lin.weight) for n, lin in block_linears(block, routers=routers).items()}
        for pname, transposed in block_experts(block).items():  # each expert's matrix, as written
            param = block.get_parameter(pname)
            per_linear |= {
                f"{pname}.{e}": zeros_of(expert_matrix(param, e, transposed)) for e in range(len(param))
            }
        kinds = block_matrices(block, routers)
        dense = {p: zeros_of(w) for p, w in block.named_parameters() if kinds.get(p) == ROUTER}
        tensors = block_tensors(reader, block, name, saved)
        written = [zeros_of(v) for v in tensors.values()]
        writer = ShardWriter(job.path / "shards", len(blocks) + 1)
        shard = job.path / "shards" / writer.shard_name(index + 1)
        if writes():
            shard = writer.write(index + 1, tensors)
        del tensors
    finally:
        release(job, block)
    report = BlockReport(
        index,
        name,
        setting["target"],
        setting["setting"],
        per_linear,
        setting["groups"],
        error,
        {"propagate": round(time.perf_counter() - t, 4)},
        dense=dense,
        zeros=sum(w.pruned for w in written),
        params=sum(w.numel for w in written),
        experts=setting.get("experts", {}),
    )
    return {"inputs": outputs, "shard": str(shard), "report": report.to_dict()}


def zeros_of(tensor: torch.Tensor) -> LinearReport:
    """A tensor's shape and its zeros (``count_nonzero``: a bool ``sum()`` would copy it to int64)."""
    return LinearReport(list(tensor.shape), tensor.numel() - int(torch.count_nonzero(tensor)))


def replay(job: Job, index: int, inputs: str, args: str, shard: str) -> str:
    """Block ``index``'s outputs (the next block's inputs) recomputed from its verified shard:
    the pruned block, run over its inputs as :func:`propagate` ran it, so the same bytes.

    For a resume whose next inputs were damaged or discarded (:mod:`modules.engine.state`);
    the inputs read here are removed once the outputs are written.
    """

    prefix, _ = blocks_of(job)
    block = load_block(job, index, [])
    try:
        params = {f"{prefix}.{index}.{n}": p for n, p in block.named_parameters()}
        stored = load(shard, job.device, params)
        if stored.keys() != params.keys():
            lacking = sorted(params.keys() - stored.keys())[0]
            raise TopiaryError(
                f"resume state: {shard} holds no {lacking}; run `topiary clean` and start again"
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(stored.pop(name))
        hidden = hidden_states(inputs, job.device, job.activations)
        outputs = torch.zeros_like(hidden, device=job.device)
        run_pass(
            trainer_of(job),
            block,
            hidden,
            load_block_args(args, job.device),
            outputs=outputs,
            batch_size=job.request.batch_size,
        )
        path = save_shared({"hidden": outputs}, job.path / "acts" / f"inputs-{index + 1:04d}.safetensors")
    finally:
        release(job, block)
    from_zero(Path(inputs).unlink, missing_ok=True)
    return str(path)


def block_report(job: Job, index: int, setting: dict, masks_files: list[str], propagated: dict) -> dict:
    """The block's report with the per-linear counts of its masks (zeros the method kept count as kept)."""
    report = BlockReport.from_dict(propagated["report"])
    masks = masks_in(masks_files)
    for lname, lin in report.linears.items():
        where = masks.get(f"{report.name}.{lname}.weight")
        if where is not None:
            keep = read_one(*where[:2])  # count_nonzero: a bool sum() makes an int64 copy
            report.linears[lname] = LinearReport(lin.shape, keep.numel() - int(torch.count_nonzero(keep)))
    return report.to_dict()


def saved_parameters(model: nn.Module, saved: set[str]) -> int:
    """The parameters of the tensors ``save_pretrained`` writes (``saved``: tied copies left out),
    as its index counts them; not ``model.num_parameters()``, which counts a tied head again
    once loading has untied it."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return sum(params[name].numel() for name in saved if name in params)


def assemble(job: Job, out_dir: str | Path, report: dict, masks_files: list[str]) -> Path:
    """The output folder, built in a temporary sibling and renamed: weights, index, config, tokenizer,
    keep-masks (``masks/block_{i:04d}.safetensors``) and ``pruning_report.json``."""

    model, reader, keep = checkpoint_of(job)
    prefix, blocks = find_blocks(model)
    with building(Path(out_dir)) as tmp:
        writer = ShardWriter(tmp, len(blocks) + 1)
        for k in range(1, len(blocks) + 1):
            shutil.copyfile(job.path / "shards" / writer.shard_name(k), tmp / writer.shard_name(k))
        pause_point("save")  # test hook: the blocks' shards are in the temporary folder
        outside = [k for k in keep if not k.startswith(f"{prefix}.")]
        outer = {k: reader.tensor(k, model.get_parameter_or_buffer(k)) for k in outside}
        counts = [zeros_of(v) for v in outer.values()]
        report = {
            **report,
            "outside": {"zeros": sum(c.pruned for c in counts), "params": sum(c.numel for c in counts)},
        }
        report["model_zeros"] = PruneReport.from_dict(report).model_zeros
        if reader.fp8_block:
            block, dtype = "x".join(map(str, reader.fp8_block)), str(model.dtype).removeprefix("torch.")
            report["dequantized"] = f"FP8 weights with {block} block scales, dequantized, written as {dtype}"
        writer.write(len(blocks) + 1, reader.written(outer))
        del outer
        writer.finish(saved_parameters(model, keep))
        save_model_files(model, job.model_dir, tmp)
        (tmp / "masks").mkdir(exist_ok=True)
        for path in masks_files:  # each block's final masks, already in their output form
            shutil.copyfile(path, blocks_path(tmp / "masks", int(Path(path).name[:4])))
        write_file(tmp / "pruning_report.json", json.dumps(report, indent=2))
        mode = (tmp / "config.json").stat().st_mode & 0o777  # the umask's, not the temporary files' 0600
        for path in tmp.rglob("*.safetensors"):
            path.chmod(mode)
        (tmp / "model.safetensors.index.json").chmod(mode)
    return Path(out_dir)
