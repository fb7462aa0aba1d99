"""Where MLflow gets written: one run per flow run, its config, results, plots and model.

Every function takes the run id and the tracking settings explicitly and talks to MLflow
through an ``MlflowClient`` bound to ``TrackingCfg.uri``, so it works the same in Prefect
worker threads or processes, against the local SQLite store (the default,
``sqlite:///mlflow.db`` in the working directory) or a remote tracking server.

Metric names (``L`` is the evaluation window length, ``V`` is ``dense`` or ``pruned``):

- ``ppl_V_wL`` perplexity; ``ppl_ratio_wL`` = pruned / dense
- ``zeroshot_V_TASK_acc``, ``zeroshot_V_TASK_acc_norm``, ``zeroshot_V_mean`` (fractions in
  [0, 1]); ``zeroshot_drop_points`` = 100 x (dense mean - pruned mean)
- the paired comparison (same windows, same items; 95% bootstrap intervals,
  ``modules/evaluation/intervals.py``): ``ppl_ratio_wL_lo95``/``_hi95``, ``ppl_diff_wL`` (pruned -
  dense) and its ``_lo95``/``_hi95``, ``ppl_windows_wL``; ``zeroshot_diff_TASK_points``
  (pruned - dense, points) and ``zeroshot_diff_mean_points`` with ``_lo95``/``_hi95``, and
  ``zeroshot_paired_items``
- ``sparsity`` achieved overall; ``sparsity_block`` and ``recon_error_block`` with
  ``step`` = decoder block index (one chart per metric in the MLflow UI)
- ``time_STAGE_s`` and ``peak_mem_STAGE_mb`` per stage

Provenance (:mod:`modules.provenance`: commit and dirty flag, library versions, device,
dtype, ADMM precision, threads), merged over the steps that produced the results: params
``provenance.KEY`` and tags ``topiary.provenance.KEY``, and ``provenance`` in
``evaluation.json`` (each evaluation there also keeps its own).

Artifacts: ``config.yaml``, ``evaluation.json`` (with the paired comparison),
``evaluation_items.json`` (each window's NLL and each item's correctness, both models),
``pruning_report.json``,
``plots/blocks.png`` (and ``plots/ppl_vs_sparsity.png`` + ``sweep.json`` for a sweep),
and the pruned model as an MLflow ``transformers`` model named ``model``.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import yaml

from configs.schema import PipelineCfg, SweepCfg, TrackingCfg
from modules.engine.report import PruneReport
from modules.errors import TopiaryError
from modules.evaluation.intervals import Paired
from modules.evaluation.zeroshot import ZeroShot
from modules.process import owner_tag, tag_alive
from modules.provenance import merge
from tracking.plots import plot_blocks, plot_ppl_vs_sparsity
from tracking.tables import SweepRow

if TYPE_CHECKING:  # a type only: its module loads the engine
    from modules.evaluation.perplexity import Perplexity

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# mlflow, transformers and huggingface_hub load inside the functions that use them: they are
# heavy, and importing tracking (the CLI, the preflight's probe of the store) must stay light.

MODEL_ID_TAG = "topiary.model_id"
OWNER_TAG = "topiary.owner"  # host/pid-start of the process that created the run
ENDED_BY_TAG = "topiary.ended_by"
STALE_CLEANUP = "stale-run-cleanup"
CONFIG_KIND_TAG = "topiary.config_kind"
CONFIG_ARTIFACT = "config.yaml"
MODEL_NAME = "model"
_BATCH = 100  # MLflow takes at most 100 params (1000 metrics) per log_batch call
_FLUENT_LOCK = threading.Lock()


class Evaluated(TypedDict, total=False):
    """One model's evaluation in a run's :class:`Results`."""

    ppl: Perplexity | float
    """The perplexity task's result, or the figure alone."""
    seqlen: int
    """The window length, where ``ppl`` does not say it."""
    zeroshot: ZeroShot | None
    """The zero-shot task's result (or ``{"tasks", "mean"}``, or the tasks alone); None: disabled."""


