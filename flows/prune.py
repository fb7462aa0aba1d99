"""The prune recipe, and the per-block prune: capture; per block statistics -> masks -> update ->
propagate; assemble.

:func:`prune_recipe` is the one composition of the steps before evaluation (fingerprints,
calibration, gradients, a ``masks_from`` source's prune, the prune) for the pipeline, the
sweep and ``topiary prune``. :func:`prune_blocks` is the one pruning path: the pipeline and
the sweep call it inside their flows (every block's tasks show in the Prefect UI and log),
``topiary prune`` calls it without a server (the same tasks' functions, in order). Per block
``i`` of ``n``:

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
at block k/n`` and goes on from the first unfinished one, whose stages all run again (the
per-block tasks are not cached). The output is byte-identical to an uninterrupted run's.
Every command that writes the work folder holds its lock (:func:`tasks.cache.work_lock`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import validate_call

from configs.schema import DataCfg, ModelCfg, PruneCfg
from modules.engine.names import check_device, resolve_model
from modules.engine.ranks import from_zero, launched_as_rank_zero, local_device, rank_and_world
from modules.engine.report import PruneReport
from modules.engine.request import Job
from modules.errors import TopiaryError
from modules.process import remove_stale
from tasks.cache import (
    Artifact,
    cache_key_fn,
    canonical,
    dir_sha256,
    measure,
    run_folder,
    run_logger,
    task,
    work_lock,
)
from tasks.masks import masks as masks_task
from tasks.statistics import compute_gradients, gradients, statistics
from tasks.update import REPORT, WEIGHT_FILES, Pruned, assemble, model_dir, propagate, prune_key, update
from tasks.windows import Calibration, Fingerprints, calibration, capture, fingerprints

log = logging.getLogger("topiary")

# The per-block stage tasks, by the name the engine's loop runs each under.
BLOCK_STAGES = {
    "capture": capture,
    "statistics": statistics,
    "masks": masks_task,
    "update": update,
    "propagate": propagate,
    "assemble": assemble,
}


@dataclass(frozen=True)
class RecipeSteps:
    """What :func:`prune_recipe` ran: results, or futures of them, as the flow's step gives them."""

    fingerprints: Fingerprints
    calibration: Any  # None where no prune reads data
    gradients: Any  # None where no prune needs them
    prunes: list[dict[str, Any]]  # per member: its "prune" and, with masks_from, "masks_from"


Step = Callable[..., Any]
"""``step(name, task, *args)``: how a flow runs one step of :func:`prune_recipe` (the pipeline:
a task run, timed; the sweep: a submitted future; ``topiary prune``: the function in this process)."""


def _direct(task, *args):
    """Call a task's function in this process, without Prefect (``topiary prune``)."""
    return task.fn(*args)


def _nested(task, *args):
    """Call a task as a Prefect task run (inside the ``prune`` task: a nested run in the UI)."""
    return task(*args)


def prune_recipe(
    model: ModelCfg,
    data: DataCfg,
    members: list[PruneCfg],
    work_dir: str,
    step: Step,
    zeroshot_dir: str | None = None,
) -> RecipeSteps:
    """The steps before evaluation, for every prune of ``members``:

    1. ``fingerprints`` of the model and the data;
    2. ``calibration``, only when some prune reads data (magnitude reads none);
    3. ``gradients``, only when some prune needs them (GBLM's);
    4. ``masks_from``: the prune that a member's ``masks_from`` names, a prune of its own;
    5. ``prune``: the member's prune, on that source's masks.

    Each prune is given the windows and the gradients only when its method reads them, and a
    prune two members share (one's ``masks_from`` source and another's prune) runs once.

    Returns:
        The steps' results (or futures, as ``step`` gives them); per member, by step name.
    """
    run_fingerprints = step("fingerprints", fingerprints, model.name, data.calib, data.eval, zeroshot_dir)
    every = [p for member in members for p in (member.masks_source(), member) if p is not None]
    calib = grads = None
    if any(p.reads_data() for p in every):
        calib = step("calibration", calibration, model.name, data, run_fingerprints, work_dir)
    if any(p.needs_gradients() for p in every):
        grads = step("gradients", gradients, model, run_fingerprints, calib, work_dir, members[0].activations)
    done: dict[str, Any] = {}

    def prune_of(name: str, cfg: PruneCfg, masks: Any = None) -> Any:
        key = canonical(cfg.identity())
        if key not in done:
            windows = calib if cfg.reads_data() else None
            grads_of = grads if cfg.needs_gradients() else None
            done[key] = step(name, prune, model, cfg, run_fingerprints, windows, grads_of, work_dir, masks)
        return done[key]

    prunes = []
    for member in members:
        source = member.masks_source()
        out = {} if source is None else {"masks_from": prune_of("masks_from", source)}
        out["prune"] = prune_of("prune", member, out.get("masks_from"))
        prunes.append(out)
    return RecipeSteps(run_fingerprints, calib, grads, prunes)


