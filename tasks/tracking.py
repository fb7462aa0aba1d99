"""Prefect tasks around the plain MLflow functions of ``tasks/track.py`` and ``tasks/promote.py``.

``track`` (one MLflow run per pipeline run or sweep member: config, results, plots and
the pruned model) is cached by the whole config and the results, so an unchanged re-run
does not log a duplicate run. ``promote`` is never cached: the gate compares with the
registry's *current* champion, which other runs may have changed since; re-applying it
to the same run re-uses that run's model version.
"""

from __future__ import annotations

import csv
import io
import math

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.cache import cache_key_fn, measure, stage_key


def track_key(cfg: dict, outputs: dict, run_name: str, parent_run_id: str | None = None) -> str:
    """Cache key of a tracked run: the full config, every step's output, its name and parent."""
    return stage_key("track", cfg=cfg, outputs=outputs, run_name=run_name, parent=parent_run_id)


STAGE_NAMES = (
    "calibration",
    "gradients",
    "prune",
    "ppl_dense",
    "ppl_pruned",
    "zeroshot_dense",
    "zeroshot_pruned",
    "paired",
)


def mlflow_results(outputs: dict) -> dict:
    """The ``results`` of :func:`tasks.track.log_results` from the steps' outputs.

    Args:
        outputs: step name -> that task's result: ``prune`` and ``ppl_dense``/``ppl_pruned``
            always, ``calibration``, ``gradients``, ``zeroshot_dense``/``zeroshot_pruned`` and
            ``paired`` (the paired comparison) when they ran.
    """
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
    }


@task(
    name="track", task_run_name="track-{run_name}", cache_key_fn=cache_key_fn(track_key), persist_result=True
)
def track(cfg: dict, outputs: dict, run_name: str, parent_run_id: str | None = None) -> dict:
    """Log one evaluated pipeline run to MLflow: config, metrics, reports, plots, model.

    Args:
        cfg: the pipeline config (``PipelineCfg.model_dump(mode="json")``).
        outputs: the steps' results (see :func:`mlflow_results`); the pruned model is
            ``outputs["prune"]["path"]``.
        run_name: shown in the MLflow UI.
        parent_run_id: the sweep's run, for a sweep member.

    Returns:
        ``{"run_id", "model_uri", "metrics", "seconds", "peak_mem_mb"}``; the run is
        FINISHED (FAILED, and the error re-raised, if logging fails half-way).
    """
    from configs.schema import PipelineCfg
    from modules.process import pause_point
    from tasks.track import end_run, log_config, log_model, log_results, start_run

    config = PipelineCfg.model_validate(cfg)
    with measure() as figures:
        run_id = start_run(config, run_name, parent_run_id=parent_run_id)
        try:
            log_config(run_id, config)
            metrics = log_results(run_id, mlflow_results(outputs), config.tracking, title=run_name)
            pause_point("track")  # test hook: the run is RUNNING, its model not yet logged
            uri = log_model(run_id, outputs["prune"]["path"], config.tracking)
        except BaseException:
            end_run(run_id, config.tracking, "FAILED")
            raise
        end_run(run_id, config.tracking)
    return {"run_id": run_id, "model_uri": uri, "metrics": metrics, **figures}


@task(name="promote", cache_policy=NO_CACHE)
def promote(run_id: str, gate: dict, tracking: dict) -> dict:
    """Apply the promotion gate to an evaluated, tracked run (see :func:`tasks.promote.promote`).

    Returns:
        The decision (``passed``, ``promoted``, ``version``, ``champion``, ``reasons``...)
        plus ``reason`` (one line) and ``seconds``/``peak_mem_mb``.
    """
    from configs.schema import GateCfg, TrackingCfg
    from tasks.promote import promote as apply_gate
    from tasks.track import end_stale_runs

    config = TrackingCfg.model_validate(tracking)
    with measure() as figures:
        end_stale_runs(config)  # also when ``track`` came from the cache
        decision = apply_gate(run_id, GateCfg.model_validate(gate), config)
    failed = [r for r in decision["reasons"] if r.startswith("fail:")]
    decision["reason"] = "; ".join(failed or decision["reasons"]) or (
        "passed" if decision["passed"] else "failed"
    )
    return {**decision, **figures}


