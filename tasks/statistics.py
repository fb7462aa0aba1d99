"""The statistics stage: each decoder block's input statistics, and GBLM's gradients.

``statistics`` runs one block (per statistics group with ``true_sequential``) over its
inputs and writes each linear's ``sq_norm`` (and ``gram`` where the method needs it) to
``<run folder>/stats/<block>-<group>.safetensors``. Like every per-block task it is not
cached: a resume reuses only the verified records of finished blocks
(:mod:`modules.engine.state`) and runs the unfinished block's stages again.

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

from pydantic import validate_call

from configs.schema import ModelCfg
from modules.engine.names import check_device, resolve_model
from modules.engine.ranks import from_zero, local_device, rank_and_world, writes
from modules.engine.request import Job
from modules.process import remove_stale, replace_atomic
from tasks.cache import (
    NO_CACHE,
    Artifact,
    artifact_path,
    cache_key_fn,
    dir_sha256,
    measure,
    run_folder,
    run_logger,
    stage_key,
    task,
)
from tasks.windows import Fingerprints, load_calibration


@task(name="statistics", task_run_name="block-{index}-statistics", cache_policy=NO_CACHE)
def statistics(
    job: Job,
    index: int,
    group: int,
    inputs: str,
    args: str,
    pruned: list[str],
    groups: list[list[str]] | None,
    work_dir: str,
) -> dict:
    """Input statistics of block ``index`` (see :func:`modules.engine.stages.statistics`)."""
    # The engine (torch with lightning and transformers) loads when a step computes: a run whose
    # steps are all cached never imports it.
    from modules.engine import stages

    return stages.statistics(job, index, group, inputs, args, pruned, groups)


def gradients_key(model: ModelCfg, fingerprints: Fingerprints, calib: Artifact) -> str:
    """Cache key of the gradients: the dense model, its dtype and the calibration windows."""
    return stage_key("gradients", model=fingerprints["model"], dtype=model.dtype, calib=calib["sha256"])


def gradients_dir(key: str, work_dir: str) -> Path:
    """Where the gradients of ``key`` go once every block's are done."""
    return artifact_path(work_dir, "gradients", key)


@task(
    name="gradients",
    cache_key_fn=cache_key_fn(gradients_key, gradients_dir),
    persist_result=True,
)
def gradients(
    model: ModelCfg, fingerprints: Fingerprints, calib: Artifact, work_dir: str, activations: str = "auto"
) -> Artifact:
    """Compute GBLM's per-weight gradient aggregates of the dense model on the calibration windows.

    Args:
        model: the ``model`` config section (``name``, ``dtype``, ``device``, processes).
        fingerprints: the run's fingerprints (``tasks.windows.fingerprints``).
        calib: the result of ``tasks.windows.calibration``.
        work_dir: the run's work folder.
        activations: where the blocks' inputs live between the two sweeps, the prune's
            setting (``memory``, ``mmap``: on disk by segments, or ``auto``); not in the key.

    Returns:
        ``{"path": folder, "sha256", "key", "processes", "seconds", "peak_mem_mb"}``.
    """
    if model.processes > 1:  # in a child whose ranks share the windows (launch): its JSON form
        from modules.engine.launch import Ranks, on_ranks  # the engine: see statistics

        kwargs = {"model": model.model_dump(mode="json"), "fingerprints": fingerprints, "calib": calib}
        kwargs |= {"work_dir": work_dir, "activations": activations}
        return on_ranks("tasks.statistics:gradients_on_rank", kwargs, Ranks.of(kwargs["model"]), run_logger())
    return compute_gradients(model, fingerprints, calib, work_dir, activations)


def compute_gradients(
    model: ModelCfg, fingerprints: Fingerprints, calib: Artifact, work_dir: str, activations: str = "auto"
) -> Artifact:
    """:func:`gradients` in this process; under DDP, this rank's share (rank 0 writes the sums)."""
    from modules.engine import passes  # the engine: see statistics

    key = gradients_key(model, fingerprints, calib)
    final = gradients_dir(key, work_dir)
    state = run_folder(work_dir, key)
    device = str(local_device(check_device(model.device)))
    args = (resolve_model(model.name), model.dtype, device, load_calibration(calib))
    if writes():
        remove_stale([state / "grads"])  # a killed write's temporary file
    with measure() as figures:
        passes.gradients(*args, state / "grads", activations, state=state, log=run_logger())  # rank 0 writes

    def finish() -> Artifact:
        replace_atomic(state / "grads", final)
        shutil.rmtree(state, ignore_errors=True)
        return {"path": str(final), "key": key, "processes": rank_and_world()[1], **figures,
                "sha256": dir_sha256(final)}  # fmt: skip

    return from_zero(finish)  # once every rank is done with its own state


# A spawned rank's entry: tasks.spawn passes the JSON form, read back into the types here.
gradients_on_rank = validate_call(compute_gradients)