def prune_blocks(
    model: ModelCfg,
    prune_cfg: PruneCfg,
    fingerprints: Fingerprints,
    calib: Calibration | None,
    grads: Artifact | None,
    work_dir: str,
    masks: Pruned | None = None,
    *,
    call: Callable = _direct,
    out_dir: str | Path | None = None,
) -> Pruned:
    """Prune a checkpoint block by block through the per-block tasks; see the module docstring.

    Args:
        model: The ``model`` config section (``name``, ``dtype``, ``device``).
        prune_cfg: The ``prune`` config section.
        fingerprints: The run's fingerprints (``tasks.windows.fingerprints``).
        calib: The calibration windows (``tasks.windows.calibration``); None for a prune that
            reads no data (:meth:`configs.schema.PruneCfg.reads_data`).
        grads: GBLM's gradients (``tasks.statistics.gradients``), else None.
        work_dir: The work folder.
        masks: With ``masks_from``: the source prune's result (its ``masks/`` feed the update).
        call: How to run a task: ``_direct`` (its function) or ``_nested`` (a Prefect task run).
        out_dir: Where the pruned model goes; default :func:`tasks.update.model_dir`.
    """
    if bool(prune_cfg.masks_from) != bool(masks):
        raise ValueError(
            "prune_blocks: masks (the source prune's result) go with masks_from, and only with it"
        )
    # The engine (torch with lightning and transformers) loads when a prune computes: a pipeline
    # or sweep whose prune is cached never imports it.
    from modules.engine import loop
    from modules.engine.streaming import NonFiniteCheckpoint

    key = prune_key(model, prune_cfg, fingerprints, calib, grads, masks)
    out = Path(out_dir) if out_dir else model_dir(key, work_dir, prune_cfg)
    job = Job(
        resolve_model(model.name),
        model.dtype,
        str(local_device(check_device(model.device))),
        str(run_folder(work_dir, key)),
        prune_cfg.request(masks and masks["path"]),
        int(calib["shape"][0]) if calib else 0,
        prune_cfg.activations,
    )

    def run(name: str, *args):
        return call(BLOCK_STAGES[name], job, *args, work_dir)

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
        "report": str(out / REPORT),
        "sparsity": report.sparsity,
        "method": report.method,
        "setting": report.setting,
        "key": key,
        "resumed_at": first or None,
        "processes": rank_and_world()[1],
        **figures,
        "save": {"seconds": 0.0},
    }


# A spawned rank's entry: modules.engine.launch passes the JSON form, read back into the types here.
prune_on_rank = validate_call(prune_blocks)


def prune_to_dir(
    model: ModelCfg,
    data: DataCfg,
    prune_cfg: PruneCfg,
    output: Path,
    work_dir: str = ".topiary",
    wait: bool = True,
) -> PruneReport:
    """Prune a model one-shot into ``output`` through :func:`prune_recipe`, in this process, without Prefect.

    Used by ``topiary prune``: the same steps as the pipeline, their state in ``work_dir`` (so
    a killed run resumes when re-run with the same arguments). An existing ``output`` is
    replaced only if it is empty or a previous Topiary output. With ``masks_from`` the source
    method's prune runs first into ``work_dir/models/`` (or is found there, complete, from an
    earlier run of it: the pipeline's cache folder).

    With ``model.processes > 1`` the prune runs under Lightning's ``model.strategy`` (DDP by
    default), one process per device (:func:`modules.engine.statistics.join`): every rank
    takes its share of the calibration windows in the statistics, propagate and gradient
    passes; rank 0 does the rest and writes every file. The processes and the strategy are
    not part of the run's key (like the device): a killed run may resume on other ones.

    The run holds the work folder's lock (:func:`tasks.cache.work_lock`): while another run
    holds it, this one waits, or with ``wait=False`` refuses at once.

    Returns:
        The :class:`modules.engine.report.PruneReport` (also in ``output/pruning_report.json``).
    """
    output = Path(output)
    remove_stale([output.parent], tmp_dir=Path(tempfile.gettempdir()))  # what killed runs left
    if output.exists() and (
        not output.is_dir() or (any(output.iterdir()) and not (output / REPORT).is_file())
    ):
        raise TopiaryError(
            f"output: {output} exists and is not a previous Topiary output; choose another path"
        )
    # the work folder is this run's until it ends; a rank a launcher started is inside rank 0's hold
    held = work_lock(work_dir, wait) if launched_as_rank_zero() else contextlib.nullcontext()
    with held:
        if model.processes > 1:
            from modules.engine.launch import Ranks, join_ranks  # the engine: see prune_blocks

            join_ranks(Ranks(model.device, model.devices, model.num_nodes, model.strategy))
        prune_recipe(model, data, [prune_cfg], str(Path(work_dir).resolve()), _direct_step(output))
    return PruneReport.from_dict(json.loads((output / REPORT).read_text()))