class Results(TypedDict, total=False):
    """What :func:`log_results` logs of a run; every key optional (a perplexity needs its window)."""

    seqlen: int
    """The perplexity window length."""
    dense: Evaluated
    pruned: Evaluated
    pruning: dict[str, Any] | str | Path
    """The pruning report (``PruneReport.to_dict()``) or its file."""
    paired: Paired | None
    stages: dict[str, dict[str, float | None]]
    """Step -> ``{"seconds", "peak_mem_mb"}``."""
    resumed_at: int | None
    """The first block the prune computed itself (0-based), when it resumed a killed attempt."""


def _uri(tracking: TrackingCfg | str) -> str:
    return tracking if isinstance(tracking, str) else tracking.uri


def errors_of_stores() -> tuple[type[BaseException], ...]:
    """What a failing store raises: MLflow's errors, SQLAlchemy's (opening a database store),
    SQLite's, and the file system's (artifacts)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, sqlite3.Error, OSError


def client(tracking: TrackingCfg | str):
    """An ``MlflowClient`` whose tracking and registry URIs are both ``tracking.uri``."""
    from mlflow import MlflowClient

    uri = _uri(tracking)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def fluent_uri(tracking: TrackingCfg | str) -> Iterator[None]:
    """Point MLflow's process-global (fluent) tracking and registry URIs at ``tracking``.

    Only the fluent API needs this (``mlflow.transformers.log_model``/``load_model``);
    the previous URIs come back on exit. A lock keeps two threads from interleaving.
    """
    import mlflow

    uri = _uri(tracking)
    with _FLUENT_LOCK:
        before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before[0])
            mlflow.set_registry_uri(before[1])


def ensure_experiment(tracking: TrackingCfg, artifact_location: str | None = None) -> str:
    """Return the id of ``tracking.experiment``, creating it when missing.

    Args:
        tracking: the tracking settings (URI and experiment name).
        artifact_location: where a *new* experiment stores artifacts; None means
            ``mlruns/`` next to a local SQLite database, or the server's choice remotely.
    """
    from mlflow.exceptions import MlflowException

    mc = client(tracking)
    found = mc.get_experiment_by_name(tracking.experiment)
    if found is not None:
        return found.experiment_id
    if artifact_location is None and tracking.uri.startswith("sqlite:///"):
        # Next to the database (MLflow would use ./mlruns of whatever the working directory is).
        db = Path(tracking.uri.removeprefix("sqlite:///").split("?")[0]).resolve()
        artifact_location = str(db.parent / "mlruns")
    try:
        return mc.create_experiment(tracking.experiment, artifact_location=artifact_location)
    except MlflowException:  # created meanwhile by a concurrent sweep member
        found = mc.get_experiment_by_name(tracking.experiment)
        if found is None:
            raise
        return found.experiment_id


def start_run(
    cfg: PipelineCfg,
    run_name: str,
    parent_run_id: str | None = None,
    artifact_location: str | None = None,
) -> str:
    """Create the MLflow run of one flow run in ``cfg.tracking.experiment``.

    Args:
        cfg: the resolved pipeline (or sweep) config; its ``tracking`` section says where.
        run_name: shown in the MLflow UI (e.g. ``wanda-0.5``).
        parent_run_id: nest this run under a sweep's run.
        artifact_location: artifact root if the experiment has to be created.

    Returns:
        The run id; the run stays RUNNING until :func:`end_run`.
    """
    experiment_id = ensure_experiment(cfg.tracking, artifact_location)
    end_stale_runs(cfg.tracking, experiment_id)
    tags = {CONFIG_KIND_TAG: type(cfg).__name__, "topiary.model": cfg.model.name, OWNER_TAG: owner_tag()}
    if hasattr(cfg, "methods"):
        tags["topiary.methods"] = ",".join(cfg.methods)
        tags["topiary.settings"] = ",".join(cfg.settings)
    else:
        tags["topiary.method"] = cfg.prune.method
        tags["topiary.setting"] = cfg.prune.setting
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client(cfg.tracking).create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id


def end_stale_runs(tracking: TrackingCfg, experiment_id: str | None = None) -> list[str]:
    """End as FAILED the RUNNING runs of the experiment whose owning process is dead.

    A killed process leaves its run RUNNING for good. Each Topiary run carries its owner
    (:data:`OWNER_TAG`: host, pid and process start time, so a re-used pid does not count
    as alive); a run whose owner is gone is ended as FAILED and tagged
    ``topiary.ended_by=stale-run-cleanup``. Runs of live processes, of other hosts and
    without the tag (not Topiary's) are left alone.

    Args:
        tracking: where the runs live; its ``experiment`` is searched.
        experiment_id: the experiment's id, when known (else looked up by name).

    Returns:
        The ids of the runs ended.
    """
    mc = client(tracking)
    if experiment_id is None:
        found = mc.get_experiment_by_name(tracking.experiment)
        if found is None:
            return []
        experiment_id = found.experiment_id
    running = mc.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    ended = []
    for run in running:
        owner = run.data.tags.get(OWNER_TAG)
        if owner and not tag_alive(owner):
            mc.set_tag(run.info.run_id, ENDED_BY_TAG, STALE_CLEANUP)
            mc.set_terminated(run.info.run_id, "FAILED")
            ended.append(run.info.run_id)
    return ended


def end_run(run_id: str, tracking: TrackingCfg | str, status: str = "FINISHED") -> None:
    """Close a run: ``FINISHED``, ``FAILED`` or ``KILLED``."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status: {status!r} is not one of FINISHED, FAILED, KILLED")
    client(tracking).set_terminated(run_id, status)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"prune.options.alpha": "5"}``; lists as JSON, an empty dict as ``{}``."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, dict | list | tuple):
            flat[name] = json.dumps(value)
        else:
            flat[name] = str(value)
    return flat


