"""The update stage (a method's weight update per block), propagation and assembly.

``update`` computes the pruned weights of one block's linears (SparseGPT, ADMM on its
masks, ADMM-Grad), ``propagate`` runs the pruned block on its inputs (the next block's
inputs, the reconstruction error, the block's output shard) and ``assemble`` writes the
pruned model; the loop over blocks that calls them is :func:`flows.prune.prune_blocks`.
Per-block stages are not cached (:mod:`tasks.statistics`); the whole prune is, by
:func:`prune_key`: the dense model's fingerprint and dtype, the ``prune`` section, the
calibration windows' hash and, for GBLM, the gradients' hash. The pruned model's folder
is ``<work_dir>/models/<method>-<setting>-<key>`` (:func:`model_dir`); its resume state lives in
``<work_dir>/runs/<key>`` until the model is assembled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from configs.schema import ModelCfg, PruneCfg
from modules.engine.request import Job
from tasks.cache import NO_CACHE, Artifact, ref_hash, stage_key, task
from tasks.windows import Fingerprints

REPORT = "pruning_report.json"
WEIGHT_FILES = ("model*.safetensors", "config.json")


class Pruned(Artifact, total=False):
    """A prune's result: the model folder (``path``, also ``name``: a model reference for the
    evaluations) and its weights' hash, its report and figures."""

    name: str
    report: str
    sparsity: float
    method: str
    setting: str
    key: str
    resumed_at: int | None
    processes: int
    seconds: float
    peak_mem_mb: float
    peak_gpu_mb: float
    save: dict[str, float]


def prune_key(
    model: ModelCfg,
    prune_cfg: PruneCfg,
    fingerprints: Fingerprints,
    calib: Artifact | None,
    grads: Artifact | None = None,
    masks: Pruned | None = None,
) -> str:
    """Cache key of the pruned model: dense model + dtype, prune config, calibration, gradients
    and, with ``masks_from``, the key of the prune whose masks it starts from."""
    return stage_key(
        "prune",
        model=fingerprints["model"],
        dtype=model.dtype,
        prune=prune_cfg.identity(),
        calib=ref_hash(calib),
        grads=ref_hash(grads),
        masks=masks and masks["key"],
    )


def model_dir(key: str, work_dir: str | Path, prune_cfg: PruneCfg) -> Path:
    """The pruned model's folder: ``<work_dir>/models/<method>-<setting>-<key[:12]>``."""
    name = f"{prune_cfg.method}-{prune_cfg.setting.replace(':', 'of')}-{key[:12]}"
    return Path(work_dir).resolve() / "models" / name


@task(name="update", task_run_name="block-{index}-update", cache_policy=NO_CACHE)
def update(
    job: Job,
    index: int,
    group: int,
    stats: str | None,
    linears: list[str],
    pruned: list[str],
    mask: str | None,
    grads_dir: str | None,
    rate: float | None,
    work_dir: str,
) -> dict:
    """Pruned weights of block ``index``'s ``group`` (:func:`modules.engine.weight_stages.update`)."""
    # The engine (torch with lightning and transformers) loads when a step computes: a run whose
    # steps are all cached never imports it.
    from modules.engine import weight_stages

    return weight_stages.update(job, index, group, stats, linears, pruned, mask, grads_dir, rate)


@task(name="propagate", task_run_name="block-{index}-propagate", cache_policy=NO_CACHE)
def propagate(
    job: Job,
    index: int,
    inputs: str | None,
    args: str | None,
    dense: str | None,
    pruned: list[str],
    setting: dict[str, Any],
    work_dir: str,
) -> dict:
    """The pruned block on its inputs: next inputs, error, shard (:func:`modules.engine.stages.propagate`)."""
    from modules.engine import stages  # the engine: see update

    return stages.propagate(job, index, inputs, args, dense, pruned, setting)


@task(name="assemble", task_run_name="assemble-{report[method]}", cache_policy=NO_CACHE)
def assemble(job: Job, out_dir: str, report: dict[str, Any], masks_files: list[str], work_dir: str) -> dict:
    """Write the pruned model to ``out_dir`` (:func:`modules.engine.stages.assemble`)."""
    from modules.engine import stages  # the engine: see update

    return {"path": str(stages.assemble(job, out_dir, report, masks_files))}
