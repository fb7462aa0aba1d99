"""The tracking stage: Prefect tasks around the plain MLflow functions of :mod:`tracking.runs`.

``track`` (one MLflow run per pipeline run or sweep member: config, results, plots and
the pruned model) is cached by the whole config and the results, so an unchanged re-run
does not log a duplicate run. The sweep's parent run is started and logged by
``start_sweep_run`` and ``log_sweep``. The promotion task is in :mod:`tasks.promote`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, TypedDict

from configs.schema import PipelineCfg, SweepCfg, TrackingCfg
from modules.errors import TopiaryError
from modules.evaluation.intervals import Paired
from modules.evaluation.zeroshot import ZeroShot
from modules.process import pause_point
from tasks.cache import cache_key_fn, measure, stage_key, task
from tracking.runs import (
    ENDED_BY_TAG,
    Results,
    client,
    end_run,
    errors_of_stores,
    log_config,
    log_model,
    log_results,
    start_run,
)
from tracking.runs import log_sweep as log_table
from tracking.tables import Baseline, SweepRow, sweep_csv, sweep_markdown

if TYPE_CHECKING:  # a type only: its module loads the engine
    from modules.evaluation.perplexity import Perplexity


class TrackingFailed(TopiaryError):
    """The tracking store failed; the steps before are in the cache, so a re-run only tracks."""


def store_failed(uri: str, err: Exception) -> TrackingFailed:
    """One line naming the store, why it failed, and that nothing computed is lost."""
    why = " ".join(str(err).split("\n", 1)[0].split())[:200] or type(err).__name__
    return TrackingFailed(
        f"tracking.uri: {uri}: the tracking store failed ({type(err).__name__}: {why}); the results "
        "are cached: fix the store and re-run the same command to track them without recomputing"
    )


class Outputs(TypedDict, total=False):
    """The steps' results that a tracked run logs, by step name; ``prune`` and the perplexities
    always, the others when they ran."""

    calibration: dict[str, Any] | None
    gradients: dict[str, Any] | None
    masks_from: dict[str, Any] | None
    prune: dict[str, Any]
    """The prune step's result: ``path`` (the model), ``report``, ``save``, ``resumed_at``..."""
    ppl_dense: Perplexity
    ppl_pruned: Perplexity
    zeroshot_dense: ZeroShot
    zeroshot_pruned: ZeroShot
    paired: Paired


def track_key(cfg: PipelineCfg, outputs: Outputs, run_name: str, parent_run_id: str | None = None) -> str:
    """Cache key of a tracked run: the full config, every step's output, its name and parent."""
    config = cfg.model_dump(mode="json")
    return stage_key("track", cfg=config, outputs=outputs, run_name=run_name, parent=parent_run_id)


STAGE_NAMES = (
    "calibration",
    "gradients",
    "masks_from",
    "prune",
    "ppl_dense",
    "ppl_pruned",
    "zeroshot_dense",
    "zeroshot_pruned",
    "paired",
)


def mlflow_results(outputs: Outputs) -> Results:
    """The ``results`` of :func:`tracking.runs.log_results` from the steps' outputs."""
    pruned = outputs["prune"]
    stages = {}
    for name in STAGE_NAMES:
        if outputs.get(name):
            stages[name] = {k: outputs[name].get(k) for k in ("seconds", "peak_mem_mb")}
    stages["save"] = {k: pruned["save"].get(k) for k in ("seconds", "peak_mem_mb")}
    return {
        "seqlen": outputs["ppl_pruned"]["seqlen"],
        "dense": {"ppl": outputs["ppl_dense"], "zeroshot": outputs.get("zeroshot_dense")},
        "pruned": {"ppl": outputs["ppl_pruned"], "zeroshot": outputs.get("zeroshot_pruned")},
        "pruning": pruned["report"],
        "paired": outputs.get("paired"),
        "stages": stages,
        "resumed_at": pruned.get("resumed_at"),
    }


@task(
    name="track", task_run_name="track-{run_name}", cache_key_fn=cache_key_fn(track_key), persist_result=True
)
def track(cfg: PipelineCfg, outputs: Outputs, run_name: str, parent_run_id: str | None = None) -> dict:
    """Log one evaluated pipeline run to MLflow: config, metrics, reports, plots, model.

    Args:
        cfg: the pipeline config.
        outputs: the steps' results; the pruned model is ``outputs["prune"]["path"]``.
        run_name: shown in the MLflow UI.
        parent_run_id: the sweep's run, for a sweep member.

    Returns:
        ``{"run_id", "model_uri", "metrics", "seconds", "peak_mem_mb"}``; the run is
        FINISHED (FAILED, and the error re-raised, if logging fails half-way).
    """
    with measure() as figures:
        store_errors = errors_of_stores()
        try:
            run_id = start_run(cfg, run_name, parent_run_id=parent_run_id)
        except store_errors as err:
            raise store_failed(cfg.tracking.uri, err) from err
        try:
            log_config(run_id, cfg)
            metrics = log_results(run_id, mlflow_results(outputs), cfg.tracking, title=run_name)
            pause_point("track")  # test hook: the run is RUNNING, its model not yet logged
            uri = log_model(run_id, outputs["prune"]["path"], cfg.tracking)
            end_run(run_id, cfg.tracking)
        except BaseException as err:
            with contextlib.suppress(Exception):  # the store may be what failed
                end_run(run_id, cfg.tracking, "FAILED")
            if isinstance(err, store_errors):
                raise store_failed(cfg.tracking.uri, err) from err
            raise
    return {"run_id": run_id, "model_uri": uri, "metrics": metrics, **figures}


def sweep_run_key(cfg: SweepCfg) -> str:
    """Cache key of a sweep's parent run: the sweep config (a re-run re-uses the run)."""
    return stage_key("sweep-run", cfg=cfg.model_dump(mode="json"))


@task(name="start-sweep-run", cache_key_fn=cache_key_fn(sweep_run_key), persist_result=True)
def start_sweep_run(cfg: SweepCfg, run_name: str) -> str:
    """Create the sweep's parent MLflow run (config logged, left RUNNING); returns its id."""
    run_id = start_run(cfg, run_name)
    log_config(run_id, cfg)
    return run_id


def sweep_log_key(run_id: str, rows: list[SweepRow], dense: Baseline) -> str:
    """Cache key of the sweep summary: the parent run and every row of the table."""
    return stage_key("sweep-log", run=run_id, rows=rows, dense=dense)


@task(name="log-sweep", cache_key_fn=cache_key_fn(sweep_log_key), persist_result=True)
def log_sweep(run_id: str, rows: list[SweepRow], dense: Baseline, tracking: TrackingCfg) -> dict:
    """Log the sweep table (``sweep.md``, ``sweep.csv``, ``sweep.json``) and the plot; finish the run.

    Args:
        run_id: the sweep's parent run.
        rows: one per member.
        dense: the dense model's figures.
        tracking: where the run lives.
    """
    with measure() as figures:
        log_table(run_id, rows, tracking, dense_ppl=dense.get("ppl"))
        mc = client(tracking)
        mc.log_text(run_id, sweep_markdown(rows, dense), "sweep.md")
        mc.log_text(run_id, sweep_csv(rows), "sweep.csv")
        if ENDED_BY_TAG in mc.get_run(run_id).data.tags:  # a killed sweep's run, finished by its re-run
            mc.delete_tag(run_id, ENDED_BY_TAG)
        end_run(run_id, tracking)
    return {"run_id": run_id, **figures}
