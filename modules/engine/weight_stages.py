"""The stages of a streamed prune that prune weights, one linear at a time, from files to files.

- :func:`masks`: the keep-masks of a method that selects (magnitude, Wanda, GBLM) or of the
  selector a weight update starts from (ADMM's ``selector``, or a mask file).
- :func:`update`: the pruned weights of a method that updates them (SparseGPT, ADMM,
  ADMM-Grad), from the statistics and (ADMM) the masks.

A stage reads each linear's weight (its earlier pruned files applied), statistics and
gradient when its turn comes and writes its result before the next linear is read, so it
holds one linear, never the block. A fused experts tensor is pruned one expert's matrix at
a time, on that expert's statistics (:mod:`modules.engine.experts`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import nn

from modules.engine.blocks import block_experts, block_linears
from modules.engine.expert_groups import parse_unit
from modules.engine.experts import each_expert
from modules.engine.files import load, save_per_linear
from modules.engine.gradients import expert_gradients, load_block_grads
from modules.engine.job import apply_pruned, blocks_of, checkpoint_of, expert_rows, release
from modules.engine.masks import MaskFile
from modules.engine.request import Job, PruneRequest
from modules.errors import TopiaryError
from modules.process import pause_point
from modules.pruning.registry import MASK_FILE, Context, get_method
from modules.pruning.sparsity import SparsitySpec, check_finite, overflow_hint
from modules.pruning.stats import LayerStats


def method_options(request: PruneRequest, context: Context) -> tuple[dict, MaskFile | None]:
    """The method's keyword options, checked and bound to the run, and the mask source if any."""
    method = get_method(request.method)
    problems = method.problems(request.options)
    if problems:
        raise TopiaryError(f"options of {request.method}: " + "; ".join(problems))
    opts = method.bind(request.options, context)
    masks = MaskFile(opts.pop(MASK_FILE)) if MASK_FILE in opts else None
    return opts, masks


def checked_weight(lin: nn.Linear, stats: LayerStats | None, spec: SparsitySpec, where: str) -> torch.Tensor:
    """An fp32 copy of ``lin``'s weight, checked before a method sees it: N:M width, finite
    weight and statistics."""
    W = lin.weight.detach().to(torch.float32, copy=True)
    spec.check_width(W.shape[1], where=where)
    check_finite(f"{where} weight", W)
    if stats is not None:
        hint = overflow_hint(lin.weight.dtype)
        check_finite(f"{where} input statistics (sq_norm, gram)", stats.sq_norm, stats.gram, hint=hint)
    return W


def _layer_stats(stats: dict[str, torch.Tensor], name: str) -> LayerStats:
    return LayerStats(int(stats[f"{name}.tokens"]), stats[f"{name}.sq_norm"], stats.get(f"{name}.gram"))


def _linear_stats(
    job: Job, index: int, name: str, stats_path: str | None, grads_dir, needs: set, where: str
) -> LayerStats | None:
    """Linear ``name``'s statistics of block ``index`` (with its gradient when ``needs`` has ``grad``)."""
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
    _, reader, _ = checkpoint_of(job)
    reader.materialize(lin, where, job.device, recurse=False)
    apply_pruned({f"{where}.weight": lin.weight}, pruned, job.device)
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
    prefix, blocks = blocks_of(job)
    where = f"{prefix}.{index}.{name}"
    lin = _load_linear(job, block_linears(blocks[index], routers=job.request.routers)[name], where, pruned)
    try:
        layer = _linear_stats(job, index, name, stats, grads_dir, needs, where)
        W = checked_weight(lin, layer, spec, where)
    finally:
        release(job, lin, recurse=False)  # W is the copy the method works on
    return where, lin, layer, W


def _spec(job: Job, rate: float | None) -> SparsitySpec:
    spec = job.request.spec
    return spec.with_rate(rate) if rate is not None else spec


