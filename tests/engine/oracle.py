"""The in-memory block-sequential prune: the test oracle the streamed engine must equal.

Not part of the engine (nothing in ``modules/``, ``tasks/`` or ``flows/`` imports it): the
tests compare the streamed prune (:mod:`modules.engine.loop`) with it, and a few benchmarks
that prune a model object in memory use it. It shares the engine's per-linear checks
(:func:`modules.engine.weight_stages.checked_weight`, :func:`~modules.engine.weight_stages.method_options`).

The unit of work is one decoder block (:func:`prune_block`): collect the statistics of
its linears on the block's inputs (one pass with hooks, fp32), prune every linear with
the chosen method, then run the pruned block on the same inputs to get the next block's
inputs (a second pass, which also measures the block's reconstruction error against
its dense outputs from the first pass). :func:`prune_model` captures the first block's
inputs and loops. Everything a block needs is passed in explicitly (its inputs, the
captured call arguments, the request, its gradients, its sparsity), so blocks can be
loaded, pruned and written one at a time, and a run can resume between blocks.

Options of :class:`modules.engine.request.PruneRequest`:

- ``true_sequential``: prune the linears of a block group by group in the order the
  block reads them (q/k/v, then o, then gate/up, then down), re-collecting the
  statistics of each group after the earlier groups are pruned (SparseGPT's option).
- ``owl``: non-uniform sparsity across blocks (OWL). The allocation needs the outlier
  ratios of *all* blocks before the first is pruned, so a first dense pass over the
  whole model collects the input norms (no Gram matrices) and scores every block with
  Wanda's ``|W| * ||X||``; then the pruning pass prunes block ``i`` at ``rate_i``.
- ``report_error``: measure each block's reconstruction error even for a data-free
  method (magnitude). A data-free method otherwise runs without any calibration pass:
  no input capture, no statistics, no propagation, and its report's
  ``reconstruction_error`` is ``None``. Methods that read data always report the error
  (their propagation pass measures it at no extra cost).
- ``options``: keyword arguments of the method; ``selector="mask"`` with
  ``mask_file=<.safetensors file or folder of them>`` reads each linear's keep-mask by
  its full parameter name and passes it as ``mask=`` (ADMM's user-given mask).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from modules.engine.blocks import (
    BlockArgs,
    block_device,
    block_experts,
    block_linears,
    capture_inputs,
    check_supported,
    dense_weights,
    expert_matrix,
    find_blocks,
    left_dense,
)
from modules.engine.experts import each_expert
from modules.engine.masks import MaskFile, save_block_masks
from modules.engine.report import BlockReport, LinearReport, PruneReport
from modules.engine.request import PruneRequest
from modules.engine.weight_stages import checked_weight, method_options
from modules.errors import TopiaryError
from modules.provenance import provenance
from modules.pruning.registry import Context, get_method
from modules.pruning.sparsity import SparsitySpec, check_finite, overflow_hint
from modules.pruning.stats import LayerStats

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prune_linear(
    lin: nn.Linear,
    stats: LayerStats | None,
    request: PruneRequest,
    spec: SparsitySpec,
    opts: dict,
    *,
    where: str,
    key: str,
    grad: torch.Tensor | None,
    mask_file: MaskFile | None,
) -> torch.Tensor:
    """Prune one linear in place; returns its keep-mask. ``key`` is its full parameter name."""
    method = get_method(request.method)
    W = checked_weight(lin, stats, spec, where)
    if grad is not None:
        grad = grad.to(W.device, torch.float32)
        check_finite(f"{where} gradients", grad)
        stats = replace(stats, grad=grad)
    kwargs = dict(opts)
    if mask_file is not None:
        kwargs["mask"] = mask_file.get(key, W.shape, W.device)
    W_pruned, keep = method.run(W, stats, spec, **kwargs)
    check_finite(f"{where} weight after {request.method}", W_pruned)
    lin.weight.data.copy_(W_pruned.to(lin.weight.dtype))
    return keep


def _prune_and_record(
    lname: str,
    lin: nn.Linear,
    stats: LayerStats | None,
    request: PruneRequest,
    spec: SparsitySpec,
    opts: dict,
    *,
    index: int,
    name: str,
    grad: torch.Tensor | None,
    mask_file: MaskFile | None,
    per_linear: dict[str, LinearReport],
    masks: dict[str, torch.Tensor] | None,
) -> None:
    """Prune linear ``lname`` of a block; record its achieved sparsity and (if asked) its mask."""
    where = f"{name}.{lname}" if name else f"block {index} {lname}"
    key = f"{name}.{lname}.weight" if name else f"{lname}.weight"
    keep = _prune_linear(
        lin, stats, request, spec, opts, where=where, key=key, grad=grad, mask_file=mask_file
    )
    per_linear[lname] = LinearReport(shape=list(keep.shape), pruned=int((~keep).sum()))
    if masks is not None:
        masks[key] = keep.detach().cpu()


def _prune_experts(
    block: nn.Module,
    sums: dict[str, torch.Tensor] | None,
    grads: dict[str, torch.Tensor] | None,
    request: PruneRequest,
    spec: SparsitySpec,
    opts: dict,
    *,
    name: str,
    per_linear: dict[str, LinearReport],
    masks: dict[str, torch.Tensor] | None,
) -> None:
    """Prune the block's fused experts in place, one expert's matrix at a time on its statistics
    ``sums`` (:meth:`modules.engine.experts.ExpertStats.result`; None: data-free) and its slice of
    ``grads``; record each tensor's pruned count (and its keep-mask if asked) under its name."""
    method = get_method(request.method)
    for pname, transposed in block_experts(block).items():
        param, where = block.get_parameter(pname), f"{name}.{pname}"
        grad = (
            grads[pname].to(param.device, torch.float32)
            if grads is not None and "grad" in request.needs()
            else None
        )
        keep = torch.empty(param.shape, dtype=torch.bool, device=param.device)
        for e, W, layer in each_expert(param.detach(), pname, where, transposed, sums, grad):
            W_pruned, k = method.run(W, layer, spec, **opts)
            check_finite(f"{where} expert {e} weight after {request.method}", W_pruned)
            expert_matrix(param.data, e, transposed).copy_(W_pruned)
            expert_matrix(keep, e, transposed).copy_(k)
        per_linear[pname] = LinearReport(shape=list(keep.shape), pruned=int((~keep).sum()))
        if masks is not None:
            masks[where] = keep.cpu()


