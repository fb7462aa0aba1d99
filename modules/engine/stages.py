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
from modules.engine.expert_groups import expert_params, parse_unit
from modules.engine.files import hidden_states, load, masks_in, read_one, save, save_shared
from modules.engine.job import (
    blocks_of,
    checkpoint_of,
    expert_groups,
    expert_rows,
    grouped_experts,
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
    CheckpointReader,
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
    """Statistics of block ``index``'s pruning group ``group`` (:func:`pruning_groups` of ``groups``):
    of its linears, and of its experts' group when it holds one (its units).

    Group 0 runs the dense block: it also writes the dense outputs (``dense-*.safetensors``)
    and finds the statistics groups (``groups``: linears reading the same input). A later
    group runs the block with ``pruned`` applied (true-sequential: the earlier groups'); a group
    of experts alone runs only its experts (their inputs do not depend on any expert).
    """
    request = job.request
    t = time.perf_counter()
    meta = blocks_of(job)[1][index]
    block = load_block(job, index, pruned)
    try:
        hidden = hidden_states(inputs, job.device, job.activations)
        linears = block_linears(block, routers=request.routers)
        ordered = pruning_groups(job, groups or [list(linears)], meta)
        names = [n for n in ordered[group] if parse_unit(n) is None]
        units = [parse_unit(n) for n in ordered[group] if parse_unit(n) is not None]
        rows = units[0][1:] if units else None
        run = {
            "block_args": load_block_args(args, job.device),
            "gram": "gram" in request.needs(),
            "batch_size": request.batch_size,
            "experts": request.moe_calibration if rows else None,
        }
        dense = None
        if group == 0:
            outputs = torch.zeros_like(hidden)
            grouped = grouped_experts(job, index, block, pruned, collect=rows)
            first = run_pass(trainer_of(job), block, hidden, collect=set(linears), outputs=outputs,
                             grouped=grouped, **run)  # fmt: skip
            missing = [n for n in linears if n not in first.stats]
            if missing:
                never = ", ".join(missing)
                raise TopiaryError(f"block {index}: linears never called in its forward: {never}")
            groups = [g for g in ([n for n in g if n in linears] for g in first.groups) if g]
            dense = str(
                save_shared({"hidden": outputs}, job.path / "acts" / f"dense-{index:04d}.safetensors")
            )
            ordered = pruning_groups(job, groups, meta)  # the experts' first group may come later
            names = [n for n in ordered[group] if parse_unit(n) is None]
            held = any(parse_unit(n) is not None for n in ordered[group])
            stats, experts = first.stats, first.experts if held else {}
            rows = rows if held else None
        else:
            grouped = grouped_experts(job, index, block, pruned, [rows] if rows else [], rows)
            result = run_pass(trainer_of(job), block, hidden, collect=set(names), grouped=grouped, **run)
            stats, experts = result.stats, result.experts
        tensors = dict(experts)
        seen = _expert_counts(tensors, request.moe_calibration, rows[0] if rows else 0)
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
        "linears": ordered[group],
        "experts": seen,
        "seconds": round(time.perf_counter() - t, 4),
    }


