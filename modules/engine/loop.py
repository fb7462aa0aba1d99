"""The streamed prune's loop: every block through the stages, in order, resumable per block.

:func:`prune_blocks` runs :data:`STAGES` (their functions in :mod:`modules.engine.stages` and
:mod:`modules.engine.weight_stages`), through Prefect tasks in the flows or directly;
:func:`prune_checkpoint` is its entry for a checkpoint and windows given directly. A block
is finished when its record is written (:mod:`modules.engine.state`); a resumed run skips
finished blocks.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from modules.engine.blocks import (
    BlockDiscoveryError,
    block_experts,
    block_linears,
    check_supported,
    find_blocks,
    left_dense,
    unsupported_message,
)
from modules.engine.experts import unknown_tensors
from modules.engine.files import masks_in, read_one, save, save_per_linear
from modules.engine.job import blocks_of, checkpoint_of, pruning_groups, trainer_of
from modules.engine.models import DTYPES
from modules.engine.names import check_device, resolve_model
from modules.engine.passes import owl_rates
from modules.engine.ranks import everyone, from_zero, rank_and_world, writes
from modules.engine.report import BlockReport, PruneReport
from modules.engine.request import Job, PruneRequest
from modules.engine.stages import assemble, block_report, capture, propagate, replay, statistics
from modules.engine.state import describe, group_path, group_records, record_path, verified_records
from modules.engine.streaming import checkpoint_dtype
from modules.engine.weight_stages import masks, update
from modules.errors import TopiaryError
from modules.process import large_allocations_mapped, pause_point, remove_stale, temp_prefix, write_file
from modules.provenance import provenance
from modules.pruning.registry import Context, get_method

STAGES: dict[str, Callable] = {
    "capture": capture,
    "statistics": statistics,
    "masks": masks,
    "update": update,
    "propagate": propagate,
    "assemble": assemble,
}
PASSES = frozenset({"statistics", "propagate"})  # over the windows: under DDP every rank runs its share
WORK_PARTS = ("acts", "stats", "masks", "weights", "shards", "blocks", "groups", "keep")


@large_allocations_mapped()  # freed blocks go back to the system (see its docstring)
def prune_blocks(
    job: Job,
    calib_path: str,
    out_dir: str | Path,
    grads_dir: str | None = None,
    run: Callable | None = None,
    log: logging.Logger | None = None,
) -> tuple[PruneReport, int]:
    """The per-block prune of ``job``'s checkpoint into ``out_dir``: the one loop over the stages.

    ``run(stage, *args)`` runs one stage of :data:`STAGES` (``capture``, ``statistics``,
    ``masks``, ``update``, ``propagate``, ``assemble``) with the arguments of its function
    after ``job``: by default that function itself; the flows pass Prefect tasks. Finished
    blocks (their record ``blocks/<i>.json`` in the job's folder) are not run again.

    Under DDP (:func:`modules.engine.statistics.join`) every rank calls this: the passes
    (:data:`PASSES`, OWL's) run on every rank over its share of the windows; the other
    stages, the records and the files are rank 0's (:mod:`modules.engine.ranks`).

    Returns:
        The report, and the index of the first block this call pruned (0 unless it resumed).
    """
    direct = run or (lambda stage, *args: STAGES[stage](job, *args))

    def run(stage: str, *args):
        return (everyone if stage in PASSES else from_zero)(direct, stage, *args)

    log = log or logging.getLogger("topiary")
    start = time.perf_counter()
    if writes():
        remove_stale([job.path / part for part in WORK_PARTS])
        remove_stale([Path(out_dir).parent])
    model, reader, _ = checkpoint_of(job)
    reader.peak_bytes = 0
    prefix, blocks = find_blocks(model)
    _check_blocks(job, prefix, blocks)
    widths = frozenset(lin.in_features for b in blocks for lin in block_linears(b).values())
    context = Context(nsamples=job.nsamples, device=torch.device(job.device), widths=widths)
    chosen = get_method(job.request.method).chosen(job.request.options, context)
    records, rebuild = from_zero(verified_records, job.path, len(blocks), log)
    if records:
        log.info(
            "resuming at block %d/%d (blocks 1-%d are done)", len(records) + 1, len(blocks), len(records)
        )
    rates = owl_rates(job, calib_path) if job.request.owl else None
    captured = None if job.request.data_free() else run("capture", calib_path)
    inputs = captured and captured["inputs"]
    if rebuild and captured:  # the next block's inputs, through the verified blocks
        for i, done in enumerate(records):
            t = time.perf_counter()
            inputs = everyone(replay, job, i, inputs, captured["args"], done["shard"])
            log.info("block %d/%d: replayed %.1f s", i + 1, len(blocks), time.perf_counter() - t)
    reports, masks_files = [], []
    for i in range(len(blocks)):
        if i < len(records):
            done = records[i]
            inputs = done["inputs"]
        else:
            block = _BlockRun(job, run, log, i, len(blocks), rates["rates"][i] if rates else None)
            done, inputs = block.prune(inputs, captured and captured["args"], grads_dir)
        reports.append(BlockReport.from_dict(done["report"]))
        masks_files += done["masks"]
    report = _report(job, calib_path, prefix, reports, chosen, rates, start)
    run("assemble", str(out_dir), report.to_dict(), masks_files)
    written = Path(out_dir) / "pruning_report.json"
    report.outside = from_zero(lambda: json.loads(written.read_text())["outside"])
    from_zero(shutil.rmtree, job.path, ignore_errors=True)
    return report, len(records)


def _check_blocks(job: Job, prefix: str, blocks: nn.ModuleList) -> None:
    """Refuse, before any work, a block matrix that is neither pruned nor a router, and fused
    expert tensors whose input the statistics pass cannot form."""
    request = job.request
    method = get_method(request.method)
    check_supported(prefix, blocks)
    _check_expert_inputs(prefix, blocks, None if method.data_free else request.method)


@dataclass
class _BlockRun:
    """The stages of one block ``index`` (of ``blocks``), run through ``run``, at OWL's ``rate``."""

    job: Job
    run: Callable
    log: logging.Logger
    index: int
    blocks: int
    rate: float | None

    def timed(self, what: str, stage: str, *args) -> dict:
        t = time.perf_counter()
        result = self.run(stage, self.index, *args)
        self.log.info("block %d/%d: %s %.1f s", self.index + 1, self.blocks, what, time.perf_counter() - t)
        return result

    def prune(self, inputs: str | None, args: str | None, grads_dir: str | None) -> tuple[dict, str | None]:
        """Prune the block, group by group (each group durable once done: :func:`_record_group`),
        then propagate it and write its record: ``(record, the next block's inputs)``."""
        job, method, request = self.job, get_method(self.job.request.method), self.job.request
        meta = blocks_of(job)[1][self.index]
        data_free = request.data_free()
        done = from_zero(group_records, job.path, self.index, self.log)
        state = (
            done[-1] if done else {"groups": None, "dense": None, "seen": {}, "pruned": [], "stage_files": []}
        )
        groups, dense, seen = state["groups"], state["dense"], state["seen"]
        pruned, stage_files = list(state["pruned"]), list(state["stage_files"])
        if data_free:
            groups = [list(block_linears(meta, routers=request.routers))]
        ordered = pruning_groups(job, groups, meta) if groups else [None]
        if done:
            self.log.info("block %d/%d: resuming at group %d/%d", self.index + 1, self.blocks, len(done) + 1,
                          len(ordered))  # fmt: skip
        group = len(done)
        while group < len(ordered):
            stats, linears = None, ordered[group]
            if not data_free:
                linear_groups = len(groups) if groups and request.true_sequential else 1
                before = (
                    pruned if group < linear_groups else pruned[: linear_groups - 1]
                )  # the experts' inputs
                found = self.timed("statistics", "statistics", group, inputs, args, before, groups)
                if group == 0:
                    groups, dense = found["groups"], found["dense"]
                    ordered = pruning_groups(job, groups, meta)
                stats, linears = found["stats"], found["linears"]
                seen = _merge_seen(seen, found["experts"])
            files = []
            mask = weights = None
            if method.mask_stage(request.options):
                what = f"masks ({request.method})"
                mask = self.timed(what, "masks", group, stats, linears, pruned, grads_dir, self.rate)["masks"]
                files.append(mask)
            if method.update_stage():  # on this group's dense weights (and its mask)
                what = f"update ({request.method})"
                step = self.timed(what, "update", group, stats, linears, pruned, mask, grads_dir, self.rate)
                weights = step["weights"]
                files.append(weights)
            pruned.append(weights or mask)
            stage_files += files
            state = {
                "groups": groups,
                "dense": dense,
                "seen": seen,
                "pruned": pruned,
                "stage_files": stage_files,
            }
            from_zero(
                _record_group,
                job,
                self.index,
                group,
                state,
                files + ([dense] if group == 0 and dense else []),
            )
            group += 1
        return self.finish(None if data_free else inputs, args, dense, pruned, groups, seen, stage_files)

    def finish(
        self,
        inputs: str | None,
        args: str | None,
        dense: str | None,
        pruned: list[str],
        groups: list[list[str]] | None,
        seen: dict[str, dict],
        stage_files: list[str],
    ) -> tuple[dict, str | None]:
        """Propagate the pruned block and write its record: ``(record, the next block's inputs)``."""
        spec = self.job.request.spec
        spec = spec.with_rate(self.rate) if self.rate is not None else spec
        setting = {"target": spec.target, "setting": str(spec), "groups": groups or []}
        if seen:
            setting["experts"] = seen
            _log_experts(self.log, self.index, self.blocks, seen)
        result = self.timed("propagate", "propagate", inputs, args, dense, pruned, setting)
        done = from_zero(_finish_block, self.job, self.index, setting, stage_files, result)
        return done, result["inputs"]


def _report(
    job: Job,
    calib_path: str,
    prefix: str,
    blocks: list[BlockReport],
    chosen: dict,
    rates: dict | None,
    start: float,
) -> PruneReport:
    """The run's report, before ``assemble`` adds what it wrote outside the blocks."""
    request = job.request
    model, reader, saved = checkpoint_of(job)
    meta = find_blocks(model)[1]
    world = rank_and_world()[1]
    report = PruneReport(
        method=request.method,
        setting=str(request.spec),
        target=request.spec.target,
        plan=request.to_json(),
        nsamples=job.nsamples,
        seqlen=_seqlen(calib_path) if calib_path else 0,
        blocks_prefix=prefix,
        blocks=blocks,
        chosen=chosen,
        provenance=provenance(torch.device(job.device), DTYPES[job.dtype], **chosen),
        owl=rates,
        seconds={"total": round(time.perf_counter() - start, 4)},
        world_size=world,
        strategy=type(trainer_of(job).strategy).__name__ if world > 1 else None,
        left_dense=left_dense(model, prefix, saved, request.routers),
    )
    report.phases["streaming"] = {
        "peak_loaded_bytes": reader.peak_bytes,
        "largest_block_bytes": max(sum(t.numel() * t.element_size() for t in b.parameters()) for b in meta),
        "activations": None if request.data_free() else job.activations,
    }
    return report


def _finish_block(job: Job, index: int, setting: dict, stage_files: list[str], result: dict) -> dict:
    """Block ``index``'s record, written last (the block is durable from then on), and the
    removal of its activations, statistics and stage files; returns the record. The record
    names its files with their sizes and hashes (:mod:`modules.engine.state`)."""
    report = block_report(job, index, setting, stage_files, result)
    kept = _keep_masks(job, index, stage_files)
    masks = [kept] if kept else []
    inputs = [result["inputs"]] if result["inputs"] else []
    checked = {
        "files": describe(job.path, [result["shard"], *masks]),
        "inputs_file": describe(job.path, inputs),
    }
    done = {**result, "report": report, "masks": masks, **checked}
    write_file(record_path(job.path, index), json.dumps(done, indent=2))
    _clean_block(job.path, index)
    return done


def _merge_seen(seen: dict[str, dict], found: dict[str, dict]) -> dict[str, dict]:
    """The report's per-expert counts so far, with a group's (from its expert ``first``) added in order."""
    out = {name: {k: list(v) for k, v in entry.items() if k != "first"} for name, entry in seen.items()}
    for name, entry in found.items():
        mine = out.setdefault(name, {"routed_tokens": [], "statistics": []})
        if len(mine["routed_tokens"]) != entry["first"]:
            raise TopiaryError(
                f"{name}: expert group from {entry['first']} after {len(mine['routed_tokens'])}"
            )
        mine["routed_tokens"] += entry["routed_tokens"]
        mine["statistics"] += entry["statistics"]
    return out


def _record_group(job: Job, index: int, group: int, state: dict, files: list[str]) -> None:
    """Group ``group`` of block ``index`` is done: its record (``groups/<i>-<g>.json``) names its
    files with their sizes and hashes and holds what the block's later groups go on from."""
    record = {**state, "files": describe(job.path, files)}
    write_file(group_path(job.path, index, group), json.dumps(record, indent=2))
    pause_point("group")  # test hook: a group of the block is durable


def _seqlen(calib_path: str) -> int:
    with safe_open(str(calib_path), framework="pt") as f:
        return int(f.get_slice("input_ids").get_shape()[1])


def _clean_block(folder: Path, index: int) -> None:
    """Remove block ``index``'s activations, statistics and weights (its record, shard and masks stay)."""
    for pattern in (
        f"acts/inputs-{index:04d}.*",
        f"acts/dense-{index:04d}.*",
        f"stats/{index:04d}-*",
        f"weights/{index:04d}-*",
        f"masks/{index:04d}-*",
        f"groups/{index:04d}-*",
    ):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)


def _keep_masks(job: Job, index: int, files: list[str]) -> str | None:
    """Block ``index``'s final keep-masks, copied one mask at a time into the file that
    ``assemble`` puts in the output's ``masks/`` (:func:`modules.engine.masks.save_block_masks`'
    bytes: full parameter names, no metadata)."""
    masks = masks_in(files)
    if not masks:
        return None
    layout = {name: {name: (torch.bool, shape)} for name, (_, _, shape) in masks.items()}
    path = job.path / "keep" / f"{index:04d}.safetensors"
    read = lambda name: {name: read_one(*masks[name][:2])}  # noqa: E731
    return str(save_per_linear(path, layout, read, metadata={}))


def prune_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    request: PruneRequest,
    input_ids: torch.Tensor,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    grads_dir: str | Path | None = None,
    activations: str = "auto",
    folder: str | Path | None = None,
    run: Callable | None = None,
) -> PruneReport:
    """:func:`prune_blocks` on a checkpoint and windows given directly (no config, no cache).

    The engine's entry to the streamed prune (tests, benchmarks): the same stages in this
    process, their files in ``folder`` (default a temporary folder, removed at the end; one
    that a killed call left is removed by the next call). ``run(stage, job, *args)``, if
    given, runs each stage in place of :data:`STAGES`' function ``stage`` called as
    ``fn(job, *args)`` (a benchmark wraps it to time each stage and read its memory peak).
    """
    model_dir = resolve_model(str(model_dir))
    dtype = dtype or checkpoint_dtype(model_dir)
    if "grad" in request.needs() and grads_dir is None:
        raise TopiaryError(
            f"method {request.method}: needs the gradient step first; pass its folder as grads_dir"
        )
    remove_stale([], tmp_dir=Path(tempfile.gettempdir()))  # what killed calls left
    with tempfile.TemporaryDirectory(prefix=temp_prefix("stream")) as tmp:
        calib = save({"input_ids": input_ids}, Path(tmp) / "calib.safetensors")
        job = Job(
            model_dir,
            str(dtype).removeprefix("torch."),
            str(check_device(device)),
            str(folder or Path(tmp) / "run"),
            request,
            int(input_ids.shape[0]),
            activations,
        )
        step = (lambda stage, *args: run(stage, job, *args)) if run else None
        report, _ = prune_blocks(job, str(calib), out_dir, str(grads_dir) if grads_dir else None, step)
    return report


def _check_expert_inputs(prefix: str, blocks: nn.ModuleList, method: str | None) -> None:
    """Refuse, before any work, fused expert tensors whose input the statistics pass cannot form
    (:func:`modules.engine.experts.unknown_tensors`) when ``method`` reads statistics."""
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in unknown_tensors(block_experts(b))]
    if names and method is not None:
        raise BlockDiscoveryError(unsupported_message(type(blocks[0]).__name__, names, method), key="model")


def _log_experts(log: logging.Logger, i: int, n: int, seen: dict[str, dict]) -> None:
    """One line per block: the fewest and most tokens an expert was routed, and who took ``all``'s."""
    counts = [c for entry in seen.values() for c in entry["routed_tokens"]]
    fell = sum(s == "all" for entry in seen.values() for s in entry["statistics"])
    log.info(
        "block %d/%d: experts routed %d to %d tokens; %d expert matrices pruned on all tokens' statistics",
        i + 1, n, min(counts), max(counts), fell,
    )  # fmt: skip
