"""The update stage (a method's weight update per block), propagation and assembly.

``update`` computes the pruned weights of one block's linears (SparseGPT, ADMM on its
masks, ADMM-Grad), ``propagate`` runs the pruned block on its inputs (the next block's
inputs, the reconstruction error, the block's output shard) and ``assemble`` writes the
pruned model; the loop over blocks that calls them is :func:`flows.prune.prune_blocks`.
Per-block stages are cached by :func:`tasks.statistics.block_key`; the whole prune by
:func:`prune_key`: the dense model's fingerprint and dtype, the ``prune`` section, the
calibration windows' hash and, for GBLM, the gradients' hash. The pruned model's folder
is ``<work_dir>/models/<method>-<setting>-<key>``; its resume state lives in
``<work_dir>/runs/<key>`` until the model is assembled.
"""

from __future__ import annotations

from pathlib import Path

from tasks.cache import cache_key_fn, ref_hash, stage_key, task
from tasks.statistics import block_key

REPORT = "pruning_report.json"
MASKS = "masks"
WEIGHT_FILES = ("model*.safetensors", "config.json")


def masks_source(prune: dict) -> dict | None:
    """The prune section whose final keep-masks a ``masks_from`` run's update starts from: the
    same section (sparsity, OWL...) with the source's method and ``masks_from_options`` as its
    options (none: its defaults). It is pruned as a step of its own (the pipeline's
    ``masks_from``), cached like any prune: a run of the same section, in this flow or
    another, is the same step."""
    source = prune.get("masks_from")
    if not source:
        return None
    options = dict(prune.get("masks_from_options") or {})
    return {**prune, "method": source, "options": options, "masks_from": None, "masks_from_options": {}}


def plan_from_config(prune: dict, masks: dict | None = None):
    """The :class:`modules.engine.request.PruneRequest` of a ``prune`` config section.

    With ``masks_from``, ``masks`` is the source prune's result: the update reads its
    ``masks/`` folder (``selector="mask"``, ``mask_file``); without it (a check before the
    source ran) the mask file is left empty.
    """
    from modules.engine.request import PruneRequest
    from modules.pruning.sparsity import parse_spec

    options = dict(prune.get("options") or {})
    if prune.get("masks_from"):
        options.update(selector="mask", mask_file=str(Path(masks["path"]) / MASKS) if masks else "")
    return PruneRequest(
        method=prune["method"],
        spec=parse_spec(prune.get("sparsity"), prune.get("pattern")),
        options=options,
        true_sequential=bool(prune.get("true_sequential", False)),
        moe_calibration=prune.get("moe_calibration", "routed"),
        owl=bool(prune.get("owl", False)),
        report_error=bool(prune.get("report_error", False)),
    )


def prune_identity(prune: dict) -> dict:
    """What of a ``prune`` section decides the pruned model: all of it but ``activations``
    (where the hidden states live, not what they are); an empty ``masks_from_options`` and the
    default ``moe_calibration`` are left out too, so sections from before them keep their keys."""
    default = {"masks_from_options": {}, "moe_calibration": "routed"}
    return {k: v for k, v in prune.items() if k != "activations" and not (k in default and v == default[k])}


def prune_key(
    model: dict, prune: dict, prints: dict, calib: dict, grads: dict | None = None, masks: dict | None = None
) -> str:
    """Cache key of the pruned model: dense model + dtype, prune config, calibration, gradients
    and, with ``masks_from``, the key of the prune whose masks it starts from."""
    return stage_key(
        "prune",
        model=prints["model"],
        dtype=model["dtype"],
        prune=prune_identity(prune),
        calib=ref_hash(calib),
        grads=ref_hash(grads),
        masks=masks and masks["key"],
    )


def _folder_name(prune: dict, key: str) -> str:
    from modules.pruning.sparsity import parse_spec

    setting = str(parse_spec(prune.get("sparsity"), prune.get("pattern"))).replace(":", "of")
    return f"{prune['method']}-{setting}-{key[:12]}"


def _model_dir(parameters: dict, key: str) -> Path:
    return Path(parameters["work_dir"]).resolve() / "models" / _folder_name(parameters["prune"], key)


def _weights_file(parameters: dict, key: str) -> Path:
    return (
        Path(parameters["job"]["folder"])
        / "weights"
        / f"{parameters['index']:04d}-{parameters['stage']}.safetensors"
    )


@task(
    name="update",
    task_run_name="block-{index}-update",
    cache_key_fn=cache_key_fn(block_key("update"), _weights_file),
    persist_result=True,
)
def update(
    job: dict,
    index: int,
    stage: int,
    stats: str | None,
    linears: list[str],
    pruned: list[str],
    mask: str | None,
    grads_dir: str | None,
    rate: float | None,
    work_dir: str,
) -> dict:
    """Pruned weights of block ``index``'s group ``stage`` (:func:`modules.engine.weight_stages.update`)."""
    from modules.engine.job import Job
    from modules.engine.weight_stages import update as run

    return run(Job.from_json(job), index, stage, stats, linears, pruned, mask, grads_dir, rate)


def _shard_file(parameters: dict, key: str) -> Path:
    return Path(parameters["job"]["folder"]) / "acts" / f"inputs-{parameters['index'] + 1:04d}.safetensors"


@task(
    name="propagate",
    task_run_name="block-{index}-propagate",
    cache_key_fn=cache_key_fn(block_key("propagate"), _shard_file),
    persist_result=True,
)
def propagate(
    job: dict,
    index: int,
    inputs: str | None,
    args: str | None,
    dense: str | None,
    pruned: list[str],
    setting: dict,
    work_dir: str,
) -> dict:
    """The pruned block on its inputs: next inputs, error, shard (:func:`modules.engine.stages.propagate`)."""
    from modules.engine.job import Job
    from modules.engine.stages import propagate as run

    return run(Job.from_json(job), index, inputs, args, dense, pruned, setting)


@task(name="assemble", task_run_name="assemble-{report[method]}")
def assemble(job: dict, out_dir: str, report: dict, masks_files: list[str], work_dir: str) -> dict:
    """Write the pruned model to ``out_dir`` (:func:`modules.engine.stages.assemble`)."""
    from modules.engine.job import Job
    from modules.engine.stages import assemble as run

    return {"path": str(run(Job.from_json(job), out_dir, report, masks_files))}