def _expert_counts(tensors: dict[str, torch.Tensor], mode: str, first: int) -> dict[str, dict]:
    """For the report, per fused expert tensor: the tokens routed to each expert of a group (from
    expert ``first``) and the statistics each was pruned on (``routed``, or ``all`` where the
    policy fell back or ``all`` was asked)."""
    out = {}
    for key, routed in tensors.items():
        if key.endswith(".routed"):
            name = key.removesuffix(".routed")
            fell = tensors[f"{name}.fallback"].tolist()
            out[name] = {
                "first": first,
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
            last = run_pass(
                trainer_of(job),
                block,
                hidden,
                load_block_args(args, job.device),
                outputs=reference,
                reference=reference,
                batch_size=job.request.batch_size,
                grouped=grouped_experts(job, index, block, pruned),
            )
            error = math.sqrt(last.err_sq / last.ref_sq) if last.ref_sq else 0.0
            path = job.path / "acts" / f"inputs-{index + 1:04d}.safetensors"
            outputs = str(save_shared({"hidden": reference}, path))
        name = f"{prefix}.{index}"
        routers = job.request.routers
        per_linear = {n: zeros_of(lin.weight) for n, lin in block_linears(block, routers=routers).items()}
        kinds = block_matrices(block, routers)
        dense = {p: zeros_of(w) for p, w in block.named_parameters() if kinds.get(p) == ROUTER}
        experts = ExpertShard(job, index, block, pruned)
        trunk = block_tensors(reader, block, name, saved - set(experts.params))
        written = [zeros_of(v) for v in trunk.values()]
        writer = ShardWriter(job.path / "shards", len(blocks) + 1)
        shard = job.path / "shards" / writer.shard_name(index + 1)
        if writes():
            layout = {k: (v.dtype, tuple(v.shape)) for k, v in trunk.items()} | experts.layout
            shard = writer.write_each(
                index + 1, layout, lambda k: trunk.pop(k) if k in trunk else experts.produce(k)
            )
        else:
            experts.count_all()
        trunk.clear()
        per_linear |= experts.matrices
        written += experts.written
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


class ExpertShard:
    """Block ``index``'s fused expert tensors as its output shard holds them (the checkpoint's own
    layout: fused, or one tensor per expert), made one expert group at a time, pruned files
    applied; and their counts for the report, taken as each group is first made.

    Attributes:
        params: The fused parameters' full names.
        layout: Each output tensor's dtype and shape.
        matrices: Each expert matrix's count (``<tensor>.<e>``, names within the block).
        written: Each output piece's count, once.
    """

    def __init__(self, job: Job, index: int, block: nn.Module, pruned: list[str], reader=None):
        model, self.reader, saved = checkpoint_of(job)
        self.job, self.pruned, self.source = job, pruned, reader
        self.name = f"{find_blocks(model)[0]}.{index}"
        self.params = [f"{self.name}.{p}" for p in expert_params(block) if f"{self.name}.{p}" in saved]
        self.groups = expert_groups(job, block)
        self.fused = block_experts(block)
        full = self.reader.written({p: model.get_parameter(p) for p in self.params})  # meta: names, shapes
        self.layout = {k: (v.dtype, tuple(v.shape)) for k, v in full.items()}
        one = self.reader.written({p: model.get_parameter(p)[:1] for p in self.params})
        self.split = _expert_segment(list(full), len(one)) if len(one) != len(full) else None
        self.owner = {k: self._group_of(k) for k in full} if self.split is not None else {}
        self.matrices: dict[str, LinearReport] = {}
        self.written: list[LinearReport] = []
        self._counted: set[int] = set()
        self._held: tuple[int, dict[str, torch.Tensor]] | None = None

    def _group_of(self, key: str) -> int:
        e = int(key.split(".")[self.split])
        return next(g for g, (a, b) in enumerate(self.groups) if a <= e < b)

    def _load(self, g: int) -> dict[str, torch.Tensor]:
        """Group ``g``'s output tensors (global names), counted the first time it is made."""
        if self._held is not None and self._held[0] == g:
            return self._held[1]
        self._held = None
        a, b = self.groups[g]
        rows = {p: expert_rows(self.job, p, (a, b), self.pruned, self.source) for p in self.params}
        held = sum(t.numel() * t.element_size() for t in rows.values())  # the group, every fused tensor
        self.reader.peak_bytes = max(self.reader.peak_bytes, self.reader.resident_bytes + held)
        if g not in self._counted:
            self._counted.add(g)
            for p, t in rows.items():
                inner = p.removeprefix(f"{self.name}.")
                if inner in self.fused:
                    self.matrices |= {
                        f"{inner}.{a + j}": zeros_of(expert_matrix(t, j, self.fused[inner]))
                        for j in range(b - a)
                    }
                self.written.append(zeros_of(t))
        out = self.reader.written(rows)
        if self.split is not None:
            out = {_renumber(k, self.split, a): v for k, v in out.items()}
        out = {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
        self._held = (g, out)
        return out

    def produce(self, key: str):
        """Output tensor ``key``: whole (one expert's), or a fused one's pieces, group by group."""
        if self.split is not None:
            return self._load(self.owner[key])[key]
        return (self._load(g)[key] for g in range(len(self.groups)))

    def count_all(self) -> None:
        """Count every group (a rank that writes nothing)."""
        for g in range(len(self.groups)):
            self._load(g)
        self._held = None


def _expert_segment(keys: list[str], per_expert: int) -> int:
    """The position (in a key split at dots) of the expert number in per-expert output names."""
    parts = [k.split(".") for k in keys]
    for i in range(len(parts[0])):
        values = {p[i] for p in parts if len(p) > i}
        if all(v.isdigit() for v in values) and len(values) > 1:
            return i
    raise TopiaryError(f"cannot find the expert number in the output names {keys[: per_expert + 1]}")


def _renumber(key: str, segment: int, first: int) -> str:
    parts = key.split(".")
    parts[segment] = str(int(parts[segment]) + first)
    return ".".join(parts)


def zeros_of(tensor: torch.Tensor) -> LinearReport:
    """A tensor's shape and its zeros (``count_nonzero``: a bool ``sum()`` would copy it to int64)."""
    return LinearReport(list(tensor.shape), tensor.numel() - int(torch.count_nonzero(tensor)))


def replay(job: Job, index: int, inputs: str, args: str, shard: str) -> str:
    """Block ``index``'s outputs (the next block's inputs) recomputed from its verified shard:
    the pruned block, run over its inputs as :func:`propagate` ran it, so the same bytes.

    For a resume whose next inputs were damaged or discarded (:mod:`modules.engine.state`);
    the inputs read here are removed once the outputs are written. The shard is read as the
    checkpoint is (:class:`modules.engine.streaming.CheckpointReader`: its layout, a group of
    experts at a time).
    """

    model = checkpoint_of(job)[0]
    with CheckpointReader(job.model_dir, model, files=[Path(shard)]) as reader:
        block = load_block(job, index, [], reader)
        try:
            hidden = hidden_states(inputs, job.device, job.activations)
            outputs = torch.zeros_like(hidden, device=job.device)
            run_pass(
                trainer_of(job),
                block,
                hidden,
                load_block_args(args, job.device),
                outputs=outputs,
                batch_size=job.request.batch_size,
                grouped=grouped_experts(job, index, block, [], reader=reader),
            )
            path = save_shared({"hidden": outputs}, job.path / "acts" / f"inputs-{index + 1:04d}.safetensors")
        finally:
            reader.release(block)
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
