"""The statistics stage: each decoder block's input statistics, and GBLM's gradients.

``statistics`` runs one block (per statistics group with ``true_sequential``) over its
inputs and writes each linear's ``sq_norm`` (and ``gram`` where the method needs it) to
``<run folder>/stats/<block>-<group>.safetensors``; it is cached by the run's key, the
block and the group (:func:`block_key`): the run's key (``tasks.update.prune_key``) holds
the content hashes of everything the block's inputs are computed from.

The gradient step:

Cached by the dense model's fingerprint, its dtype and the calibration windows' hash
(:func:`gradients_key`); written to ``<work_dir>/gradients/<key>/block_{i:04d}.safetensors``
by a block-wise backward over the checkpoint (:func:`modules.engine.passes.gradients`: one
block loaded at a time, never the whole model). Its resume state is ``<work_dir>/runs/<key>``
(the finished blocks' files and the backward's progress): a killed step, run again, goes on
from there, and the folder is renamed into place when every block is done. The prune step
reads that folder block by block.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks.cache import (
    artifact_path,
    cache_key_fn,
    dir_sha256,
    measure,
    run_folder,
    run_logger,
    stage_key,
    task,
)


def block_key(name: str):
    """The key function of per-block stage ``name``: the job (its device aside), the block, the group."""

    def key(job: dict, index: int, stage: int = 0, rate: float | None = None) -> str:
        identity = {k: v for k, v in job.items() if k not in ("device", "activations")}
        return stage_key(f"block-{name}", job=identity, index=index, group=stage, rate=rate)

    key.__name__ = f"{name.replace('-', '_')}_key"
    return key


def _stats_file(parameters: dict, key: str) -> Path:
    return (
        Path(parameters["job"]["folder"])
        / "stats"
        / f"{parameters['index']:04d}-{parameters['stage']}.safetensors"
    )


@task(
    name="statistics",
    task_run_name="block-{index}-statistics",
    cache_key_fn=cache_key_fn(block_key("statistics"), _stats_file),
    persist_result=True,
)
def statistics(
    job: dict,
    index: int,
    stage: int,
    inputs: str,
    args: str,
    pruned: list[str],
    groups: list[list[str]] | None,
    work_dir: str,
) -> dict:
    """Input statistics of block ``index`` (see :func:`modules.engine.stages.statistics`)."""
    from modules.engine.job import Job
    from modules.engine.stages import statistics as run

    return run(Job.from_json(job), index, stage, inputs, args, pruned, groups)


def needs_gradients(prune: dict) -> bool:
    """Whether a ``prune`` config section needs the gradient step (the method's own rule)."""
    from modules.pruning.registry import get_method

    return "grad" in get_method(prune["method"]).statistics(prune.get("options", {}))


def gradients_key(model: dict, prints: dict, calib: dict) -> str:
    """Cache key of the gradients: the dense model, its dtype and the calibration windows."""
    return stage_key("gradients", model=prints["model"], dtype=model["dtype"], calib=calib["sha256"])


def _gradients_dir(parameters: dict, key: str) -> Path:
    return artifact_path(parameters["work_dir"], "gradients", key)


@task(
    name="gradients",
    cache_key_fn=cache_key_fn(gradients_key, _gradients_dir),
    persist_result=True,
)
def gradients(model: dict, prints: dict, calib: dict, work_dir: str, activations: str = "auto") -> dict:
    """Compute GBLM's per-weight gradient aggregates of the dense model on the calibration windows.

    Args:
        model: the ``model`` config section (``name``, ``dtype``, ``device``).
        prints: the run's fingerprints (``tasks.windows.fingerprints``).
        calib: the result of ``tasks.windows.calibration``.
        work_dir: the run's work folder.
        activations: where the blocks' inputs live between the two sweeps, the prune's
            setting (``memory``, ``mmap``: on disk by segments, or ``auto``); not in the key.

    Returns:
        ``{"path": folder, "sha256", "key", "processes", "seconds", "peak_mem_mb"}``.
    """
    from modules.engine.launch import Ranks, on_ranks

    ranks = Ranks.of(model)
    if ranks.processes > 1:  # in a child whose ranks share the windows (modules.engine.launch)
        kwargs = {
            "model": model,
            "prints": prints,
            "calib": calib,
            "work_dir": work_dir,
            "activations": activations,
        }
        return on_ranks("tasks.statistics:compute_gradients", kwargs, ranks, run_logger())
    return compute_gradients(model, prints, calib, work_dir, activations)


def compute_gradients(
    model: dict, prints: dict, calib: dict, work_dir: str, activations: str = "auto"
) -> dict:
    """:func:`gradients` in this process; under DDP, this rank's share (rank 0 writes the sums)."""
    from modules.engine.names import check_device, resolve_model
    from modules.engine.passes import gradients as blockwise
    from modules.engine.ranks import from_zero, local_device, rank_and_world, writes
    from modules.process import remove_stale, replace_atomic
    from tasks.windows import load_calibration

    key = gradients_key(model, prints, calib)
    final = _gradients_dir({"work_dir": work_dir}, key)
    state = run_folder(work_dir, key)
    device = str(local_device(check_device(model["device"])))
    args = (resolve_model(model["name"]), model["dtype"], device, load_calibration(calib))
    if writes():
        remove_stale([state / "grads"])  # a killed write's temporary file
    with measure() as figures:
        blockwise(*args, state / "grads", activations, state=state, log=run_logger())  # rank 0 writes

    def finish() -> dict:
        replace_atomic(state / "grads", final)
        shutil.rmtree(state, ignore_errors=True)
        return {"path": str(final), "key": key, "processes": rank_and_world()[1], **figures,
                "sha256": dir_sha256(final)}  # fmt: skip

    return from_zero(finish)  # once every rank is done with its own state
