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

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow, get_run_logger, tags

from configs.schema import ConfigError, PipelineCfg, SweepCfg
from flows.pipeline import dense_ref, stage_figures
from flows.preflight import preflight_run
from flows.prune import prune
from flows.server import crash_stale_runs, owner_tags, temporary_server
from modules.pruning.registry import reads_data
from tasks.cache import results_dir, work_lock
from tasks.evaluate import perplexity, zeroshot
from tasks.statistics import gradients, needs_gradients
from tasks.track import log_sweep, start_sweep_run, track
from tasks.update import masks_source, prune_identity
from tasks.windows import calibration, fingerprints
from tracking.tables import sweep_markdown

SWEEP_ONLY = tuple(sorted(set(SweepCfg.model_fields) - set(PipelineCfg.model_fields)))


def setting_fields(setting: str) -> dict:
    """The prune fields of a setting: ``"2:4"`` -> pattern 2:4; ``"0.5"`` -> sparsity 0.5.

    Anything that is not a number is taken as a pattern, so ``"2-4"`` is reported as a
    bad N:M pattern rather than a bad number.
    """
    text = str(setting).strip()
    try:
        return {"sparsity": float(text), "pattern": None}
    except ValueError:
        return {"pattern": text, "sparsity": None}


def method_fields(member: str) -> dict:
    """The prune fields of a member of ``methods``: ``"wanda"`` -> method wanda;
    ``"admm@sparsegpt"`` -> ADMM's update on SparseGPT's masks (``masks_from``)."""
    method, _, source = str(member).partition("@")
    return {"method": method.strip(), "masks_from": source.strip() or None}


def member_label(prune: dict) -> str:
    """A member's method as ``methods`` names it: ``admm@sparsegpt`` with ``masks_from``."""
    return prune["method"] + (f"@{prune['masks_from']}" if prune.get("masks_from") else "")


def _problems(err) -> str:
    return "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())


def sweep_jobs(cfg: SweepCfg) -> list[PipelineCfg]:
    """The pipeline config of every (method, setting), validated; all problems reported at once.

    Members share every section of ``cfg`` but ``prune.method`` and the sparsity; a
    setting given twice (``0.5`` and ``0.50``) runs once.

    Raises:
        ConfigError: naming each bad method, setting or combination and the valid choices.
    """
    from pydantic import ValidationError

    from configs.schema import PruneCfg

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
            jobs.setdefault((member_label(job.prune.model_dump()), job.prune.setting), job)
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


def _outcome(name: str, future, figures: dict, failures: list[str]):
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