def _block_report(
    index: int,
    name: str,
    spec: SparsitySpec,
    per_linear: dict[str, LinearReport],
    groups: list[list[str]],
    error: float | None,
    seconds: dict[str, float],
) -> BlockReport:
    return BlockReport(
        index=index,
        name=name,
        target=spec.target,
        setting=str(spec),
        linears=per_linear,
        stats_groups=groups,
        reconstruction_error=error,
        seconds={k: round(v, 4) for k, v in seconds.items()},
    )


def prune_block(
    block: nn.Module,
    inputs: torch.Tensor,
    block_args: BlockArgs,
    request: PruneRequest,
    grads: dict[str, torch.Tensor] | None = None,
    *,
    index: int = 0,
    name: str = "",
    spec: SparsitySpec | None = None,
    trainer=None,
    masks: dict[str, torch.Tensor] | None = None,
    exclude: tuple[torch.Tensor, ...] = (),
    nsamples: int | None = None,
    outputs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BlockReport]:
    """Prune one decoder block in place and return its outputs on the same inputs.

    Args:
        block: The decoder block (dense on entry, pruned on return).
        inputs: Its inputs ``(n, seq, hidden)`` on the block's device.
        block_args: Its other call arguments (from :func:`modules.engine.blocks.capture_inputs`).
        request: Method, sparsity and options.
        grads: GBLM gradient aggregates by linear name within the block (methods needing ``grad``).
        index: Block number (for messages and the report).
        name: Qualified name of the block (``model.layers.3``); full parameter names,
            used by masks, are ``{name}.{linear}.weight``.
        spec: This block's sparsity (OWL); default ``request.spec``.
        trainer: Lightning Trainer for the passes; default one device, the block's.
        masks: If a dict, receives the keep-mask of every linear by full parameter name (CPU).
        exclude: Weights that stay dense even if a linear in the block holds them.
        nsamples: Number of calibration windows (default ``inputs.shape[0]``).
        outputs: Buffer like ``inputs`` to write the outputs into (zeroed first; e.g. a
            memory-mapped one, :class:`modules.engine.streaming.ActivationStore`); default a new one.

    Returns:
        ``(outputs, report)``: outputs of the *pruned* block ``(n, seq, hidden)`` (under
        DDP, valid at this rank's samples), and its :class:`BlockReport`: per-linear pruned
        weights, the groups of linears sharing statistics, the relative reconstruction
        error ``||Y_pruned - Y_dense|| / ||Y_dense||`` and the time of each stage.
    """
    from modules.engine.statistics import make_trainer, run_pass

    spec = spec or request.spec
    needs = request.needs()
    if "grad" in needs and grads is None:
        raise TopiaryError(f"method {request.method}: needs gradients (the gradient step) for block {index}")
    trainer = trainer or make_trainer(block_device(block))
    context = Context(nsamples=nsamples or inputs.shape[0], device=block_device(block))
    opts, mask_file = method_options(request, context)
    linears = block_linears(block, exclude=exclude, routers=request.routers)
    outputs = torch.zeros_like(inputs) if outputs is None else outputs.zero_()
    seconds = {"stats": 0.0, "prune": 0.0, "propagate": 0.0}
    run = {"block_args": block_args, "gram": "gram" in needs, "batch_size": request.batch_size}
    moe = request.moe_calibration if block_experts(block) else None

    t = time.perf_counter()
    first = run_pass(trainer, block, inputs, collect=set(linears), outputs=outputs, experts=moe, **run)
    _sync(block_device(block))
    seconds["stats"] += time.perf_counter() - t
    missing = [n for n in linears if n not in first.stats]
    if missing:
        raise TopiaryError(
            f"block {index} ({name}): linears never called in its forward: {', '.join(missing)}"
        )
    groups = [[n for n in g if n in linears] for g in first.groups]
    groups = [g for g in groups if g]
    stages = groups if request.true_sequential else [[n for g in groups for n in g]]

    per_linear: dict[str, LinearReport] = {}
    for k, stage in enumerate(stages):
        stats, sums = first.stats, first.experts
        if k > 0:
            t = time.perf_counter()
            result = run_pass(trainer, block, inputs, collect=set(stage), experts=moe, **run)
            stats, sums = result.stats, result.experts
            _sync(block_device(block))
            seconds["stats"] += time.perf_counter() - t
        t = time.perf_counter()
        for lname in stage:
            grad = None
            if grads is not None and "grad" in needs:
                if lname not in grads:
                    raise TopiaryError(f"gradients: block {index} has no gradient for {lname}")
                grad = grads[lname]
            _prune_and_record(
                lname,
                linears[lname],
                stats[lname],
                request,
                spec,
                opts,
                index=index,
                name=name,
                grad=grad,
                mask_file=mask_file,
                per_linear=per_linear,
                masks=masks,
            )
        if k == len(stages) - 1:  # the experts last, on the last stage's statistics (as streamed)
            _prune_experts(
                block, sums, grads, request, spec, opts, name=name, per_linear=per_linear, masks=masks
            )
        _sync(block_device(block))
        seconds["prune"] += time.perf_counter() - t

    t = time.perf_counter()
    last = run_pass(trainer, block, inputs, outputs=outputs, reference=outputs, **run)
    seconds["propagate"] += time.perf_counter() - t
    error = math.sqrt(last.err_sq / last.ref_sq) if last.ref_sq else 0.0
    return outputs, _block_report(index, name, spec, per_linear, groups, error, seconds)


