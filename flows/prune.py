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
finds the finished blocks' records, logs ``resuming at block k/n`` and goes on from the
first unfinished one; a stage finished inside that block is served from Prefect's cache.
The output is byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prefect import task

from tasks.cache import cache_key_fn

log = logging.getLogger("topiary")


def _direct(task, *args, **kwargs):
    """Call a task's function in this process, without Prefect (``topiary prune``)."""
    return task.fn(*args, **kwargs)


def _nested(task, *args, **kwargs):
    """Call a task as a Prefect task run (inside the ``prune`` task: a nested run in the UI)."""
    return task(*args, **kwargs)


def _flow_logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run: the topiary logger
        return log


def _clean_block(folder: Path, index: int) -> None:
    """Remove block ``index``'s activations, statistics and weights (its record, shard and masks stay)."""
    for pattern in (
        f"acts/inputs-{index:04d}.*",
        f"acts/dense-{index:04d}.*",
        f"stats/{index:04d}-*",
        f"weights/{index:04d}-*",
    ):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)


def prune_blocks(
    model: dict,
    prune: dict,
    prints: dict,
    calib: dict,
    grads: dict | None,
    work_dir: str,
    call: Callable = _direct,
    out_dir: str | Path | None = None,
) -> dict:
    """Prune a checkpoint block by block through the per-block tasks; see the module docstring.

    Args:
        model: The ``model`` config section (``name``, ``dtype``, ``device``).
        prune: The ``prune`` config section.
        prints: The run's fingerprints (``tasks.windows.fingerprints``).
        calib: The calibration windows (``tasks.windows.calibration``).
        grads: GBLM's gradients (``tasks.statistics.gradients``), else None.
        work_dir: The work folder.
        call: How to run a task: ``_direct`` (its function) or a Prefect task call.
        out_dir: Where the pruned model goes; default ``<work_dir>/models/<method>-<setting>-<key>``.

    Returns:
        ``{"name"/"path": model folder, "sha256" (weights), "report": report file,
        "sparsity", "method", "setting", "key", "seconds", "peak_mem_mb", "save", "resumed_at"}``.
    """
    from modules.engine.models import check_device, resolve_model
    from modules.engine.report import BlockReport, PruneReport
    from modules.engine.stages import Job, blocks_of
    from modules.provenance import provenance
    from modules.pruning.registry import Context, get_method
    from tasks.cache import dir_sha256, measure
    from tasks.masks import masks as masks_task
    from tasks.statistics import statistics as statistics_task
    from tasks.update import (
        WEIGHT_FILES,
        _model_dir,
        assemble,
        plan_from_config,
        propagate,
        prune_key,
        run_folder,
        update,
    )
    from tasks.windows import capture

    plog = _flow_logger()
    key = prune_key(model, prune, prints, calib, grads)
    out = Path(out_dir) if out_dir else _model_dir({"work_dir": work_dir, "prune": prune}, key)
    plan = plan_from_config(prune)
    method = get_method(plan.method)
    device = check_device(model["device"])
    folder = run_folder(work_dir, key)
    job = Job(
        resolve_model(model["name"]),
        model["dtype"],
        str(device),
        str(folder),
        plan.to_dict(),
        int(calib["shape"][0]),
    )
    jd = job.__dict__ | {}
    start = time.perf_counter()
    from modules.process import remove_stale

    remove_stale(
        [folder / part for part in ("acts", "stats", "masks", "weights", "shards", "blocks", "keep")]
    )
    remove_stale([out.parent])
    with measure() as figures:
        prefix, blocks = blocks_of(job)
        n = len(blocks)
        data_free = plan.data_free()
        finished = [i for i in range(n) if (folder / "blocks" / f"{i:04d}.json").is_file()]
        first = next((i for i in range(n) if i not in finished), n)
        if first:
            plog.info("resuming at block %d/%d (blocks 1-%d are done)", first + 1, n, first)
        widths = frozenset(lin.in_features for b in blocks for lin in _linears(b).values())
        chosen = method.chosen(plan.options, Context(nsamples=job.nsamples, device=device, widths=widths))
        rates = None
        if plan.owl:
            from modules.engine.stages import owl_rates

            rates = owl_rates(job, calib)
        captured = None if data_free else call(capture, jd, calib, work_dir)
        inputs = captured and captured["inputs"]
        reports, masks_files = [], []
        for i in range(n):
            record = folder / "blocks" / f"{i:04d}.json"
            if record.is_file():
                done = json.loads(record.read_text())
                reports.append(BlockReport.from_dict(done["report"]))
                masks_files += done.get("masks", [])
                inputs = done["inputs"]
                continue
            rate = rates["rates"][i] if rates else None
            spec = plan.spec.with_rate(rate) if rate is not None else plan.spec
            grads_dir = grads and grads["path"]
            pruned: list[str] = []
            groups, dense, stage_masks = None, None, []
            stages = [None]
            k = 0
            while k < len(stages):
                stats = None
                if not data_free:
                    t = time.perf_counter()
                    s = call(statistics_task, jd, i, k, inputs, captured["args"], pruned, groups, work_dir)
                    if k == 0:
                        groups, dense = s["groups"], s["dense"]
                        stages = groups if plan.true_sequential else [[m for g in groups for m in g]]
                    stats = s["stats"]
                    plog.info("block %d/%d: statistics %.1f s", i + 1, n, time.perf_counter() - t)
                linears = s["linears"] if stats else _linear_names(blocks[i])
                if data_free:
                    stages, groups = [linears], []
                mask = None
                if method.mask_stage(plan.options):
                    t = time.perf_counter()
                    mask = call(masks_task, jd, i, k, stats, linears, pruned, grads_dir, rate, work_dir)[
                        "masks"
                    ]
                    stage_masks.append(mask)
                    plog.info(
                        "block %d/%d: masks (%s) %.1f s", i + 1, n, plan.method, time.perf_counter() - t
                    )
                w = None
                if method.update_stage():  # on this stage's dense weights (and its mask), as in memory
                    t = time.perf_counter()
                    w = call(update, jd, i, k, stats, linears, pruned, mask, grads_dir, rate, work_dir)[
                        "weights"
                    ]
                    plog.info(
                        "block %d/%d: update (%s) %.1f s", i + 1, n, plan.method, time.perf_counter() - t
                    )
                    stage_masks.append(w)
                pruned.append(w or mask)
                k += 1
            setting = {"target": spec.target, "setting": str(spec), "groups": groups or []}
            t = time.perf_counter()
            args = captured and captured["args"]
            result = call(
                propagate, jd, i, None if data_free else inputs, args, dense, pruned, setting, work_dir
            )
            plog.info("block %d/%d: propagate %.1f s", i + 1, n, time.perf_counter() - t)
            kept = _keep_masks(folder, i, stage_masks)
            done = {**result, "masks": [kept] if kept else []}
            (folder / "blocks" / f"{i:04d}.json").write_text(json.dumps(done, indent=2))
            reports.append(BlockReport.from_dict(result["report"]))
            masks_files += done["masks"]
            _clean_block(folder, i)
            inputs = result["inputs"]
        report = PruneReport(
            method=plan.method,
            setting=str(plan.spec),
            target=plan.spec.target,
            plan=plan.to_dict(),
            nsamples=job.nsamples,
            seqlen=int(calib["shape"][1]),
            blocks_prefix=prefix,
            blocks=reports,
            chosen=chosen,
            provenance=provenance(device, blocks_dtype(job), **chosen),
            owl=rates,
            seconds={"total": round(time.perf_counter() - start, 4)},
        )
        call(assemble, jd, str(out), report.to_dict(), masks_files)
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "name": str(out),
        "path": str(out),
        "sha256": dir_sha256(out, WEIGHT_FILES),
        "report": str(out / "pruning_report.json"),
        "sparsity": report.sparsity,
        "method": report.method,
        "setting": report.setting,
        "key": key,
        "resumed_at": first if first else None,
        **figures,
        "save": {"seconds": 0.0},
    }


