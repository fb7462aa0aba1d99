"""The per-block prune: capture; per block statistics -> masks -> update -> propagate; assemble.

:func:`prune_blocks` is the one pruning path: the pipeline and the sweep call it inside
their flows (every block's tasks show in the Prefect UI and log), ``topiary prune`` calls
it without a server (the same tasks' functions, in order). Per block ``i`` of ``n``:

- ``statistics`` (one per group with ``true_sequential``), unless the method is data-free;
- ``masks`` where the method selects (magnitude, Wanda, GBLM) or updates another's mask
  (ADMM's ``selector``, a ``mask_file``);
- ``update`` where the method updates weights (SparseGPT, ADMM, ADMM-Grad);
- ``propagate``: the next block's inputs, the error, the block's output shard, and the
  block's record ``blocks/<i>.json``, written last: the block is durable.

Memory: one block, its activations and its statistics (the model is never loaded whole:
:mod:`modules.engine.streaming`). Disk: the resume state keeps this block's and the next
block's activations and statistics; a finished block's are removed, and the whole run
folder once the model is assembled.

Resume: a re-run with the same inputs has the same run key (``tasks.update.prune_key``),
finds the finished blocks' records, verifies them and the files they name
(:mod:`modules.engine.state`: a damaged block is discarded and recomputed), logs ``resuming
at block k/n`` and goes on from the first unfinished one; a stage finished inside that block
is served from Prefect's cache. The output is byte-identical to an uninterrupted run's.
Every command that writes the work folder holds its lock (:func:`tasks.cache.work_lock`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tasks.cache import cache_key_fn, run_logger, task

log = logging.getLogger("topiary")


def _direct(task, *args, **kwargs):
    """Call a task's function in this process, without Prefect (``topiary prune``)."""
    return task.fn(*args, **kwargs)


def _nested(task, *args, **kwargs):
    """Call a task as a Prefect task run (inside the ``prune`` task: a nested run in the UI)."""
    return task(*args, **kwargs)


def prune_blocks(
    model: dict,
    prune: dict,
    prints: dict,
    calib: dict,
    grads: dict | None,
    work_dir: str,
    call: Callable = _direct,
    out_dir: str | Path | None = None,
    masks: dict | None = None,
) -> dict:
    """Prune a checkpoint block by block through the per-block tasks; see the module docstring.

    Args:
        model: The ``model`` config section (``name``, ``dtype``, ``device``).
        prune: The ``prune`` config section.
        prints: The run's fingerprints (``tasks.windows.fingerprints``).
        calib: The calibration windows (``tasks.windows.calibration``); None for a prune that
            reads no data (``modules.pruning.registry.reads_data``).
        grads: GBLM's gradients (``tasks.statistics.gradients``), else None.
        work_dir: The work folder.
        call: How to run a task: ``_direct`` (its function) or a Prefect task call.
        out_dir: Where the pruned model goes; default ``<work_dir>/models/<method>-<setting>-<key>``.
        masks: With ``masks_from``: the source prune's result (its ``masks/`` feed the update).

    Returns:
        ``{"name"/"path": model folder, "sha256" (weights), "report": report file,
        "sparsity", "method", "setting", "key", "seconds", "peak_mem_mb", "save", "resumed_at",
        "processes"}``.
    """
    from modules.engine import loop
    from modules.engine.job import Job
    from modules.engine.names import check_device, resolve_model
    from modules.engine.ranks import from_zero, local_device, rank_and_world
    from modules.engine.streaming import NonFiniteCheckpoint
    from tasks.cache import dir_sha256, measure, run_folder
    from tasks.masks import masks as masks_task
    from tasks.statistics import statistics
    from tasks.update import (
        WEIGHT_FILES,
        _model_dir,
        assemble,
        plan_from_config,
        propagate,
        prune_key,
        update,
    )
    from tasks.windows import capture

    tasks = {
        "capture": capture,
        "statistics": statistics,
        "masks": masks_task,
        "update": update,
        "propagate": propagate,
        "assemble": assemble,
    }
    if bool(prune.get("masks_from")) != bool(masks):
        raise ValueError(
            "prune_blocks: masks (the source prune's result) go with masks_from, and only with it"
        )
    key = prune_key(model, prune, prints, calib, grads, masks)
    out = Path(out_dir) if out_dir else _model_dir({"work_dir": work_dir, "prune": prune}, key)
    plan = plan_from_config(prune, masks)
    job = Job(
        resolve_model(model["name"]),
        model["dtype"],
        str(local_device(check_device(model["device"]))),
        str(run_folder(work_dir, key)),
        plan,
        int(calib["shape"][0]) if calib else 0,
        prune.get("activations", "auto"),
    )
    jd = job.to_json()

    def run(stage: str, *args):
        return call(tasks[stage], jd, *args, work_dir)

    try:
        with measure() as figures:
            report, first = loop.prune_blocks(
                job, calib and calib["path"], out, grads and grads["path"], run, run_logger()
            )
    except NonFiniteCheckpoint:  # no run of this checkpoint can finish: its state is worth nothing
        from_zero(shutil.rmtree, job.path, ignore_errors=True)
        with contextlib.suppress(OSError):  # another run's state is there
            from_zero(job.path.parent.rmdir)
        raise
    return {
        "name": str(out),
        "path": str(out),
        "sha256": dir_sha256(out, WEIGHT_FILES),
        "report": str(out / "pruning_report.json"),
        "sparsity": report.sparsity,
        "method": report.method,
        "setting": report.setting,
        "key": key,
        "resumed_at": first or None,
        "processes": rank_and_world()[1],
        **figures,
        "save": {"seconds": 0.0},
    }