def _log_batch(run_id: str, tracking: TrackingCfg | str, params=(), metrics=(), tags=()) -> None:
    mc = client(tracking)
    params, metrics, tags = list(params), list(metrics), list(tags)
    for i in range(0, max(len(params), len(tags), 1), _BATCH):
        mc.log_batch(run_id, params=params[i : i + _BATCH], tags=tags[i : i + _BATCH], synchronous=True)
    for i in range(0, len(metrics), 10 * _BATCH):
        mc.log_batch(run_id, metrics=metrics[i : i + 10 * _BATCH], synchronous=True)


def log_config(run_id: str, cfg: PipelineCfg) -> dict[str, str]:
    """Log the resolved config as flattened params and as the ``config.yaml`` artifact.

    Returns:
        The flattened params that were logged.
    """
    from mlflow.entities import Param

    tree = cfg.model_dump(mode="json")
    params = flatten(tree)
    _log_batch(run_id, cfg.tracking, params=[Param(k, v) for k, v in params.items()])
    client(cfg.tracking).log_text(run_id, yaml.safe_dump(tree, sort_keys=False), CONFIG_ARTIFACT)
    return params


def load_run_config(run_id: str, tracking: TrackingCfg | str) -> PipelineCfg:
    """Read a run's ``config.yaml`` back into the config class it was logged from."""
    from mlflow.exceptions import MlflowException

    mc = client(tracking)
    kind = get_run(run_id, tracking).data.tags.get(CONFIG_KIND_TAG, "PipelineCfg")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mc.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)
        except (MlflowException, OSError) as err:
            raise TopiaryError(f"run {run_id}: no {CONFIG_ARTIFACT} artifact ({err})") from None
        tree = yaml.safe_load(Path(local).read_text())
    return (SweepCfg if kind == "SweepCfg" else PipelineCfg).model_validate(tree)


def get_run(run_id: str, tracking: TrackingCfg | str):
    """Fetch a run; an unknown id is a :class:`TopiaryError` naming the store."""
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking).get_run(run_id)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            raise TopiaryError(f"run: {run_id!r} not found in {_uri(tracking)}") from None
        raise


def _ppl(entry: Evaluated) -> tuple[float, int | None]:
    value = entry.get("ppl")
    if isinstance(value, dict):  # the dict of modules.evaluation.perplexity.perplexity()
        return float(value["ppl"]), value.get("seqlen")
    return float(value), entry.get("seqlen")


def _accuracy(name: str, values: dict[str, float], key: str) -> float | None:
    for k in (key, f"{key},none"):  # lm-eval spells them "acc,none"
        if values.get(k) is not None:
            v = float(values[k])
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"zeroshot.{name}.{key}: {v} is not a fraction in [0, 1]")
            return v
    return None