@flow(name="topiary-sweep")
def sweep_flow(cfg: dict, jobs: list[dict]) -> dict:
    """Run every member of a sweep on the flow's task runner; see the module docstring.

    Args:
        cfg: the :class:`~configs.schema.SweepCfg` as JSON, with an absolute ``work_dir``.
        jobs: the members' pipeline configs as JSON (:func:`sweep_jobs`).

    Returns:
        See :func:`run_sweep`.
    """
    model, data, zs, work = cfg["model"], cfg["data"], cfg["zeroshot"], cfg["work_dir"]
    config = SweepCfg.model_validate(cfg)
    prints = fingerprints(model["name"], data["calib"], data["eval"], zs.get("data_dir"))
    evaluated, scored = (config.model, config.data, prints), (config.model, config.zeroshot, prints)
    reading = [p for job in jobs for p in (job["prune"], masks_source(job["prune"])) if p and reads_data(p)]
    calib = calibration.submit(model["name"], data, prints, work) if reading else None  # magnitude: none
    grads = None
    if any(needs_gradients(p) for job in jobs for p in (job["prune"], masks_source(job["prune"])) if p):
        grads = gradients.submit(model, prints, calib, work, cfg["prune"]["activations"])
    dense = dense_ref(cfg, prints)
    shared = {
        "calibration": calib,
        "gradients": grads,
        "ppl_dense": perplexity.submit(dense, *evaluated, "dense"),
    }
    if zs["enabled"]:
        shared["zeroshot_dense"] = zeroshot.submit(dense, *scored, "dense")
    parent = start_sweep_run.submit(config, f"sweep-{len(jobs)}")

    prunes: dict[str, object] = {}  # one prune per distinct section: a member's, or a masks_from source

    def prune_of(section: dict, masks=None):
        key = json.dumps(prune_identity(section), sort_keys=True)
        if key not in prunes:
            g = grads if needs_gradients(section) else None
            windows = calib if reads_data(section) else None
            prunes[key] = prune.submit(model, section, prints, windows, g, work, masks)
        return prunes[key]

    members = []
    for job in jobs:
        source = masks_source(job["prune"])
        masks = prune_of(source) if source else None  # the same future as a member pruning it
        g = grads if needs_gradients(job["prune"]) else None
        pruned = prune_of(job["prune"], masks)
        futures = {**shared, "gradients": g, "prune": pruned}
        if masks is not None:
            futures["masks_from"] = masks
        futures["ppl_pruned"] = perplexity.submit(pruned, *evaluated, "pruned")
        if zs["enabled"]:
            futures["zeroshot_pruned"] = zeroshot.submit(pruned, *scored, "pruned")
        member = PipelineCfg.model_validate(job)
        name = f"{member_label(job['prune'])}-{member.prune.setting}"
        futures["track"] = track.submit(member, {k: v for k, v in futures.items()}, name, parent)
        members.append((name, member_label(job["prune"]), futures))

    failures: list[str] = []
    stages: dict[str, dict] = {}
    done = {k: _outcome(k, f, stages, failures) for k, f in shared.items() if f is not None}
    rows = []
    for name, label, futures in members:
        figures: dict[str, dict] = {}
        own = {
            k: _outcome(f"{name} {k}", f, figures, failures) for k, f in futures.items() if k not in shared
        }
        stages.update(figures)
        pruned, ppl, zsp, tracked = (own.get(k) for k in ("prune", "ppl_pruned", "zeroshot_pruned", "track"))
        if pruned is None or ppl is None or tracked is None:
            continue
        rows.append(
            {
                "method": label,
                "setting": pruned["setting"],
                "sparsity": pruned["sparsity"],
                "ppl": ppl["ppl"],
                "seqlen": ppl["seqlen"],
                "zeroshot_mean": zsp["mean_acc"] if zsp else None,
                "run_id": tracked["run_id"],
            }
        )
    dense_ppl, dense_zs = done.get("ppl_dense"), done.get("zeroshot_dense")
    dense_row = {
        "ppl": dense_ppl["ppl"] if dense_ppl else None,
        "seqlen": dense_ppl["seqlen"] if dense_ppl else None,
        "zeroshot_mean": dense_zs["mean_acc"] if dense_zs else None,
    }
    run_id = parent.result()
    if rows:
        log_sweep(run_id, rows, dense_row, config.tracking)
    return {
        "rows": rows,
        "dense": dense_row,
        "run_id": run_id,
        "table": sweep_markdown(rows, dense_row) if rows else "",
        "failures": failures,
        "stages": stages,
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
    from modules.errors import TopiaryError

    jobs = sweep_jobs(cfg)
    if not checked:
        preflight_run(cfg, jobs)
    # transformers' lazy top-level names are not safe to import first from two threads at once
    # (a sweep's calibration and dense steps do): "cannot import name 'AutoConfig'". Here, before
    # the task runner's threads start, they are imported once.
    import modules.engine.models  # noqa: F401

    work = results_dir(cfg.work_dir).parent
    logging.getLogger("modules").setLevel(logging.INFO)
    as_json = cfg.model_dump(mode="json") | {"work_dir": str(work)}
    members = [job.model_dump(mode="json") | {"work_dir": str(work)} for job in jobs]
    runner = sweep_flow.with_options(result_storage=results_dir(work), task_runner=task_runner(cfg))
    with work_lock(work, wait), temporary_server(), worker_api(cfg):
        for name in crash_stale_runs():
            print(
                f"topiary: flow run {name} was left running by a killed process; marked crashed",
                file=sys.stderr,
            )
        with tags(*owner_tags()):
            summary = runner(as_json, members)
    if echo:
        print(summary["table"] or "sweep: no member finished")
        print(f"MLflow sweep run {summary['run_id']}")
    if summary["failures"]:
        raise TopiaryError(
            f"sweep: {len(summary['failures'])} step(s) failed: " + " | ".join(summary["failures"])
        )
    return summary