def _options(job: Job) -> tuple[dict, MaskFile | None]:
    return method_options(job.request, Context(nsamples=job.nsamples, device=torch.device(job.device)))


def masks(
    job: Job,
    index: int,
    group: int,
    stats: str,
    linears: list[str],
    pruned: list[str],
    grads_dir: str | None = None,
    rate: float | None = None,
) -> dict:
    """Keep-masks of block ``index``'s ``linears`` (pruning group ``group``): the method's own
    (it selects) or its selector's.

    One linear at a time, its mask written as soon as it is made; the scores take the place
    of the linear's fp32 copy, and no pruned copy is made (:meth:`Method.mask`).
    """
    request = job.request
    method = get_method(request.method)
    spec = _spec(job, rate)
    opts, mask_file = _options(job)
    t = time.perf_counter()
    prefix, blocks = blocks_of(job)
    lins = block_linears(blocks[index], routers=request.routers)
    experts = block_experts(blocks[index])

    def keep_of(W: torch.Tensor, layer: LayerStats | None) -> torch.Tensor:
        if method.selects:
            return method.mask(W, layer, spec, overwrite=True, **opts)
        return method.select(W, layer, spec, opts, overwrite=True)

    def compute(name: str) -> dict[str, torch.Tensor]:
        if parse_unit(name):
            tensor, where, a = _unit_rows(job, index, name, pruned)
            tensor_name = parse_unit(name)[0]
            if mask_file is not None and not method.selects:  # each expert's matrix by its own key
                return {
                    f"{where}.{a + j}.keep": mask_file.get(f"{where}.{a + j}", tensor[j].shape, tensor.device)
                    for j in range(len(tensor))
                }
            grad = expert_gradients(grads_dir, index, tensor_name, request.needs(), job.device)
            out = {}
            for e, W, layer in _each_expert(job, name, where, tensor, experts[tensor_name], stats, grad):
                keep = keep_of(W, layer)
                out[f"{where}.{e}.keep"] = keep.T.contiguous() if experts[tensor_name] else keep
            return out
        where, _, layer, W = _stage_linear(job, index, name, stats, pruned, grads_dir, spec, request.needs())
        if mask_file is not None and not method.selects:
            return {f"{where}.weight.keep": mask_file.get(f"{where}.weight", W.shape, W.device)}
        return {f"{where}.weight.keep": keep_of(W, layer)}

    layout = {
        n: _unit_layout(blocks[index], f"{prefix}.{index}", n, keep=True)
        if parse_unit(n)
        else {f"{prefix}.{index}.{n}.weight.keep": (torch.bool, tuple(lins[n].weight.shape))}
        for n in linears
    }
    path = save_per_linear(job.path / "masks" / f"{index:04d}-{group}.safetensors", layout, compute)
    return {"masks": str(path), "seconds": round(time.perf_counter() - t, 4)}


def _unit_rows(job: Job, index: int, unit: str, pruned: list[str]) -> tuple[torch.Tensor, str, int]:
    """``(rows, where, a)``: the experts of ``unit`` (``<tensor>[a:b]``) of block ``index``'s fused
    tensor ``where`` on the job's device, the stage's earlier pruned files applied."""
    name, a, b = parse_unit(unit)
    where = f"{blocks_of(job)[0]}.{index}.{name}"
    return expert_rows(job, where, (a, b), pruned), where, a


def _unit_layout(block: nn.Module, prefix: str, unit: str, keep: bool) -> dict[str, tuple]:
    """The keys of a unit's experts in a stage file: ``<tensor>.<e>.keep`` (masks), or
    ``<tensor>.<e>`` and ``<tensor>.<e>.mask`` (update), each expert's matrix as stored."""
    name, a, b = parse_unit(unit)
    param = block.get_parameter(name)
    shape, where = tuple(param.shape[1:]), f"{prefix}.{name}"
    if keep:
        return {f"{where}.{e}.keep": (torch.bool, shape) for e in range(a, b)}
    return {k: v for e in range(a, b) for k, v in ((f"{where}.{e}", (param.dtype, shape)),
                                                 (f"{where}.{e}.mask", (torch.bool, shape)))}  # fmt: skip