def prune_block_weights(
    block: nn.Module,
    request: PruneRequest,
    *,
    index: int = 0,
    name: str = "",
    spec: SparsitySpec | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    exclude: tuple[torch.Tensor, ...] = (),
) -> BlockReport:
    """Prune one block in place with a data-free method (``stats=None``), running no forward.

    Arguments as :func:`prune_block`. Returns its report, with ``reconstruction_error``
    ``None`` (nothing was measured).
    """
    spec = spec or request.spec
    opts, mask_file = method_options(request, Context(device=block_device(block)))
    per_linear: dict[str, LinearReport] = {}
    t = time.perf_counter()
    for lname, lin in block_linears(block, exclude=exclude, routers=request.routers).items():
        _prune_and_record(
            lname,
            lin,
            None,
            request,
            spec,
            opts,
            index=index,
            name=name,
            grad=None,
            mask_file=mask_file,
            per_linear=per_linear,
            masks=masks,
        )
    _prune_experts(block, None, None, request, spec, opts, name=name, per_linear=per_linear, masks=masks)
    _sync(block_device(block))
    seconds = {"stats": 0.0, "prune": time.perf_counter() - t, "propagate": 0.0}
    return _block_report(index, name, spec, per_linear, [], None, seconds)


def owl_block_rates(
    model: nn.Module,
    input_ids: torch.Tensor,
    request: PruneRequest,
    *,
    trainer=None,
) -> tuple[list[float], list[float]]:
    """OWL's first, dense pass: per-block outlier ratios of Wanda scores, and the rates.

    Runs the dense model block by block on the calibration windows, collecting only the
    input norms, scores every linear with ``|W| * ||X_j||`` and takes the share of a
    block's scores above ``owl_m`` times their mean (all its linears together).

    Returns:
        ``(ratios, rates)``: one of each per block; the rates average to the target.
    """
    from modules.engine.statistics import make_trainer
    from modules.pruning.owl import owl_rates

    if request.spec.is_nm:
        raise TopiaryError(f"owl: needs an unstructured sparsity rate, not pattern {request.spec}")
    _, blocks = find_blocks(model)
    dense = dense_weights(model)
    trainer = trainer or make_trainer(block_device(blocks[0]))
    inputs, block_args = capture_inputs(model, input_ids, blocks)
    ratios = []
    for i, block in enumerate(blocks):
        outputs = torch.zeros_like(inputs)
        ratios.append(
            owl_block_ratio(
                block, inputs, block_args, request, outputs, trainer=trainer, index=i, exclude=dense
            )
        )
        inputs = outputs
    return ratios, owl_rates(ratios, request.spec.rate, request.owl_lambda)