def blocks_dtype(job):
    from modules.engine.models import DTYPES

    return DTYPES[job.dtype]


def _linears(block) -> dict:
    from modules.engine.blocks import block_linears

    return block_linears(block)


def _linear_names(block) -> list[str]:
    return list(_linears(block))


def _keep_masks(folder: Path, index: int, files: list[str]) -> str | None:
    """Block ``index``'s final keep-masks in one file (by full parameter name), for ``masks/``."""
    from modules.engine.stages import load, save

    merged = {}
    for path in files:
        for name, value in load(path).items():
            if name.endswith(".keep") or name.endswith(".mask"):
                merged[name.removesuffix(".keep").removesuffix(".mask") + ".keep"] = value
    if not merged:
        return None
    return str(save(merged, folder / "keep" / f"{index:04d}.safetensors"))


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
    work_dir: str = ".topiary",
):
    """Prune a model one-shot into ``output`` through :func:`prune_blocks`, in this process, without Prefect.

    Used by ``topiary prune``: the same per-block stages as the pipeline, their state in
    ``work_dir`` (so a killed run resumes when re-run with the same arguments). An
    existing ``output`` is replaced only if it is empty or a previous Topiary output.

    Returns:
        The :class:`modules.engine.report.PruneReport` (also in ``output/pruning_report.json``).
    """
    from modules.engine.report import PruneReport
    from modules.errors import TopiaryError
    from modules.process import remove_stale
    from tasks.update import REPORT, plan_from_config
    from tasks.windows import calibration, fingerprints

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
        "report_error": report_error,
    }
    plan_from_config(section)  # bad method/sparsity/pattern fail here, before any read
    model_cfg = {"name": model, "dtype": dtype, "device": device}
    data = {"calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    work = str(Path(work_dir).resolve())
    prints = fingerprints.fn(model, calib, calib, None)
    windows = calibration.fn(model, data, prints, work)
    grads = None
    from tasks.statistics import gradients, needs_gradients

    if needs_gradients(section):
        grads = gradients.fn(model_cfg, prints, windows, work)
    prune_blocks(model_cfg, section, prints, windows, grads, work, out_dir=output)
    return PruneReport.from_dict(json.loads((output / REPORT).read_text()))


def _model_folder(parameters: dict, key: str) -> Path:
    from tasks.update import _model_dir

    return _model_dir(parameters, key)


def _prune_key(model: dict, prune: dict, prints: dict, calib: dict, grads: dict | None = None) -> str:
    from tasks.update import prune_key

    return prune_key(model, prune, prints, calib, grads)


@task(
    name="prune",
    task_run_name="prune-{prune[method]}",
    cache_key_fn=cache_key_fn(_prune_key, _model_folder),
    persist_result=True,
)
def prune(model: dict, prune: dict, prints: dict, calib: dict, grads: dict | None, work_dir: str) -> dict:
    """The whole per-block prune as one cached step of the pipeline and the sweep.

    Its per-block tasks run nested inside it (each shows in the UI); a finished prune is
    served from the cache in one lookup, and an unfinished one resumes block by block.
    """
    return prune_blocks(model, prune, prints, calib, grads, work_dir, call=_nested)


def clean(work_dir: str | Path) -> list[Path]:
    """Remove resume state and what killed runs left: ``<work_dir>/runs/*`` of runs no process
    holds (a run's folder is in use while the work folder's lock is held), and temporary
    files of dead processes under the work folder and ``$TMPDIR``.

    Returns:
        What was removed.
    """
    from modules.process import remove_stale
    from tasks.cache import work_lock

    work = Path(work_dir)
    removed: list[Path] = []
    if not work.is_dir():
        return removed
    with work_lock(work):  # waits for a running pipeline on this folder to end
        for run in sorted((work / "runs").glob("*")):
            shutil.rmtree(run, ignore_errors=True)
            removed.append(run)
        removed += remove_stale(
            [work, *[p for p in work.iterdir() if p.is_dir()]], depth=2, tmp_dir=Path(tempfile.gettempdir())
        )
    return removed