def prune_to_dir(
    model: str,
    method: str,
    sparsity: float | None,
    pattern: str | None,
    calib: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    owl: bool,
    options: dict,
    output: Path,
    dtype: str = "float32",
    device: str = "auto",
    report_error: bool = False,
    true_sequential: bool = False,
    moe_calibration: str = "routed",
    work_dir: str = ".topiary",
    activations: str = "auto",
    masks_from: str | None = None,
    masks_from_options: dict | None = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: str = "ddp",
    wait: bool = True,
):
    """Prune a model one-shot into ``output`` through :func:`prune_blocks`, in this process, without Prefect.

    Used by ``topiary prune``: the same per-block stages as the pipeline, their state in
    ``work_dir`` (so a killed run resumes when re-run with the same arguments). An
    existing ``output`` is replaced only if it is empty or a previous Topiary output.
    With ``masks_from`` the source method's prune runs first into ``work_dir/models/`` (or is
    found there, complete, from an earlier run of it: the pipeline's cache folder).

    With ``devices * num_nodes > 1`` the prune runs under Lightning's ``strategy`` (DDP by
    default), one process per device (:func:`modules.engine.statistics.join`): every rank
    takes its share of the calibration windows in the statistics, propagate and gradient
    passes; rank 0 does the rest and writes every file. The processes and the strategy are
    not part of the run's key (like the device): a killed run may resume on other ones.

    The run holds the work folder's lock (:func:`tasks.cache.work_lock`): while another run
    holds it, this one waits, or with ``wait=False`` refuses at once.

    Returns:
        The :class:`modules.engine.report.PruneReport` (also in ``output/pruning_report.json``).
    """
    from modules.engine.ranks import launched_as_rank_zero
    from modules.engine.report import PruneReport
    from modules.errors import TopiaryError
    from modules.process import remove_stale
    from tasks.cache import work_lock
    from tasks.update import REPORT, plan_from_config

    output = Path(output)
    remove_stale([output.parent], tmp_dir=Path(tempfile.gettempdir()))  # what killed runs left
    if output.exists() and (
        not output.is_dir() or (any(output.iterdir()) and not (output / REPORT).is_file())
    ):
        raise TopiaryError(
            f"output: {output} exists and is not a previous Topiary output; choose another path"
        )
    section = {
        "method": method,
        "sparsity": sparsity,
        "pattern": pattern,
        "options": dict(options or {}),
        "owl": owl,
        "true_sequential": true_sequential,
        "moe_calibration": moe_calibration,
        "report_error": report_error,
        "activations": activations,
        "masks_from": masks_from,
        "masks_from_options": dict(masks_from_options or {}),
    }
    plan_from_config(section)  # bad method/sparsity/pattern fail here, before any read
    model_cfg = {"name": model, "dtype": dtype, "device": device}
    data = {"calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    # the work folder is this run's until it ends; a rank a launcher started is inside rank 0's hold
    held = work_lock(work_dir, wait) if launched_as_rank_zero() else contextlib.nullcontext()
    with held:
        if devices * num_nodes > 1:
            from modules.engine.launch import Ranks, join_ranks

            join_ranks(Ranks(device, devices, num_nodes, strategy))
        _prune_steps(model_cfg, data, section, str(Path(work_dir).resolve()), output)
    return PruneReport.from_dict(json.loads((output / REPORT).read_text()))


def _prune_steps(model_cfg: dict, data: dict, section: dict, work: str, output: Path) -> None:
    """:func:`prune_to_dir`'s steps: fingerprints, calibration, gradients where the method needs
    them, the ``masks_from`` source's prune, then the prune into ``output``."""
    from modules.engine.ranks import from_zero
    from modules.pruning.registry import reads_data
    from tasks.statistics import gradients, needs_gradients
    from tasks.update import REPORT, _model_dir, masks_source, prune_key
    from tasks.windows import calibration, fingerprints

    model, calib = model_cfg["name"], data["calib"]

    source = masks_source(section)
    prints = from_zero(fingerprints.fn, model, calib, calib, None)
    windows = None
    if any(reads_data(p) for p in (section, source) if p):  # magnitude reads none, so computes none
        windows = from_zero(calibration.fn, model, data, prints, work)

    def grads_of(prune: dict) -> dict | None:
        if not needs_gradients(prune):
            return None
        return gradients.fn(model_cfg, prints, windows, work, section["activations"])

    masks = None
    if source is not None:
        grads = grads_of(source)
        key = prune_key(model_cfg, source, prints, windows, grads)
        folder = _model_dir({"work_dir": work, "prune": source}, key)
        if (folder / REPORT).is_file():  # done before (assembled whole), by this command or a pipeline
            log.info("masks_from: %s's prune found in %s", section["masks_from"], folder)
            masks = {"path": str(folder), "key": key}
        else:
            masks = prune_blocks(model_cfg, source, prints, windows, grads, work)
    prune_blocks(model_cfg, section, prints, windows, grads_of(section), work, out_dir=output, masks=masks)


def _model_folder(parameters: dict, key: str) -> Path:
    from tasks.update import _model_dir

    return _model_dir(parameters, key)


def _prune_key(
    model: dict, prune: dict, prints: dict, calib: dict, grads: dict | None = None, masks: dict | None = None
) -> str:
    from tasks.update import prune_key

    return prune_key(model, prune, prints, calib, grads, masks)


@task(
    name="prune",
    task_run_name="prune-{prune[method]}",
    cache_key_fn=cache_key_fn(_prune_key, _model_folder),
    persist_result=True,
)
def prune(
    model: dict,
    prune: dict,
    prints: dict,
    calib: dict,
    grads: dict | None,
    work_dir: str,
    masks: dict | None = None,
) -> dict:
    """The whole per-block prune as one cached step of the pipeline and the sweep.

    Its per-block tasks run nested inside it (each shows in the UI); a finished prune is
    served from the cache in one lookup, and an unfinished one resumes block by block.
    With ``model.devices`` > 1 it runs on that many DDP processes, with ``model.num_nodes``
    > 1 on that many machines of a Dask cluster (:mod:`modules.engine.launch`).
    ``masks``: the result of the prune that ``masks_from`` names (itself this step).
    """
    from modules.engine.launch import Ranks, on_ranks

    ranks = Ranks.of(model)
    if ranks.processes > 1:  # in a child whose ranks run the stages (modules.engine.launch)
        kwargs = {"model": model, "prune": prune, "prints": prints, "calib": calib, "grads": grads}
        kwargs |= {"work_dir": work_dir, "masks": masks}
        return on_ranks("flows.prune:prune_blocks", kwargs, ranks, run_logger())
    return prune_blocks(model, prune, prints, calib, grads, work_dir, call=_nested, masks=masks)


def clean(work_dir: str | Path, wait: bool = True) -> list[Path]:
    """Remove resume state and what killed runs left: ``<work_dir>/runs/*`` of runs no process
    holds (a run's folder is in use while the work folder's lock is held), and temporary
    files of dead processes under the work folder and ``$TMPDIR``. While another run holds
    the lock, it waits for that run to end, or with ``wait=False`` refuses at once.

    Returns:
        What was removed.
    """
    from modules.process import remove_stale
    from tasks.cache import work_lock

    work = Path(work_dir)
    removed: list[Path] = []
    if not work.is_dir():
        return removed
    with work_lock(work, wait):  # a live run's state is never removed
        for run in sorted((work / "runs").glob("*")):
            shutil.rmtree(run, ignore_errors=True)
            removed.append(run)
        removed += remove_stale(
            [work, *[p for p in work.iterdir() if p.is_dir()]], depth=2, tmp_dir=Path(tempfile.gettempdir())
        )
    return removed
