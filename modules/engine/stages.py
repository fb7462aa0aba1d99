"""The stages of a streamed, per-block prune, each from files to files.

The Prefect tasks of ``tasks/`` call these one per block (and per statistics group with
``true_sequential``); together they compute exactly what :func:`modules.engine.driver.prune_block`
computes in memory, but no stage holds more than one decoder block, its activations and
its statistics, and every result is a file under the run's folder:

- :func:`capture`: the first block's inputs and call arguments, from the embeddings only.
- :func:`statistics`: one pass of block ``i`` (dense, or with its earlier groups pruned)
  over its inputs: each linear's ``sq_norm`` (and ``gram`` when the method needs it); in
  the first pass also the dense outputs (for the reconstruction error) and the groups.
- :func:`masks`: the keep-masks of a method that selects (magnitude, Wanda, GBLM) or of the
  selector a weight update starts from (ADMM's ``selector``, or a mask file).
- :func:`update`: the pruned weights of a method that updates them (SparseGPT, ADMM,
  ADMM-Grad), from the statistics and (ADMM) the masks.
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

import functools
import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from modules.engine.blocks import (
    ROUTER,
    BlockArgs,
    BlockDiscoveryError,
    block_experts,
    block_linears,
    block_matrices,
    check_supported,
    expert_matrix,
    find_blocks,
    left_dense,
    unsupported_message,
)
from modules.engine.experts import unknown_tensors
from modules.engine.ranks import everyone, from_zero, rank_and_world, writes
from modules.engine.report import BlockReport, LinearReport, PruneReport
from modules.engine.request import PruneRequest
from modules.engine.state import describe, record_path, verified_records
from modules.errors import TopiaryError
from modules.process import building, large_allocations_mapped, pause_point, write_file
from modules.pruning.registry import MASK_FILE, Context, get_method
from modules.pruning.sparsity import SparsitySpec, check_finite, overflow_hint
from modules.pruning.stats import LayerStats


@dataclass(frozen=True)
class Job:
    """What every stage of one streamed prune shares (plain data, part of every cache key).

    Attributes:
        model_dir: The dense checkpoint's folder.
        dtype: The dtype the blocks are pruned in (a name, ``float32``...).
        device: Where blocks are pruned (``cpu``, ``cuda:0``).
        folder: The run's work folder (activations, statistics, masks, shards).
        request: What to do to every block (:class:`modules.engine.request.PruneRequest`).
        nsamples: Calibration windows.
        activations: How a stage holds the hidden states it reads: ``memory`` (read into
            memory), ``mmap`` (memory-mapped from their file, paged in as used) or ``auto``
            (``mmap`` when a block's inputs and outputs together need more than half the
            available memory). Results are the same; it is not part of any cache key.
    """

    model_dir: str
    dtype: str
    device: str
    folder: str
    request: PruneRequest
    nsamples: int
    activations: str = "auto"

    @property
    def path(self) -> Path:
        return Path(self.folder)

    def to_json(self) -> dict:
        """The job as JSON data: what a task takes (and its cache key reads) across processes."""
        return {**asdict(self), "request": self.request.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> Job:
        """The job of :meth:`to_json`'s output."""
        return cls(**{**data, "request": PruneRequest.from_json(data["request"])})


def _per_thread(fn: Callable) -> Callable:
    """``fn`` cached per thread (two entries each): a skeleton or a Trainer is mutable state.

    Runs of one process share nothing through it: two sweep steps on a Dask or thread pool
    worker each load blocks into their own skeleton (a shared one had one run's blocks put
    back on the meta device under the other) and run their own Trainer.
    """
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
def _model(model_dir: str, dtype: str):
    """The meta-device skeleton of ``model_dir``, its reader and the names ``save_pretrained``
    writes (tied copies left out), one per thread and checkpoint."""
    from modules.engine.models import DTYPES
    from modules.engine.streaming import CheckpointReader, saved_names, skeleton

    model = skeleton(model_dir, DTYPES[dtype])
    saved = set(saved_names(model))  # before any load: loading unties tied weights
    return model, CheckpointReader(model_dir, model), saved


def blocks_of(job: Job) -> tuple[str, nn.ModuleList]:
    """The decoder blocks' prefix and the (meta) blocks of the job's model."""
    return find_blocks(_model(job.model_dir, job.dtype)[0])


def _trainer(job: Job):
    """The Trainer of the job's passes: the DDP one this process joined, else one per device."""
    from modules.engine.statistics import joined

    return joined() or _trainer_on(job.device)


@_per_thread
def _trainer_on(device: str):
    """One Trainer per device and thread: a Trainer per stage kept every block it ran alive."""
    from modules.engine.statistics import make_trainer

    return make_trainer(torch.device(device))


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """Write ``tensors`` (moved to the host) atomically as safetensors.

    Tensors sharing memory (the linears of a group share their input statistics) are
    written once: the others are recorded as aliases in the file's metadata.
    """
    from modules.engine.streaming import write_safetensors

    unique, alias, seen = {}, {}, {}
    for k, v in tensors.items():
        ptr = (v.data_ptr(), v.shape, v.dtype) if v.numel() else None
        if ptr is not None and ptr in seen:
            alias[k] = seen[ptr]
            continue
        if ptr is not None:
            seen[ptr] = k
        unique[k] = v.detach().to("cpu").contiguous()
    with building(path) as tmp:
        write_safetensors(tmp, unique, metadata={"alias": json.dumps(alias)})
    return path


