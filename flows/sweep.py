"""The sweep flow: every method at every setting, sharing calibration and the dense baselines.

One calibration, one gradient step (when a GBLM member needs it) and one dense
evaluation feed every member; each member's prune -> perplexity -> zero-shot -> track
chain is submitted to the task runner, so members run in parallel: local threads by
default (``runner: local``), or Dask (``runner: dask``: a ``LocalCluster`` of
``dask_workers`` workers, or the scheduler at ``dask_address``). All tasks are the
pipeline's cached tasks, so a sweep re-uses what a pipeline run or an earlier sweep
computed, and the other way round.

The comparison table (methods x settings: perplexity / zero-shot mean) is printed and
logged to the sweep's parent MLflow run (``sweep.md``, ``sweep.csv``, ``sweep.json`` and
``plots/ppl_vs_sparsity.png``); each member is a nested run with its model logged, so
``topiary promote <run id>`` can promote the winner.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger, tags
from pydantic import ValidationError

from configs.schema import ConfigError, PipelineCfg, PruneCfg, SweepCfg
from flows.pipeline import dense_ref, stage_figures
from flows.preflight import preflight_run
from flows.prune import RecipeSteps, prune_recipe
from flows.server import crash_stale_runs, owner_tags, temporary_server
from modules.errors import TopiaryError
from tasks.cache import results_dir, work_lock
from tasks.evaluate import perplexity, zeroshot
from tasks.track import log_sweep, start_sweep_run, track
from tracking.tables import sweep_markdown

SWEEP_ONLY = tuple(sorted(set(SweepCfg.model_fields) - set(PipelineCfg.model_fields)))


def setting_fields(setting: str) -> dict[str, Any]:
    """The prune fields of a setting: ``"2:4"`` -> pattern 2:4; ``"0.5"`` -> sparsity 0.5.

    Anything that is not a number is taken as a pattern, so ``"2-4"`` is reported as a
    bad N:M pattern rather than a bad number.
    """
    text = str(setting).strip()
    try:
        return {"sparsity": float(text), "pattern": None}
    except ValueError:
        return {"pattern": text, "sparsity": None}


def method_fields(member: str) -> dict[str, Any]:
    """The prune fields of a member of ``methods``: ``"wanda"`` -> method wanda;
    ``"admm@sparsegpt"`` -> ADMM's update on SparseGPT's masks (``masks_from``)."""
    method, _, source = str(member).partition("@")
    return {"method": method.strip(), "masks_from": source.strip() or None}


def _problems(err: ValidationError) -> str:
    return "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())


def sweep_jobs(cfg: SweepCfg) -> list[PipelineCfg]:
    """The pipeline config of every (method, setting), validated; all problems reported at once.

    Members share every section of ``cfg`` but ``prune.method`` and the sparsity; a
    setting given twice (``0.5`` and ``0.50``) runs once.

    Raises:
        ConfigError: naming each bad method, setting or combination and the valid choices.
    """
    base = cfg.model_dump(mode="json", exclude=set(SWEEP_ONLY))
    problems = []
    if not cfg.methods:
        problems.append("methods: empty list")
    if not cfg.settings:
        problems.append('settings: empty list (expected rates like "0.5" or patterns like "2:4")')
    for method in cfg.methods:
        try:
            PruneCfg(**method_fields(method))
        except ValidationError as err:
            problems.append(f"methods: {method!r}: {_problems(err)}")
    for setting in cfg.settings:
        try:
            PruneCfg(**setting_fields(setting))
        except ValidationError as err:
            problems.append(f"settings: {setting!r}: {_problems(err)}")
    jobs: dict[tuple[str, str], PipelineCfg] = {}
    for method in cfg.methods if not problems else []:
        for setting in cfg.settings:
            tree = {**base, "prune": {**base["prune"], **method_fields(method), **setting_fields(setting)}}
            try:
                job = PipelineCfg.model_validate(tree)
            except ValidationError as err:
                problems.append(f"method {method!r} at setting {setting!r}: {_problems(err)}")
                continue
            jobs.setdefault((job.prune.label(), job.prune.setting), job)
    if problems:
        raise ConfigError(f"sweep: {len(problems)} problem(s): " + "; ".join(problems))
    return list(jobs.values())


def task_runner(cfg: SweepCfg):
    """The Prefect task runner of ``cfg.runner``: threads, a local Dask cluster, or a Dask address."""
    from prefect.task_runners import ThreadPoolTaskRunner

    if cfg.runner == "local":
        return ThreadPoolTaskRunner(max_workers=cfg.dask_workers)
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": cfg.dask_workers,
            "threads_per_worker": 1,
            "processes": cfg.dask_processes,
            "dashboard_address": None,
        },
    )


@contextmanager
def worker_api(cfg: SweepCfg) -> Iterator[None]:
    """Point local Dask worker *processes* at this process's Prefect API.

    Without ``PREFECT_API_URL`` every process starts its own temporary server, and so
    would each worker (20 s each, and their task runs missing from the flow's UI). This
    starts this process's temporary server first (the one Prefect would start) and
    exports its URL, which the worker processes inherit. Workers at a ``dask_address``
    need ``PREFECT_API_URL`` set on their machines.
    """
    if cfg.runner != "dask" or cfg.dask_address or not cfg.dask_processes:
        yield
        return
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def _outcome(name: str, future, figures: dict[str, dict[str, Any]], failures: list[str]) -> Any:
    """A finished future's result, recording its figures (or its failure); None when it failed."""
    future.wait()
    state = future.state
    if not state.is_completed():
        if state.is_failed():
            err = state.result(raise_on_failure=False)
            failures.append(
                f"{name}: {type(err).__name__}: {err}" if isinstance(err, BaseException) else name
            )
        return None
    result = future.result()
    cached = state.name == "Cached"
    figures[name] = stage_figures(result, cached)
    if cached:
        get_run_logger().info("%s: cached (computed earlier in %.1f s)", name, result.get("seconds", 0.0))
    return result


def _submitted(name: str, task, *args) -> Any:
    """A step of :func:`flows.prune.prune_recipe` submitted to the flow's task runner; the
    fingerprints run at once: they name the dense model of the evaluations submitted next."""
    return task(*args) if name == "fingerprints" else task.submit(*args)


@flow(name="topiary-sweep")
def sweep_flow(cfg: SweepCfg, jobs: list[PipelineCfg]) -> dict[str, Any]:
    """Run every member of a sweep on the flow's task runner; see the module docstring.

    Args:
        cfg: the sweep config, with an absolute ``work_dir``.
        jobs: the members' pipeline configs (:func:`sweep_jobs`).

    Returns:
        See :func:`run_sweep`.
    """
    model, data, zs = cfg.model, cfg.data, cfg.zeroshot
    steps = prune_recipe(model, data, [job.prune for job in jobs], cfg.work_dir, _submitted, zs.data_dir)
    dense = dense_ref(model, steps.fingerprints)
    shared = {
        "calibration": steps.calibration,
        "gradients": steps.gradients,
        "ppl_dense": perplexity.submit(dense, model, data, steps.fingerprints, "dense"),
    }
    if zs.enabled:
        shared["zeroshot_dense"] = zeroshot.submit(dense, model, zs, steps.fingerprints, "dense")
    parent = start_sweep_run.submit(cfg, f"sweep-{len(jobs)}")
    members = [
        _member(job, prunes, shared, steps, parent) for job, prunes in zip(jobs, steps.prunes, strict=True)
    ]
    failures: list[str] = []
    stages: dict[str, dict[str, Any]] = {}
    done = {k: _outcome(k, f, stages, failures) for k, f in shared.items() if f is not None}
    rows = [
        row
        for name, label, futures in members
        if (row := _row(name, label, futures, shared, stages, failures))
    ]
    dense_ppl, dense_zs = done.get("ppl_dense"), done.get("zeroshot_dense")
    dense_row = {
        "ppl": dense_ppl["ppl"] if dense_ppl else None,
        "seqlen": dense_ppl["seqlen"] if dense_ppl else None,
        "zeroshot_mean": dense_zs["mean_acc"] if dense_zs else None,
    }
    run_id = parent.result()
    if rows:
        log_sweep(run_id, rows, dense_row, cfg.tracking)
    return {
        "rows": rows,
        "dense": dense_row,
        "run_id": run_id,
        "table": sweep_markdown(rows, dense_row) if rows else "",
        "failures": failures,
        "stages": stages,
    }


def _member(
    job: PipelineCfg, prunes: dict[str, Any], shared: dict[str, Any], steps: RecipeSteps, parent
) -> tuple[str, str, dict[str, Any]]:
    """Submit a member's evaluations and tracking after its prune: its name, label and futures."""
    model, fingerprints = job.model, steps.fingerprints
    pruned = prunes["prune"]
    futures = {**shared, "gradients": steps.gradients if job.prune.needs_gradients() else None, **prunes}
    futures["ppl_pruned"] = perplexity.submit(pruned, model, job.data, fingerprints, "pruned")
    if job.zeroshot.enabled:
        futures["zeroshot_pruned"] = zeroshot.submit(pruned, model, job.zeroshot, fingerprints, "pruned")
    name = f"{job.prune.label()}-{job.prune.setting}"
    futures["track"] = track.submit(job, dict(futures), name, parent)
    return name, job.prune.label(), futures


def _row(
    name: str,
    label: str,
    futures: dict[str, Any],
    shared: Mapping[str, Any],
    stages: dict[str, dict[str, Any]],
    failures: list[str],
) -> dict[str, Any] | None:
    """A member's row of the sweep table once its futures are done; None when a step failed."""
    figures: dict[str, dict[str, Any]] = {}
    own = {k: _outcome(f"{name} {k}", f, figures, failures) for k, f in futures.items() if k not in shared}
    stages.update(figures)
    pruned, ppl, zsp, tracked = (own.get(k) for k in ("prune", "ppl_pruned", "zeroshot_pruned", "track"))
    if pruned is None or ppl is None or tracked is None:
        return None
    return {
        "method": label,
        "setting": pruned["setting"],
        "sparsity": pruned["sparsity"],
        "ppl": ppl["ppl"],
        "seqlen": ppl["seqlen"],
        "zeroshot_mean": zsp["mean_acc"] if zsp else None,
        "run_id": tracked["run_id"],
    }


def run_sweep(cfg: SweepCfg, *, echo: bool = True, checked: bool = False, wait: bool = True) -> dict:
    """Run the sweep flow for a validated config and print the comparison table.

    Every member config and every input is checked before Prefect or any model starts. While
    another run holds the work folder, it waits for it (``wait=False``: refuses at once).

    Returns:
        ``{"rows": [{method, setting, sparsity, ppl, seqlen, zeroshot_mean, run_id}],
        "dense": {ppl, seqlen, zeroshot_mean}, "run_id" (the parent MLflow run),
        "table" (Markdown), "failures" (one line per failed step), "stages"
        ({step: {seconds, peak_mem_mb, cached}}, members' steps prefixed by their name)}``.

    Args:
        checked: the caller ran :func:`flows.preflight.preflight_run` on ``cfg`` and its
            members already (the CLI, before it opens the run's log file).

    Raises:
        ConfigError: a bad method or setting (before anything runs).
        TopiaryError: when members failed (after the others are tracked and the table logged).
    """
    jobs = sweep_jobs(cfg)
    if not checked:
        preflight_run(cfg, jobs)
    work = results_dir(cfg.work_dir).parent
    logging.getLogger("modules").setLevel(logging.INFO)
    absolute = {"work_dir": str(work)}
    members = [job.model_copy(update=absolute) for job in jobs]
    runner = sweep_flow.with_options(result_storage=results_dir(work), task_runner=task_runner(cfg))
    # transformers' lazy names are not safe to import first from two threads at once ("cannot
    # import name 'AutoConfig'" from a sweep's calibration and dense steps): imported before any.
    import modules.engine.models  # noqa: F401

    with work_lock(work, wait), temporary_server(), worker_api(cfg):
        for name in crash_stale_runs():
            print(
                f"topiary: flow run {name} was left running by a killed process; marked crashed",
                file=sys.stderr,
            )
        with tags(*owner_tags()):
            summary = runner(cfg.model_copy(update=absolute), members)
    if echo:
        print(summary["table"] or "sweep: no member finished")
        print(f"MLflow sweep run {summary['run_id']}")
    if summary["failures"]:
        raise TopiaryError(
            f"sweep: {len(summary['failures'])} step(s) failed: " + " | ".join(summary["failures"])
        )
    return summary