def zeroshot_metrics(result: ZeroShot | None, variant: str) -> dict[str, float]:
    """Flatten a zero-shot result into ``zeroshot_{variant}_*`` metrics.

    ``result`` is ``{"tasks": {TASK: {"acc", "acc_norm"}}, "mean": m}`` (or the tasks at the
    top level); accuracies are fractions. Without ``mean``, the mean of ``acc`` is used.
    """
    if not result:
        return {}
    tasks = result.get("tasks", result)
    out: dict[str, float] = {}
    accs = []
    for task, values in tasks.items():
        if not isinstance(values, dict):
            continue
        for key in ("acc", "acc_norm"):
            v = _accuracy(task, values, key)
            if v is not None:
                out[f"zeroshot_{variant}_{task}_{key}"] = v
        if f"zeroshot_{variant}_{task}_acc" in out:
            accs.append(out[f"zeroshot_{variant}_{task}_acc"])
    mean = result.get("mean")
    if mean is None and accs:
        mean = sum(accs) / len(accs)
    if mean is not None:
        out[f"zeroshot_{variant}_mean"] = _accuracy("mean", {"mean": mean}, "mean")
    return out


def block_rows(report: PruneReport) -> list[dict]:
    """Per-block ``{"index", "sparsity", "recon_error"}`` of a pruning report, in block order."""
    return [
        {"index": b.index, "sparsity": b.sparsity, "recon_error": b.reconstruction_error}
        for b in sorted(report.blocks, key=lambda b: b.index)
    ]


def results_metrics(results: Results) -> list[tuple[str, float, int]]:
    """The ``(name, value, step)`` metrics of a run's results (see the module docstring).

    ``results`` holds ``dense`` and ``pruned`` (each ``{"ppl": float or the perplexity()
    dict, "seqlen": L, "zeroshot": result or None}``), ``pruning`` (the pruning report)
    and ``stages`` (``{STAGE: {"seconds": s, "peak_mem_mb": m}}``); every key is optional
    except that a perplexity needs its window length.
    """
    metrics: list[tuple[str, float, int]] = []
    ppl: dict[str, float] = {}
    window = results.get("seqlen")
    for variant in ("dense", "pruned"):
        entry = results.get(variant) or {}
        if entry.get("ppl") is not None:
            value, seqlen = _ppl(entry)
            seqlen = seqlen or window
            if seqlen is None:
                raise ValueError(f"results.{variant}: perplexity without a window length (seqlen)")
            window = int(seqlen)
            ppl[variant] = value
            metrics.append((f"ppl_{variant}_w{window}", value, 0))
        metrics += [(k, v, 0) for k, v in zeroshot_metrics(entry.get("zeroshot"), variant).items()]
    if len(ppl) == 2 and ppl["dense"] > 0:
        metrics.append((f"ppl_ratio_w{window}", ppl["pruned"] / ppl["dense"], 0))
    metrics += [(k, v, 0) for k, v in paired_metrics(results.get("paired"), window).items()]
    means = {name: v for name, v, _ in metrics if name.endswith("_mean")}
    if {"zeroshot_dense_mean", "zeroshot_pruned_mean"} <= means.keys():
        drop = 100.0 * (means["zeroshot_dense_mean"] - means["zeroshot_pruned_mean"])
        metrics.append(("zeroshot_drop_points", drop, 0))
    report = _report(results)
    if report:
        metrics.append(("sparsity", report.sparsity, 0))
        for row in block_rows(report):
            metrics.append(("sparsity_block", row["sparsity"], row["index"]))
            if row["recon_error"] is not None:
                metrics.append(("recon_error_block", float(row["recon_error"]), row["index"]))
    for stage, figures in (results.get("stages") or {}).items():
        if figures.get("seconds") is not None:
            metrics.append((f"time_{stage}_s", float(figures["seconds"]), 0))
        if figures.get("peak_mem_mb") is not None:
            metrics.append((f"peak_mem_{stage}_mb", float(figures["peak_mem_mb"]), 0))
    return metrics