def sweep_run_key(cfg: dict) -> str:
    """Cache key of a sweep's parent run: the sweep config (a re-run re-uses the run)."""
    return stage_key("sweep-run", cfg=cfg)


@task(name="start-sweep-run", cache_key_fn=cache_key_fn(sweep_run_key), persist_result=True)
def start_sweep_run(cfg: dict, run_name: str) -> str:
    """Create the sweep's parent MLflow run (config logged, left RUNNING); returns its id."""
    from configs.schema import SweepCfg
    from tasks.track import log_config, start_run

    config = SweepCfg.model_validate(cfg)
    run_id = start_run(config, run_name)
    log_config(run_id, config)
    return run_id


def sweep_log_key(run_id: str, rows: list[dict], dense: dict) -> str:
    """Cache key of the sweep summary: the parent run and every row of the table."""
    return stage_key("sweep-log", run=run_id, rows=rows, dense=dense)


@task(name="log-sweep", cache_key_fn=cache_key_fn(sweep_log_key), persist_result=True)
def log_sweep(run_id: str, rows: list[dict], dense: dict, tracking: dict) -> dict:
    """Log the sweep table (``sweep.md``, ``sweep.csv``, ``sweep.json``) and the plot; finish the run.

    Args:
        run_id: the sweep's parent run.
        rows: one per member: ``method``, ``setting``, ``sparsity``, ``ppl``, ``seqlen``,
            ``zeroshot_mean``, ``run_id``.
        dense: ``{"ppl", "seqlen", "zeroshot_mean"}`` of the dense model.
        tracking: the ``tracking`` config section.
    """
    from configs.schema import TrackingCfg
    from tasks.track import ENDED_BY_TAG, client, end_run
    from tasks.track import log_sweep as log_table

    config = TrackingCfg.model_validate(tracking)
    with measure() as figures:
        log_table(run_id, rows, config, dense_ppl=dense.get("ppl"))
        mc = client(config)
        mc.log_text(run_id, sweep_markdown(rows, dense), "sweep.md")
        mc.log_text(run_id, sweep_csv(rows), "sweep.csv")
        if ENDED_BY_TAG in mc.get_run(run_id).data.tags:  # a killed sweep's run, finished by its re-run
            mc.delete_tag(run_id, ENDED_BY_TAG)
        end_run(run_id, config)
    return {"run_id": run_id, **figures}


def _num(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if math.isfinite(value) else str(value)


def sweep_markdown(rows: list[dict], dense: dict) -> str:
    """The sweep as a Markdown table: one row per method, one column per setting.

    Each cell is ``ppl / zero-shot mean acc`` (``-`` where zero-shot is off or a member
    is missing); the dense model is the first row, the window length in the header.
    """
    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    cells = {(r["method"], r["setting"]): r for r in rows}
    window = dense.get("seqlen") or next((r.get("seqlen") for r in rows if r.get("seqlen")), None)
    header = ["method", *[f"{s}" for s in settings]]
    lines = [
        f"ppl @ window {window} / zero-shot mean acc",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(settings)) + "|",
    ]
    dense_cell = f"{_num(dense.get('ppl'), '.3f')} / {_num(dense.get('zeroshot_mean'), '.4f')}"
    lines.append("| dense | " + " | ".join([dense_cell] * len(settings)) + " |")
    for m in methods:
        row = [m]
        for s in settings:
            r = cells.get((m, s))
            row.append(
                "-" if r is None else f"{_num(r.get('ppl'), '.3f')} / {_num(r.get('zeroshot_mean'), '.4f')}"
            )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("method", "setting", "sparsity", "ppl", "seqlen", "zeroshot_mean", "run_id")


def sweep_csv(rows: list[dict]) -> str:
    """The sweep as CSV, one line per member (``CSV_FIELDS``)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in CSV_FIELDS})
    return out.getvalue()