def _each_expert(
    job: Job, unit: str, where: str, tensor: torch.Tensor, transposed: bool, stats: str | None, grad=None
) -> Iterator[tuple[int, torch.Tensor, LayerStats | None]]:
    """:func:`modules.engine.experts.each_expert` on the unit's statistics file ``stats``."""
    name, a, _ = parse_unit(unit)
    keys = [f"{name}.{k}" for k in ("tokens", "sq_norm", "gram", "routed")]
    sums = None if stats is None else load(stats, job.device, keys)
    yield from each_expert(tensor, name, where, transposed, sums, grad, first=a)


def _expert_update(
    job: Job,
    index: int,
    unit: str,
    transposed: bool,
    stats: str,
    pruned: list[str],
    mask: str | None,
    fn,
    grad,
) -> dict[str, torch.Tensor]:
    """The pruned matrices of ``unit``'s experts and their keep-masks (as stored): ``fn(W, stats,
    kwargs) -> (W_pruned, keep)`` on each expert's matrix (:func:`_each_expert`), on ``mask``'s
    keep-mask of it if given."""
    tensor, where, a = _unit_rows(job, index, unit, pruned)
    out = {}
    for e, W, layer in _each_expert(job, unit, where, tensor, transposed, stats, grad):
        kwargs = {}
        if mask:
            given = load(mask, job.device, [f"{where}.{e}.keep"])[f"{where}.{e}.keep"]
            kwargs["mask"] = given.T if transposed else given
        W_pruned, k = fn(W, layer, kwargs)
        check_finite(f"{where} expert {e} weight after pruning", W_pruned)
        stored = W_pruned.T if transposed else W_pruned
        out[f"{where}.{e}"] = stored.to(tensor.dtype).contiguous()
        out[f"{where}.{e}.mask"] = (k.T if transposed else k).contiguous()
    return out


def update(
    job: Job,
    index: int,
    group: int,
    stats: str,
    linears: list[str],
    pruned: list[str],
    mask: str | None = None,
    grads_dir: str | None = None,
    rate: float | None = None,
) -> dict:
    """Pruned weights of block ``index``'s ``linears`` (pruning group ``group``): the method's
    weight update (on ``mask`` for ADMM).

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
    lins = block_linears(blocks[index], routers=request.routers)
    experts = block_experts(blocks[index])

    def compute(name: str) -> dict[str, torch.Tensor]:
        if parse_unit(name):

            def fn(W, layer, kwargs):
                return method.fn(W, layer, spec, **opts, **kwargs)

            tensor_name = parse_unit(name)[0]
            grad = expert_gradients(grads_dir, index, tensor_name, needs, job.device)
            return _expert_update(job, index, name, experts[tensor_name], stats, pruned, mask, fn, grad)
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
        if parse_unit(n):
            layout[n] = _unit_layout(blocks[index], f"{prefix}.{index}", n, keep=False)
            continue
        key, shape, dtype = f"{prefix}.{index}.{n}.weight", tuple(lins[n].weight.shape), lins[n].weight.dtype
        layout[n] = {key: (dtype, shape), f"{key}.mask": (torch.bool, shape)}
    computed: list[str] = []

    def compute_then_pause(name: str) -> dict[str, torch.Tensor]:
        out = compute(name)
        computed.append(name)
        if len(computed) == 1:
            pause_point("update")  # test hook: inside the update, its file partly written
        return out

    path = save_per_linear(
        job.path / "weights" / f"{index:04d}-{group}.safetensors", layout, compute_then_pause
    )
    return {"weights": str(path), "seconds": round(time.perf_counter() - t, 4)}