def owl_block_ratio(
    block: nn.Module,
    inputs: torch.Tensor,
    block_args: BlockArgs,
    request: PruneRequest,
    outputs: torch.Tensor,
    *,
    trainer,
    index: int = 0,
    exclude: tuple[torch.Tensor, ...] = (),
) -> float:
    """One dense block's OWL outlier ratio (see :func:`owl_block_rates`); its outputs go to ``outputs``.
    Its fused experts' matrices are scored too, each on its own statistics (``moe_calibration``),
    all held at once."""
    from modules.engine.statistics import run_pass
    from modules.pruning.owl import outlier_ratio
    from modules.pruning.wanda import wanda_scores

    linears = block_linears(block, exclude=exclude, routers=request.routers)
    res = run_pass(
        trainer,
        block,
        inputs,
        block_args,
        collect=set(linears),
        outputs=outputs,
        batch_size=request.batch_size,
        experts=request.moe_calibration if block_experts(block) else None,
    )
    scores = []
    for lname, lin in linears.items():
        hint = overflow_hint(lin.weight.dtype)
        check_finite(f"block {index} {lname} input statistics", res.stats[lname].sq_norm, hint=hint)
        scores.append(wanda_scores(lin.weight.detach(), res.stats[lname].sq_norm))
    for pname, transposed in block_experts(block).items():
        param = block.get_parameter(pname).detach()
        for _, W, layer in each_expert(param, pname, f"block {index} {pname}", transposed, res.experts):
            scores.append(wanda_scores(W, layer.sq_norm, overwrite=True))
    return outlier_ratio(scores, request.owl_m)