def _direct_step(output: Path) -> Step:
    """:func:`prune_recipe`'s steps for ``topiary prune``, in this process (on every rank under
    DDP): rank 0 fingerprints and draws the windows, every rank takes its share of the passes,
    the ``masks_from`` source is found in the work folder when an earlier run pruned it, and the
    prune goes into ``output``."""
    direct: dict[str, Callable] = {
        "fingerprints": partial(from_zero, fingerprints.fn),
        "calibration": partial(from_zero, calibration.fn),
        "gradients": compute_gradients,
        "masks_from": _found_or_pruned,
        "prune": partial(prune_blocks, out_dir=output),
    }
    return lambda name, task, *args: direct[name](*args)


def _found_or_pruned(
    model: ModelCfg,
    prune_cfg: PruneCfg,
    fingerprints: Fingerprints,
    calib: Calibration | None,
    grads: Artifact | None,
    work_dir: str,
    masks: Pruned | None = None,
) -> Pruned:
    """A ``masks_from`` source's prune: found in the work folder (assembled whole, by this command
    or a pipeline), else run into it."""
    key = prune_key(model, prune_cfg, fingerprints, calib, grads)
    folder = model_dir(key, work_dir, prune_cfg)
    if (folder / REPORT).is_file():
        log.info("masks_from: %s's prune found in %s", prune_cfg.method, folder)
        return {"path": str(folder), "key": key}
    return prune_blocks(model, prune_cfg, fingerprints, calib, grads, work_dir, masks)


@task(
    name="prune",
    task_run_name="prune-{prune_cfg.method}",
    cache_key_fn=cache_key_fn(prune_key, model_dir),
    persist_result=True,
)
def prune(
    model: ModelCfg,
    prune_cfg: PruneCfg,
    fingerprints: Fingerprints,
    calib: Calibration | None,
    grads: Artifact | None,
    work_dir: str,
    masks: Pruned | None = None,
) -> Pruned:
    """The whole per-block prune as one cached step of the pipeline and the sweep.

    Its per-block tasks run nested inside it (each shows in the UI); a finished prune is
    served from the cache in one lookup, and an unfinished one resumes block by block.
    With ``model.devices`` > 1 it runs on that many DDP processes, with ``model.num_nodes``
    > 1 on that many machines of a Dask cluster (:mod:`modules.engine.launch`).
    ``masks``: the result of the prune that ``masks_from`` names (itself this step).
    """
    if model.processes > 1:  # in a child whose ranks run the stages (modules.engine.launch): the JSON form
        kwargs = {"model": model.model_dump(mode="json"), "prune_cfg": prune_cfg.model_dump(mode="json")}
        kwargs |= {"fingerprints": fingerprints, "calib": calib, "grads": grads, "work_dir": work_dir}
        from modules.engine.launch import Ranks, on_ranks  # the engine: see prune_blocks

        ranks = Ranks.of(kwargs["model"])
        return on_ranks("flows.prune:prune_on_rank", kwargs | {"masks": masks}, ranks, run_logger())
    return prune_blocks(model, prune_cfg, fingerprints, calib, grads, work_dir, masks, call=_nested)


def clean(work_dir: str | Path, wait: bool = True) -> list[Path]:
    """Remove resume state and what killed runs left: ``<work_dir>/runs/*`` of runs no process
    holds (a run's folder is in use while the work folder's lock is held), and temporary
    files of dead processes under the work folder and ``$TMPDIR``. While another run holds
    the lock, it waits for that run to end, or with ``wait=False`` refuses at once.

    Returns:
        What was removed.
    """
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