def _save_shared(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """:func:`save` of a shared pass's result: under DDP every rank holds it, rank 0 writes it."""
    return save(tensors, path) if writes() else path


def load(
    path: str | Path, device: str | torch.device = "cpu", keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors :func:`save` wrote, aliases included; only those of ``keys`` that the file
    holds when ``keys`` is given (the rest of the file is not read).

    Each tensor is read into memory of its own (:func:`modules.engine.streaming.read_tensor`).
    """
    from modules.engine.streaming import read_header, read_tensor

    header, metadata, start = read_header(Path(path))
    alias = json.loads(metadata.get("alias", "{}"))
    wanted = [*header, *alias] if keys is None else [k for k in keys if k in header or k in alias]
    with open(path, "rb") as f:
        read = {
            src: read_tensor(f, start, header[src], src).to(device)
            for src in dict.fromkeys(alias.get(k, k) for k in wanted)
        }
    return {k: read[alias.get(k, k)] for k in wanted}


def hidden_states(job: Job, path: str | Path) -> torch.Tensor:
    """The hidden states of an activations file, read or memory-mapped (:attr:`Job.activations`).

    A mapped tensor is a copy-on-write view of the file (never written back); on a GPU
    device it is copied there in any case.
    """
    from modules.engine.streaming import SAFETENSORS_DTYPES, _header, available_memory

    header, start = _header(Path(path))
    info = header["hidden"]
    nbytes = info["data_offsets"][1] - info["data_offsets"][0]
    kind = job.activations
    if kind == "auto":
        kind = "mmap" if 2 * nbytes > 0.5 * available_memory() else "memory"
    if kind == "memory" or torch.device(job.device).type != "cpu":
        return load(path, job.device)["hidden"]
    size = Path(path).stat().st_size
    flat = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    begin = start + info["data_offsets"][0]
    return flat[begin : begin + nbytes].view(SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])


def _load_block(job: Job, index: int, pruned: list[str]) -> nn.Module:
    """Block ``index`` on the job's device: dense from the checkpoint, then each pruned file applied.

    A pruned file maps full parameter names to new weights, or ``<name>.keep`` to a
    keep-mask (the weight is then zero off the mask).
    """
    model, reader, _ = _model(job.model_dir, job.dtype)
    prefix, blocks = find_blocks(model)
    block = reader.materialize(blocks[index], f"{prefix}.{index}", job.device)
    _apply_pruned({f"{prefix}.{index}.{n}": p for n, p in block.named_parameters()}, pruned, job.device)
    return block


def _apply_pruned(params: dict[str, torch.Tensor], pruned: list[str], device: str) -> None:
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


def _release(job: Job, block: nn.Module) -> None:
    _model(job.model_dir, job.dtype)[1].release(block)


def _block_args(path: str | Path, device: str) -> BlockArgs:
    args = torch.load(str(path), map_location=device, weights_only=False)  # our own file, see capture
    return BlockArgs(tuple(args["args"]), dict(args["kwargs"]))


def _stages(job: Job, groups: list[list[str]]) -> list[list[str]]:
    request = job.request
    return groups if request.true_sequential else [[n for g in groups for n in g]]


def capture(job: Job, calib_path: str) -> dict:
    """The first block's inputs (``inputs-0000.safetensors``) and other arguments (``args.pt``).

    The arguments (attention mask, rotary tables, cache positions) are the same for every
    window and block; they are pickled with ``torch.save`` into the run's own folder.
    """
    from modules.engine.streaming import capture_block_inputs

    input_ids = load(calib_path)["input_ids"]
    model, reader, _ = _model(job.model_dir, job.dtype)
    prefix, blocks = find_blocks(model)
    stores = []

    def store_of(shape, dtype):
        from modules.engine.streaming import ActivationStore

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
    stage: int,
    inputs: str,
    args: str,
    pruned: list[str],
    groups: list[list[str]] | None = None,
) -> dict:
    """Statistics of block ``index``'s linears of ``stage`` (all of them with ``stage=0``).

    Stage 0 runs the dense block: it also writes the dense outputs (``dense-*.safetensors``)
    and finds the groups of linears reading the same input. A later stage (true-sequential)
    runs the block with the earlier stages' pruned weights (``pruned``).
    """
    from modules.engine.statistics import run_pass

    request = job.request
    t = time.perf_counter()
    block = _load_block(job, index, pruned)
    try:
        hidden = hidden_states(job, inputs)
        block_args = _block_args(args, job.device)
        linears = block_linears(block)
        run = {"block_args": block_args, "gram": "gram" in request.needs(), "batch_size": request.batch_size}
        last = stage == 0 or stage == len(groups) - 1  # stage 0 may be the last one: groups come from it
        run["experts"] = request.moe_calibration if last else None
        dense = None
        if stage == 0:
            outputs = torch.zeros_like(hidden)
            first = run_pass(_trainer(job), block, hidden, collect=set(linears), outputs=outputs, **run)
            missing = [n for n in linears if n not in first.stats]
            if missing:
                never = ", ".join(missing)
                raise TopiaryError(f"block {index}: linears never called in its forward: {never}")
            groups = [g for g in ([n for n in g if n in linears] for g in first.groups) if g]
            dense = str(
                _save_shared({"hidden": outputs}, job.path / "acts" / f"dense-{index:04d}.safetensors")
            )
            stats, experts = first.stats, first.experts
        else:
            names = set(_stages(job, groups)[stage])
            result = run_pass(_trainer(job), block, hidden, collect=names, **run)
            stats, experts = result.stats, result.experts
        stages = _stages(job, groups)
        names = stages[stage]
        tensors = dict(experts) if stage == len(stages) - 1 else {}  # the experts are pruned last
        seen = _expert_counts(tensors, request.moe_calibration)
        for n in names:
            s = stats[n]
            tensors[f"{n}.sq_norm"] = s.sq_norm
            tensors[f"{n}.tokens"] = torch.tensor(s.tokens)
            if s.gram is not None:
                tensors[f"{n}.gram"] = s.gram
        path = _save_shared(tensors, job.path / "stats" / f"{index:04d}-{stage}.safetensors")
        pause_point("statistics")  # test hook: the statistics of a block are durable
    finally:
        _release(job, block)
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


def _layer_stats(stats: dict[str, torch.Tensor], name: str) -> LayerStats:
    return LayerStats(int(stats[f"{name}.tokens"]), stats[f"{name}.sq_norm"], stats.get(f"{name}.gram"))


def _linear_stats(
    job: Job, index: int, name: str, stats_path: str | None, grads_dir, needs: set, where: str
) -> LayerStats | None:
    """Linear ``name``'s statistics of block ``index`` (with its gradient when ``needs`` has ``grad``)."""
    from modules.engine.gradients import load_block_grads

    if stats_path is None:  # a data-free method: no statistics at all
        return None
    keys = [f"{name}.tokens", f"{name}.sq_norm", f"{name}.gram"]
    stats = _layer_stats(load(stats_path, job.device, keys), name)  # read for this linear alone
    stats.scratch = True
    if "grad" not in needs:
        return stats
    grad = load_block_grads(grads_dir, index, [name]).get(name)
    if grad is None:
        raise TopiaryError(f"gradients: block {index} has no gradient for {name}")
    grad = grad.to(job.device, torch.float32)
    check_finite(f"{where} gradients", grad)
    return LayerStats(stats.tokens, stats.sq_norm, stats.gram, grad, scratch=True)


def _load_linear(job: Job, lin: nn.Linear, where: str, pruned: list[str]) -> nn.Linear:
    """The (meta) linear ``where`` loaded on the job's device, its pruned files applied."""
    _, reader, _ = _model(job.model_dir, job.dtype)
    reader.materialize(lin, where, job.device, recurse=False)
    _apply_pruned({f"{where}.weight": lin.weight}, pruned, job.device)
    return lin


def _stage_linear(
    job: Job,
    index: int,
    name: str,
    stats: str | None,
    pruned: list[str],
    grads_dir: str | None,
    spec: SparsitySpec,
    needs: set,
) -> tuple[str, nn.Linear, LayerStats | None, torch.Tensor]:
    """``(where, lin, stats, W)`` of linear ``name`` of block ``index`` in a masks or update stage:
    its weight (the stage's earlier pruned files applied), statistics and gradient, read when
    its turn comes, so that a stage holds one linear, never the block. ``W`` is its checked
    fp32 copy, the stage's own; ``lin`` is back on the meta device by then (its dtype and
    shape remain)."""
    from modules.engine.driver import checked_weight

    prefix, blocks = blocks_of(job)
    where = f"{prefix}.{index}.{name}"
    lin = _load_linear(job, block_linears(blocks[index])[name], where, pruned)
    try:
        layer = _linear_stats(job, index, name, stats, grads_dir, needs, where)
        W = checked_weight(lin, layer, spec, where)
    finally:
        _model(job.model_dir, job.dtype)[1].release(lin, recurse=False)  # W is the copy the method works on
    return where, lin, layer, W


def _save_per_linear(
    path: Path,
    layout: dict[str, dict[str, tuple]],
    compute: Callable[[str], dict[str, torch.Tensor]],
    metadata: dict | None = None,
) -> Path:
    """Write a stage's file one linear at a time: ``layout`` maps each linear to its tensors'
    names, dtypes and shapes; ``compute(linear)`` gives those tensors when the file reaches the
    first of them. Tensors the file needs later (a weight's mask, after every weight) are held
    until written, the rest of a linear's work is freed before the next linear is read.
    ``metadata`` defaults to :func:`save`'s (no aliases)."""
    from modules.engine.streaming import write_safetensors_each

    owner = {key: name for name, keys in layout.items() for key in keys}
    held: dict[str, torch.Tensor] = {}

    def produce(key: str) -> torch.Tensor:
        if key not in held:
            held.update({k: v.detach().to("cpu").contiguous() for k, v in compute(owner[key]).items()})
        return held.pop(key)

    flat = {key: spec for keys in layout.values() for key, spec in keys.items()}
    with building(path) as tmp:
        write_safetensors_each(
            tmp, flat, produce, metadata={"alias": json.dumps({})} if metadata is None else metadata
        )
    return path


def _spec(job: Job, rate: float | None) -> SparsitySpec:
    spec = job.request.spec
    return spec.with_rate(rate) if rate is not None else spec


def _options(job: Job) -> tuple[dict, object]:
    from modules.engine.masks import MaskFile

    request = job.request
    method = get_method(request.method)
    opts = method.bind(request.options, Context(nsamples=job.nsamples, device=torch.device(job.device)))
    return opts, (MaskFile(opts.pop(MASK_FILE)) if MASK_FILE in opts else None)


def masks(
    job: Job,
    index: int,
    stage: int,
    stats: str,
    linears: list[str],
    pruned: list[str],
    grads_dir: str | None = None,
    rate: float | None = None,
) -> dict:
    """Keep-masks of the stage's linears: the method's own (it selects) or its selector's.

    One linear at a time, its mask written as soon as it is made; the scores take the place
    of the linear's fp32 copy, and no pruned copy is made (:meth:`Method.mask`).
    """
    request = job.request
    method = get_method(request.method)
    spec = _spec(job, rate)
    opts, mask_file = _options(job)
    t = time.perf_counter()
    prefix, blocks = blocks_of(job)
    lins = block_linears(blocks[index])
    experts = block_experts(blocks[index])

    def keep_of(W: torch.Tensor, layer: LayerStats | None) -> torch.Tensor:
        if method.selects:
            return method.mask(W, layer, spec, overwrite=True, **opts)
        return method.select(W, layer, spec, opts, overwrite=True)

    def compute(name: str) -> dict[str, torch.Tensor]:
        if name in experts:
            where = f"{prefix}.{index}.{name}"
            tensor = _expert_tensor(job, where, pruned)
            keep = torch.empty(tensor.shape, dtype=torch.bool, device=tensor.device)
            for e, W, layer in _each_expert(job, name, where, tensor, experts[name], stats):
                expert_matrix(keep, e, experts[name]).copy_(keep_of(W, layer))
            return {f"{where}.keep": keep}
        where, _, layer, W = _stage_linear(job, index, name, stats, pruned, grads_dir, spec, request.needs())
        if mask_file is not None and not method.selects:
            return {f"{where}.weight.keep": mask_file.get(f"{where}.weight", W.shape, W.device)}
        return {f"{where}.weight.keep": keep_of(W, layer)}

    layout = {
        n: {f"{prefix}.{index}.{n}.keep": (torch.bool, tuple(blocks[index].get_parameter(n).shape))}
        if n in experts
        else {f"{prefix}.{index}.{n}.weight.keep": (torch.bool, tuple(lins[n].weight.shape))}
        for n in linears
    }
    path = _save_per_linear(job.path / "masks" / f"{index:04d}-{stage}.safetensors", layout, compute)
    return {"masks": str(path), "seconds": round(time.perf_counter() - t, 4)}


def _expert_tensor(job: Job, where: str, pruned: list[str]) -> torch.Tensor:
    """Fused expert tensor ``where`` (3-D) on the job's device, the stage's earlier pruned files applied."""
    model, reader, _ = _model(job.model_dir, job.dtype)
    tensor = reader.tensor(where, model.get_parameter(where), job.device)
    _apply_pruned({where: tensor}, pruned, job.device)
    return tensor


def _each_expert(job: Job, name: str, where: str, tensor: torch.Tensor, transposed: bool, stats: str | None):
    """``(e, W, stats)`` for each expert of fused tensor ``where`` (``name`` within its block): its
    matrix as a checked fp32 ``(out, in)`` copy, like a Linear's weight, and its own statistics
    (:mod:`modules.engine.experts`; None for a data-free method). An expert without tokens is refused."""
    sums = (
        None
        if stats is None
        else load(stats, job.device, [f"{name}.{k}" for k in ("tokens", "sq_norm", "gram")])
    )
    for e in range(tensor.shape[0]):
        W = expert_matrix(tensor, e, transposed).to(torch.float32, copy=True)
        check_finite(f"{where} expert {e} weight", W)
        layer = None
        if sums is not None:
            gram = sums.get(f"{name}.gram")
            layer = LayerStats(int(sums[f"{name}.tokens"][e]), sums[f"{name}.sq_norm"][e].clone(),
                               None if gram is None else gram[e].clone(), scratch=True)  # fmt: skip
            if layer.tokens == 0:
                raise TopiaryError(f"{where}: expert {e} has no calibration token to prune it on")
            check_finite(f"{where} expert {e} statistics", layer.sq_norm)
        yield e, W, layer


def _expert_update(
    job: Job, name: str, where: str, transposed: bool, stats: str, pruned: list[str], mask: str | None, fn
) -> dict[str, torch.Tensor]:
    """The pruned fused tensor ``where`` and its keep-mask: ``fn(W, stats, kwargs) -> (W_pruned,
    keep)`` on each expert's matrix (:func:`_each_expert`), on its slice of ``mask``'s keep-mask if given."""
    tensor = _expert_tensor(job, where, pruned)
    given = load(mask, job.device, [f"{where}.keep"])[f"{where}.keep"] if mask else None
    keep = torch.empty(tensor.shape, dtype=torch.bool, device=tensor.device)
    for e, W, layer in _each_expert(job, name, where, tensor, transposed, stats):
        kwargs = {} if given is None else {"mask": expert_matrix(given, e, transposed)}
        W_pruned, k = fn(W, layer, kwargs)
        check_finite(f"{where} expert {e} weight after pruning", W_pruned)
        expert_matrix(tensor, e, transposed).copy_(W_pruned)
        expert_matrix(keep, e, transposed).copy_(k)
    return {where: tensor, f"{where}.mask": keep}


def update(
    job: Job,
    index: int,
    stage: int,
    stats: str,
    linears: list[str],
    pruned: list[str],
    mask: str | None = None,
    grads_dir: str | None = None,
    rate: float | None = None,
) -> dict:
    """Pruned weights of the stage's linears: the method's weight update (on ``mask`` for ADMM).

    One linear at a time, its weights written as soon as they are made (its mask, which the
    file holds after all weights, is kept until then).
    """
    request = job.request
    method = get_method(request.method)
    spec = _spec(job, rate)
    opts, _ = _options(job)
    opts.pop("selector", None)
    needs = set(method.needs)  # the update's own: ADMM's selector="gblm" reads gradients in masks only
    t = time.perf_counter()
    prefix, blocks = blocks_of(job)
    lins = block_linears(blocks[index])
    experts = block_experts(blocks[index])

    def compute(name: str) -> dict[str, torch.Tensor]:
        if name in experts:

            def fn(W, layer, kwargs):
                return method.fn(W, layer, spec, **opts, **kwargs)

            where = f"{prefix}.{index}.{name}"
            return _expert_update(job, name, where, experts[name], stats, pruned, mask, fn)
        where, lin, layer, W = _stage_linear(job, index, name, stats, pruned, grads_dir, spec, needs)
        key = f"{where}.weight"
        kwargs = dict(opts)
        if mask:
            kwargs["mask"] = load(mask, job.device, [f"{key}.keep"])[f"{key}.keep"]
        W_pruned, keep = method.fn(W, layer, spec, **kwargs)
        del W, layer, kwargs
        check_finite(f"{where} weight after {request.method}", W_pruned)
        return {key: W_pruned.to(lin.weight.dtype), f"{key}.mask": keep}

    layout = {}
    for n in linears:
        if n in experts:
            param = blocks[index].get_parameter(n)
            key, shape, dtype = f"{prefix}.{index}.{n}", tuple(param.shape), param.dtype
        else:
            key, shape, dtype = (
                f"{prefix}.{index}.{n}.weight",
                tuple(lins[n].weight.shape),
                lins[n].weight.dtype,
            )
        layout[n] = {key: (dtype, shape), f"{key}.mask": (torch.bool, shape)}
    computed: list[str] = []

    def compute_then_pause(name: str) -> dict[str, torch.Tensor]:
        out = compute(name)
        computed.append(name)
        if len(computed) == 1:
            pause_point("update")  # test hook: inside the update, its file partly written
        return out

    path = _save_per_linear(
        job.path / "weights" / f"{index:04d}-{stage}.safetensors", layout, compute_then_pause
    )
    return {"weights": str(path), "seconds": round(time.perf_counter() - t, 4)}


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
    from modules.engine.statistics import run_pass
    from modules.engine.streaming import ShardWriter, _block_tensors

    t = time.perf_counter()
    model, reader, saved = _model(job.model_dir, job.dtype)
    prefix, blocks = find_blocks(model)
    block = _load_block(job, index, pruned)
    try:
        error, outputs = None, None
        if inputs is not None:
            hidden = hidden_states(job, inputs)
            reference = hidden_states(job, dense)
            request = job.request
            last = run_pass(
                _trainer(job),
                block,
                hidden,
                _block_args(args, job.device),
                outputs=reference,
                reference=reference,
                batch_size=request.batch_size,
            )
            error = math.sqrt(last.err_sq / last.ref_sq) if last.ref_sq else 0.0
            path = job.path / "acts" / f"inputs-{index + 1:04d}.safetensors"
            outputs = str(_save_shared({"hidden": reference}, path))
        name = f"{prefix}.{index}"
        per_linear = {lname: _zeros_of(lin.weight) for lname, lin in block_linears(block).items()}
        for pname, transposed in block_experts(block).items():  # each expert's matrix, as written
            param = block.get_parameter(pname)
            per_linear |= {
                f"{pname}.{e}": _zeros_of(expert_matrix(param, e, transposed)) for e in range(len(param))
            }
        kinds = block_matrices(block)
        dense = {p: _zeros_of(w) for p, w in block.named_parameters() if kinds.get(p) == ROUTER}
        tensors = _block_tensors(reader, block, name, saved)
        written = [_zeros_of(v) for v in tensors.values()]
        writer = ShardWriter(job.path / "shards", len(blocks) + 1)
        shard = job.path / "shards" / writer.shard_name(index + 1)
        if writes():
            shard = writer.write(index + 1, tensors)
        del tensors
    finally:
        _release(job, block)
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


def _zeros_of(tensor: torch.Tensor) -> LinearReport:
    """A tensor's shape and its zeros (``count_nonzero``: a bool ``sum()`` would copy it to int64)."""
    return LinearReport(list(tensor.shape), tensor.numel() - int(torch.count_nonzero(tensor)))


def replay(job: Job, index: int, inputs: str, args: str, shard: str) -> str:
    """Block ``index``'s outputs (the next block's inputs) recomputed from its verified shard:
    the pruned block, run over its inputs as :func:`propagate` ran it, so the same bytes.

    For a resume whose next inputs were damaged or discarded (:mod:`modules.engine.state`);
    the inputs read here are removed once the outputs are written.
    """
    from modules.engine.statistics import run_pass

    prefix, _ = blocks_of(job)
    block = _load_block(job, index, [])
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
        hidden = hidden_states(job, inputs)
        outputs = torch.zeros_like(hidden, device=job.device)
        run_pass(
            _trainer(job),
            block,
            hidden,
            _block_args(args, job.device),
            outputs=outputs,
            batch_size=job.request.batch_size,
        )
        path = _save_shared({"hidden": outputs}, job.path / "acts" / f"inputs-{index + 1:04d}.safetensors")
    finally:
        _release(job, block)
    from_zero(Path(inputs).unlink, missing_ok=True)
    return str(path)


def _masks_in(files: list[str]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """The keep-masks of a block's stage files, one per weight, without reading them:
    ``{weight name: (file, key, shape)}`` (a masks stage's ``.keep``, an update's ``.mask``; a
    later file's mask of a weight replaces an earlier one's)."""
    from modules.engine.streaming import _header

    found = {}
    for path in files:
        for key, info in _header(Path(path))[0].items():
            if key.endswith((".keep", ".mask")):
                found[key.removesuffix(".keep").removesuffix(".mask")] = (path, key, tuple(info["shape"]))
    return found


def _read_one(path: str, key: str) -> torch.Tensor:
    return load(path, keys=[key])[key]


def block_report(job: Job, index: int, setting: dict, masks_files: list[str], propagated: dict) -> dict:
    """The block's report with the per-linear counts of its masks (zeros the method kept count as kept)."""
    report = BlockReport.from_dict(propagated["report"])
    masks = _masks_in(masks_files)
    for lname, lin in report.linears.items():
        where = masks.get(f"{report.name}.{lname}.weight")
        if where is not None:
            keep = _read_one(*where[:2])  # count_nonzero: a bool sum() makes an int64 copy
            report.linears[lname] = LinearReport(lin.shape, keep.numel() - int(torch.count_nonzero(keep)))
    return report.to_dict()


def assemble(job: Job, out_dir: str | Path, report: dict, masks_files: list[str]) -> Path:
    """The output folder, built in a temporary sibling and renamed: weights, index, config, tokenizer,
    keep-masks (``masks/block_{i:04d}.safetensors``) and ``pruning_report.json``."""
    from modules.engine.masks import blocks_path
    from modules.engine.streaming import ShardWriter, save_model_files

    model, reader, keep = _model(job.model_dir, job.dtype)
    prefix, blocks = find_blocks(model)
    with building(Path(out_dir)) as tmp:
        writer = ShardWriter(tmp, len(blocks) + 1)
        for k in range(1, len(blocks) + 1):
            shutil.copyfile(job.path / "shards" / writer.shard_name(k), tmp / writer.shard_name(k))
        pause_point("save")  # test hook: the blocks' shards are in the temporary folder
        outside = [k for k in keep if not k.startswith(f"{prefix}.")]
        outer = {k: reader.tensor(k, model.get_parameter_or_buffer(k)) for k in outside}
        counts = [_zeros_of(v) for v in outer.values()]
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
        writer.finish(model.num_parameters())
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


def owl_rates(job: Job, calib: str) -> dict:
    """OWL's dense pass, streamed: per-block outlier ratios of Wanda scores, and the rates.

    The same computation as :func:`modules.engine.driver.owl_block_rates`, one block in
    memory at a time; its activations stay in memory (OWL needs the whole dense pass
    before the first block is pruned).
    """
    from modules.engine.statistics import run_pass
    from modules.pruning.owl import outlier_ratio
    from modules.pruning.owl import owl_rates as rates_of
    from modules.pruning.wanda import wanda_scores

    request = job.request
    if request.spec.is_nm:
        raise TopiaryError(f"owl: needs an unstructured sparsity rate, not pattern {request.spec}")
    owl_job = Job(job.model_dir, job.dtype, job.device, str(job.path / "owl"), job.request, job.nsamples)
    captured = from_zero(capture, owl_job, calib)
    hidden = load(captured["inputs"], job.device)["hidden"]
    block_args = _block_args(captured["args"], job.device)
    trainer = _trainer(job)
    ratios = []
    try:
        for i in range(captured["blocks"]):
            block = _load_block(job, i, [])
            try:
                linears = block_linears(block)
                outputs = torch.zeros_like(hidden)
                res = run_pass(
                    trainer,
                    block,
                    hidden,
                    block_args,
                    collect=set(linears),
                    outputs=outputs,
                    batch_size=request.batch_size,
                )
                scores = []
                for lname, lin in linears.items():
                    hint = overflow_hint(lin.weight.dtype)
                    check_finite(f"block {i} {lname} input statistics", res.stats[lname].sq_norm, hint=hint)
                    scores.append(wanda_scores(lin.weight.detach(), res.stats[lname].sq_norm))
                ratios.append(outlier_ratio(scores, request.owl_m))
                hidden = outputs
            finally:
                _release(job, block)
    finally:
        from_zero(shutil.rmtree, owl_job.path, ignore_errors=True)  # each rank has read it
    rates = rates_of(ratios, request.spec.rate, request.owl_lambda)
    return {"m": request.owl_m, "lambda": request.owl_lambda, "ratios": ratios, "rates": rates}


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
    from modules.engine.backward import blockwise_gradients
    from modules.engine.models import DTYPES
    from modules.engine.streaming import available_memory, outer_modules
    from modules.process import remove_stale, temp_sibling

    model, reader, _ = _model(model_dir, dtype)
    prefix, blocks = find_blocks(model)
    outer = outer_modules(model, prefix)
    live: list[int] = []

    def load_block(i: int) -> nn.Module:
        for j in live:
            reader.release(blocks[j])
        live[:] = [i]
        return reader.materialize(blocks[i], f"{prefix}.{i}", device)

    kind = activations
    if kind == "auto":
        width = model.get_input_embeddings().embedding_dim
        need = len(blocks) * input_ids.numel() * width * DTYPES[dtype].itemsize
        kind = "mmap" if need > 0.5 * available_memory() else "memory"
    log = log or logging.getLogger("topiary")
    where = "in memory" if kind == "memory" else "on disk by segments (one more forward)"
    if writes():
        log.info("gradients: block inputs %s (activations: %s)", where, activations)
    root = folder = None
    if state is not None or kind == "mmap":
        rank, world = rank_and_world()
        root = Path(state) if state else temp_sibling(Path(directory).resolve().parent / "grads-state")
        mine = f"{torch.device(device).type}-of-{world}"
        if writes() and root.is_dir():  # another attempt's, on another device type or world
            for other in root.glob("*-rank*"):
                if other.is_dir() and other.name.rpartition("-rank")[0] != mine:
                    shutil.rmtree(other, ignore_errors=True)
        folder = root / f"{mine}-rank{rank}"
        if folder.is_dir():
            remove_stale([folder])  # a killed write's temporary file
    for name, module in outer:
        reader.materialize(module, name, device, recurse=False)
    try:
        return blockwise_gradients(
            model,
            input_ids,
            directory,
            load_block=load_block,
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

    ``run(stage, *args)`` runs one stage (``capture``, ``statistics``, ``masks``, ``update``,
    ``propagate``, ``assemble``) with the arguments of this module's function of that name
    after ``job``: by default that function itself; the flows pass Prefect tasks. Finished
    blocks (their record ``blocks/<i>.json`` in the job's folder) are not run again.

    Under DDP (:func:`modules.engine.statistics.join`) every rank calls this: the passes
    (``statistics``, ``propagate``, OWL's) run on every rank over its share of the windows;
    the other stages, the records and the files are rank 0's (:mod:`modules.engine.ranks`).

    Returns:
        The report, and the index of the first block this call pruned (0 unless it resumed).
    """
    from modules.engine.models import DTYPES
    from modules.process import remove_stale
    from modules.provenance import provenance

    direct = run or (lambda stage, *args: globals()[stage](job, *args))

    def run(stage: str, *args):
        if stage in ("statistics", "propagate"):  # passes over the windows: every rank its share
            return everyone(direct, stage, *args)
        return from_zero(direct, stage, *args)

    log = log or logging.getLogger("topiary")
    request = job.request
    method = get_method(request.method)
    device = torch.device(job.device)
    folder = job.path
    if writes():
        remove_stale(
            [folder / part for part in ("acts", "stats", "masks", "weights", "shards", "blocks", "keep")]
        )
        remove_stale([Path(out_dir).parent])
    start = time.perf_counter()
    model, reader, saved = _model(job.model_dir, job.dtype)
    reader.peak_bytes = 0
    prefix, blocks = find_blocks(model)
    experts_by = None if method.prunes_experts(request.options) and not request.owl else request.method
    check_supported(prefix, blocks, experts_by)  # before any work: every block matrix is pruned or a router
    _check_expert_inputs(prefix, blocks, None if method.data_free else request.method)
    n = len(blocks)
    data_free = request.data_free()
    records, rebuild = from_zero(verified_records, folder, n, log)
    first = len(records)
    if first:
        log.info("resuming at block %d/%d (blocks 1-%d are done)", first + 1, n, first)
    widths = frozenset(lin.in_features for b in blocks for lin in block_linears(b).values())
    chosen = method.chosen(request.options, Context(nsamples=job.nsamples, device=device, widths=widths))
    rates = owl_rates(job, calib_path) if request.owl else None
    captured = None if data_free else run("capture", calib_path)
    inputs = captured and captured["inputs"]
    if rebuild and not data_free:  # the next block's inputs, through the verified blocks
        for i, done in enumerate(records):
            t = time.perf_counter()
            inputs = everyone(replay, job, i, inputs, captured["args"], done["shard"])
            log.info("block %d/%d: replayed %.1f s", i + 1, n, time.perf_counter() - t)
    reports, masks_files = [], []
    for i in range(n):
        if i < first:
            done = records[i]
            reports.append(BlockReport.from_dict(done["report"]))
            masks_files += done["masks"]
            inputs = done["inputs"]
            continue
        rate = rates["rates"][i] if rates else None
        spec = request.spec.with_rate(rate) if rate is not None else request.spec
        pruned: list[str] = []
        groups, dense, stage_files, seen = None, None, [], {}
        stages: list = [None]
        k = 0
        while k < len(stages):
            stats = None
            if data_free:
                linears = [*block_linears(blocks[i]), *block_experts(blocks[i])]
                stages, groups = [linears], []
            else:
                t = time.perf_counter()
                s = run("statistics", i, k, inputs, captured["args"], pruned, groups)
                if k == 0:
                    groups, dense = s["groups"], s["dense"]
                    stages = groups if request.true_sequential else [[m for g in groups for m in g]]
                stats, linears, seen = s["stats"], s["linears"], s.get("experts") or seen
                if k == len(stages) - 1:  # fused experts, pruned last on their own statistics (experts.py)
                    linears = [*linears, *block_experts(blocks[i])]
                log.info("block %d/%d: statistics %.1f s", i + 1, n, time.perf_counter() - t)
            mask = weights = None
            if method.mask_stage(request.options):
                t = time.perf_counter()
                mask = run("masks", i, k, stats, linears, pruned, grads_dir, rate)["masks"]
                stage_files.append(mask)
                log.info("block %d/%d: masks (%s) %.1f s", i + 1, n, request.method, time.perf_counter() - t)
            if method.update_stage():  # on this stage's dense weights (and its mask), as in memory
                t = time.perf_counter()
                weights = run("update", i, k, stats, linears, pruned, mask, grads_dir, rate)["weights"]
                stage_files.append(weights)
                log.info("block %d/%d: update (%s) %.1f s", i + 1, n, request.method, time.perf_counter() - t)
            pruned.append(weights or mask)
            k += 1
        setting = {"target": spec.target, "setting": str(spec), "groups": groups or []}
        if seen:
            setting["experts"] = seen
            _log_experts(log, i, n, seen)
        t = time.perf_counter()
        args = captured and captured["args"]
        result = run("propagate", i, None if data_free else inputs, args, dense, pruned, setting)
        log.info("block %d/%d: propagate %.1f s", i + 1, n, time.perf_counter() - t)
        done = from_zero(_finish_block, job, i, setting, stage_files, result)
        reports.append(BlockReport.from_dict(done["report"]))
        masks_files += done["masks"]
        inputs = result["inputs"]
    world = rank_and_world()[1]
    report = PruneReport(
        method=request.method,
        setting=str(request.spec),
        target=request.spec.target,
        plan=request.to_json(),
        nsamples=job.nsamples,
        seqlen=_seqlen(calib_path) if calib_path else 0,
        blocks_prefix=prefix,
        blocks=reports,
        chosen=chosen,
        provenance=provenance(device, DTYPES[job.dtype], **chosen),
        owl=rates,
        seconds={"total": round(time.perf_counter() - start, 4)},
        world_size=world,
        strategy=type(_trainer(job).strategy).__name__ if world > 1 else None,
        left_dense=left_dense(model, prefix, saved),
    )
    report.phases["streaming"] = {
        "peak_loaded_bytes": reader.peak_bytes,
        "largest_block_bytes": max(sum(t.numel() * t.element_size() for t in b.parameters()) for b in blocks),
        "activations": None if data_free else job.activations,
    }
    run("assemble", str(out_dir), report.to_dict(), masks_files)
    written = Path(out_dir) / "pruning_report.json"
    report.outside = from_zero(lambda: json.loads(written.read_text())["outside"])
    from_zero(shutil.rmtree, folder, ignore_errors=True)
    return report, first


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


def _seqlen(calib_path: str) -> int:
    from safetensors import safe_open

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
    ):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)


def _keep_masks(job: Job, index: int, files: list[str]) -> str | None:
    """Block ``index``'s final keep-masks, copied one mask at a time into the file that
    ``assemble`` puts in the output's ``masks/`` (:func:`modules.engine.masks.save_block_masks`'
    bytes: full parameter names, no metadata)."""
    masks = _masks_in(files)
    if not masks:
        return None
    layout = {name: {name: (torch.bool, shape)} for name, (_, _, shape) in masks.items()}
    path = job.path / "keep" / f"{index:04d}.safetensors"
    read = lambda name: {name: _read_one(*masks[name][:2])}  # noqa: E731
    return str(_save_per_linear(path, layout, read, metadata={}))


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
    given, runs each stage in place of the stage function ``stage`` of this module called
    as ``fn(job, *args)`` (a benchmark wraps it to time each stage and read its memory peak).
    """
    import tempfile

    from modules.engine.names import check_device, resolve_model
    from modules.engine.streaming import checkpoint_dtype
    from modules.process import remove_stale, temp_prefix

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