def prune_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    request: PruneRequest,
    *,
    grads_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    trainer=None,
) -> PruneReport:
    """Prune every decoder block of ``model`` in place, block by block.

    Embeddings and the LM head stay dense (also when tied), and so do routers unless
    ``request.routers`` is ``prune``; fused experts
    are pruned one expert's matrix at a time (:func:`modules.engine.experts.each_expert`, the
    streamed prune's rule). The model may sit on CPU or a GPU; statistics accumulate in fp32
    on the block's device, whatever the dtype.

    Args:
        model: A Hugging Face causal LM.
        input_ids: Calibration windows, LongTensor ``(n, seqlen)``.
        request: Method, sparsity and options.
        grads_dir: Output folder of :func:`modules.engine.gradients.compute_gradients` (GBLM).
        mask_dir: If given, each block's keep-masks go to ``block_{i:04d}.safetensors``
            there, keyed by full parameter name (readable back with ``mask_file``).
        trainer: Lightning Trainer for every pass (e.g. DDP); default one device, the model's.

    Returns:
        The :class:`modules.engine.report.PruneReport`: the request, one report per block,
        the achieved sparsity over the pruned linears, the OWL ratios and rates when used,
        the time of each stage and the ``provenance`` of the run
        (:func:`modules.provenance.provenance`: commit, versions, device, dtype, threads).
    """
    from modules.engine.gradients import load_block_grads
    from modules.engine.statistics import make_trainer

    start = time.perf_counter()
    prefix, blocks = find_blocks(model)
    check_supported(prefix, blocks)
    dense = dense_weights(model)
    if "grad" in request.needs() and grads_dir is None:
        raise TopiaryError(
            f"method {request.method}: needs the gradient step first (compute_gradients); "
            "pass its folder as grads_dir"
        )
    if request.owl and request.spec.is_nm:
        raise TopiaryError(f"owl: needs an unstructured sparsity rate, not pattern {request.spec}")
    widths = frozenset(lin.in_features for b in blocks for lin in block_linears(b, exclude=dense).values())
    context = Context(nsamples=input_ids.shape[0], device=block_device(blocks[0]), widths=widths)
    method_options(request, context)  # bad options fail before any pass
    resolved = get_method(request.method).chosen(request.options, context)
    data_free = request.data_free()
    if trainer is None and not data_free:  # a data-free run needs no Trainer (about 0.2 s to make)
        trainer = make_trainer(block_device(blocks[0]))
    was_training = model.training
    model.eval()
    try:
        owl = None
        t = time.perf_counter()
        if request.owl:
            ratios, rates = owl_block_rates(model, input_ids, request, trainer=trainer)
            owl = {"m": request.owl_m, "lambda": request.owl_lambda, "ratios": ratios, "rates": rates}
        owl_seconds = time.perf_counter() - t

        t = time.perf_counter()
        if not data_free:
            inputs, block_args = capture_inputs(model, input_ids, blocks)
        capture_seconds = time.perf_counter() - t

        reports = []
        for i, block in enumerate(blocks):
            grads = load_block_grads(grads_dir, i) if "grad" in request.needs() else None
            spec = request.spec.with_rate(owl["rates"][i]) if owl else request.spec
            masks: dict[str, torch.Tensor] | None = {} if mask_dir is not None else None
            if data_free:
                report = prune_block_weights(
                    block, request, index=i, name=f"{prefix}.{i}", spec=spec, masks=masks, exclude=dense
                )
            else:
                inputs, report = prune_block(
                    block,
                    inputs,
                    block_args,
                    request,
                    grads,
                    index=i,
                    name=f"{prefix}.{i}",
                    spec=spec,
                    trainer=trainer,
                    masks=masks,
                    exclude=dense,
                    nsamples=input_ids.shape[0],
                )
            if mask_dir is not None and (trainer is None or trainer.global_rank == 0):
                save_block_masks(mask_dir, i, masks)
            reports.append(report)
            error = report.reconstruction_error
            log.info(
                "block %d/%d pruned: error %s (%s)",
                i + 1,
                len(blocks),
                "not measured" if error is None else f"{error:.4f}",
                ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items()),
            )
    finally:
        model.train(was_training)

    world = int(getattr(trainer, "world_size", 1))  # no Trainer in a data-free run
    report = model_report(
        request,
        input_ids,
        prefix,
        reports,
        device=block_device(blocks[0]),
        dtype=next(model.parameters()).dtype,
        world_size=world,
        strategy=type(trainer.strategy).__name__ if world > 1 else None,
        chosen=resolved,
        owl=owl,
        seconds={"owl": owl_seconds, "capture": capture_seconds},
        start=start,
    )
    report.left_dense = left_dense(model, prefix, routers=request.routers)
    return report


def model_report(
    request: PruneRequest,
    input_ids: torch.Tensor,
    prefix: str,
    reports: list[BlockReport],
    *,
    device: torch.device,
    dtype: torch.dtype,
    world_size: int,
    strategy: str | None = None,
    chosen: dict,
    owl: dict | None,
    seconds: dict[str, float],
    start: float,
) -> PruneReport:
    """The run's :class:`PruneReport` from its block reports (what :func:`prune_model` returns).

    ``seconds`` holds the ``owl`` and ``capture`` times; ``start`` is the run's ``time.perf_counter()``.
    """
    request_dict = request.to_json()
    report = PruneReport(
        method=request.method,
        setting=str(request.spec),
        target=request.spec.target,
        plan=request_dict,
        nsamples=int(input_ids.shape[0]),
        seqlen=int(input_ids.shape[1]),
        blocks_prefix=prefix,
        blocks=reports,
        chosen=chosen,
        provenance=provenance(device, dtype, **chosen),
        owl=owl,
        world_size=world_size,
        strategy=strategy,
    )
    report.seconds = {
        **{k: round(v, 4) for k, v in seconds.items()},
        **{k: round(v, 4) for k, v in report.stage_seconds().items()},
        "total": round(time.perf_counter() - start, 4),
    }
    return report