def paired_metrics(paired: Paired | None, window: int | None) -> dict[str, float]:
    """Metrics of a paired comparison (:func:`tasks.evaluate.paired`); see the module docstring."""
    out: dict[str, float] = {}
    if not paired:
        return out
    ppl = paired.get("ppl")
    if ppl:
        out[f"ppl_ratio_w{window}_lo95"] = ppl["ratio_lo"]
        out[f"ppl_ratio_w{window}_hi95"] = ppl["ratio_hi"]
        out[f"ppl_diff_w{window}"] = ppl["diff"]
        out[f"ppl_diff_w{window}_lo95"] = ppl["diff_lo"]
        out[f"ppl_diff_w{window}_hi95"] = ppl["diff_hi"]
        out[f"ppl_windows_w{window}"] = ppl["windows"]
    zs = paired.get("zeroshot")
    if zs:
        for name, row in [*zs["tasks"].items(), ("mean", zs["mean"])]:
            out[f"zeroshot_diff_{name}_points"] = row["diff"]
            out[f"zeroshot_diff_{name}_lo95"] = row["lo"]
            out[f"zeroshot_diff_{name}_hi95"] = row["hi"]
        out["zeroshot_paired_items"] = zs["mean"]["n"]
    return out


_ITEM_KEYS = {"ppl": "window_nll", "zeroshot": "items"}


def split_items(evaluation: Results) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``evaluation.json`` without the per-window and per-item lists, and those lists apart."""
    small, items = {}, {}
    for key, value in evaluation.items():
        if key not in ("dense", "pruned") or not isinstance(value, dict):
            small[key] = value
            continue
        small[key] = dict(value)
        for part, field in _ITEM_KEYS.items():
            entry = value.get(part)
            if isinstance(entry, dict) and field in entry:
                small[key][part] = {k: v for k, v in entry.items() if k != field}
                items.setdefault(key, {})[field] = entry[field]
    return small, items


def _report(results: Results) -> PruneReport | None:
    """The pruning report of ``results`` (its file, or its dict), typed; None if there is none."""
    report = results.get("pruning")
    if isinstance(report, str | Path):
        report = json.loads(Path(report).read_text())
    return PruneReport.from_dict(report) if report else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


PROVENANCE_PARAM = "provenance."
PROVENANCE_TAG = "topiary.provenance."


def results_provenance(results: Results) -> dict[str, str]:
    """The provenance of a run's results, merged over its steps (:func:`modules.provenance.merge`).

    Reads ``provenance`` of the pruning report and of each perplexity and zero-shot result
    in ``results`` (those computed by the tasks carry one).
    """
    report = _report(results)
    steps = {"prune": report.provenance if report else None}
    for variant in ("dense", "pruned"):
        entry = results.get(variant) or {}
        for step, value in (("ppl", entry.get("ppl")), ("zeroshot", entry.get("zeroshot"))):
            if isinstance(value, dict):
                steps[f"{step}_{variant}"] = value.get("provenance")
    return merge(steps)


RESUMED_PARAM = "resumed_from_block"  # 1-based: the first block this attempt pruned
RESUMED_TAG = "topiary.resumed"


def log_results(
    run_id: str, results: Results, tracking: TrackingCfg | str, title: str = ""
) -> dict[str, float]:
    """Log evaluation and pruning results as metrics, JSON artifacts and PNG plots.

    Args:
        run_id: the run from :func:`start_run`.
        results: see :func:`results_metrics` for its keys.
        tracking: where the run lives.
        title: a label for the plots (e.g. ``wanda 0.5``).

    Returns:
        The logged metrics, last value per name (per-block metrics by their last block).
    """
    from mlflow.entities import Metric, Param, RunTag

    stamp = int(time.time() * 1000)
    metrics = results_metrics(results)
    record = results_provenance(results)
    params = [Param(PROVENANCE_PARAM + k, v) for k, v in record.items()]
    tags = [RunTag(PROVENANCE_TAG + k, v) for k, v in record.items()]
    if results.get("resumed_at") is not None:  # the prune resumed a killed attempt's blocks
        params.append(Param(RESUMED_PARAM, str(results["resumed_at"] + 1)))
        tags.append(RunTag(RESUMED_TAG, "true"))
    _log_batch(
        run_id, tracking, params=params, metrics=[Metric(n, v, stamp, s) for n, v, s in metrics], tags=tags
    )
    mc = client(tracking)
    evaluation = {k: results[k] for k in ("seqlen", "dense", "pruned", "paired") if k in results}
    if evaluation:
        evaluation, items = split_items(evaluation)
        evaluation["provenance"] = record
        mc.log_dict(run_id, _jsonable(evaluation), "evaluation.json")
        if items:
            mc.log_dict(run_id, _jsonable(items), "evaluation_items.json")
    report = _report(results)
    if report:
        mc.log_dict(run_id, _jsonable(report.to_dict()), "pruning_report.json")
        rows = block_rows(report)
        if rows:
            with tempfile.TemporaryDirectory() as tmp:
                mc.log_artifact(run_id, str(plot_blocks(rows, Path(tmp) / "blocks.png", title)), "plots")
    return {name: value for name, value, _ in metrics}


def run_provenance(run) -> dict[str, str]:
    """The provenance a run was logged with (its ``provenance.KEY`` params); empty if none."""
    params = run.data.params
    return {k.removeprefix(PROVENANCE_PARAM): v for k, v in params.items() if k.startswith(PROVENANCE_PARAM)}


def log_sweep(
    run_id: str, rows: list[SweepRow], tracking: TrackingCfg | str, dense_ppl: float | None = None
) -> None:
    """Log a sweep's table (``sweep.json``) and its perplexity-against-sparsity plot.

    Args:
        run_id: the sweep's own (parent) run.
        rows: one dict per member run with at least ``method``, ``sparsity`` and ``ppl``.
        tracking: where the run lives.
        dense_ppl: the dense perplexity, drawn as a reference line.
    """
    mc = client(tracking)
    mc.log_dict(run_id, _jsonable({"dense_ppl": dense_ppl, "runs": rows}), "sweep.json")
    points = [r for r in rows if r.get("ppl") is not None and r.get("sparsity") is not None]
    if points:
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_ppl_vs_sparsity(points, Path(tmp) / "ppl_vs_sparsity.png", dense_ppl)
            mc.log_artifact(run_id, str(png), "plots")


def _requirements() -> list[str]:
    pins = []
    for package in ("torch", "transformers", "tokenizers", "safetensors", "accelerate"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


def _model_card(run_id: str, run) -> Any:
    from huggingface_hub import ModelCard

    tags = run.data.tags
    text = (
        "---\nlibrary_name: transformers\ntags: [pruned, topiary]\n---\n"
        f"# {tags.get('topiary.model', 'model')} pruned with Topiary\n\n"
        f"Method {tags.get('topiary.method', '?')}, setting {tags.get('topiary.setting', '?')}; "
        f"MLflow run {run_id}.\n"
    )
    return ModelCard(text)


def log_model(run_id: str, model_dir: str | Path, tracking: TrackingCfg | str) -> str:
    """Log the pruned model in ``model_dir`` to the run as an MLflow transformers model.

    The weights are stored as saved (safetensors, same dtype), so a registered version
    loads back with ``mlflow.transformers.load_model("models:/NAME@champion")`` with weights
    equal to the pruned ones. Pip requirements are pinned from the installed versions
    (MLflow's inference would spawn a process and wants torchvision).

    Returns:
        The logged model's URI (``models:/m-...``); its id is also the run tag
        ``topiary.model_id``, which :func:`tracking.registry.promote` registers.
    """
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modules.engine.models import LOAD_LOCK

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise TopiaryError(f"model_dir: {model_dir} is not a saved Hugging Face model (no config.json)")
    run = get_run(run_id, tracking)
    with LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mc = client(tracking)
    logged = mc.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id)
    with fluent_uri(tracking):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            task="text-generation",
            name=MODEL_NAME,
            run_id=run_id,
            model_id=logged.model_id,
            pip_requirements=_requirements(),
            model_card=_model_card(run_id, run),
        )
    mc.set_tag(run_id, MODEL_ID_TAG, info.model_id)
    return info.model_uri
