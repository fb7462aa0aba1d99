"""The pipeline flow: calibrate, [gradients], prune + save, evaluate, compare, track, promote.

Every step is a cached task (``tasks/``): a re-run in any process skips what is done
(its log says ``<step>: cached``) and recomputes only what a changed config or input
invalidates; the dense baselines are cached apart from the prune config. Promotion
runs only after a successful evaluation and tracking, so a run that fails earlier is
never registered. :func:`run_pipeline` is the entry point (``topiary pipeline``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from functools import partial
from typing import Any, TypedDict

from prefect import flow, get_run_logger, tags

from configs.schema import ModelCfg, PipelineCfg
from flows.preflight import preflight_run
from flows.prune import prune_recipe
from flows.server import crash_stale_runs, owner_tags, temporary_server
from tasks.cache import results_dir, work_lock
from tasks.evaluate import paired, perplexity, zeroshot
from tasks.promote import promote
from tasks.track import track
from tasks.windows import Fingerprints

STAGES = (
    "fingerprints",
    "calibration",
    "gradients",
    "masks_from",
    "prune",
    "save",
    "ppl_dense",
    "ppl_pruned",
    "zeroshot_dense",
    "zeroshot_pruned",
    "paired",
    "track",
    "promote",
)


class Summary(TypedDict):
    """What :func:`run_pipeline` returns (see there)."""

    metrics: dict[str, Any]
    run_id: str
    model_uri: str | None
    promoted: bool
    promotion: Mapping[str, Any] | None
    model_dir: str
    stages: dict[str, dict[str, Any]]


def stage_figures(result: Mapping[str, Any], cached: bool) -> dict[str, Any]:
    """The time and peak memory a task measured (when it was computed), on how many processes, and
    whether it was cached."""
    keys = ("seconds", "peak_mem_mb", "peak_gpu_mb", "processes")
    return {**{k: result[k] for k in keys if k in result}, "cached": cached}


def _step(stages: dict[str, dict[str, Any]], name: str, task, *args) -> Any:
    """Run one task and record its figures; log our own line when its result came from the cache.

    ``wall_seconds`` is what the step cost this run (close to 0 when cached);
    ``seconds`` and ``peak_mem_mb`` are what the task measured when it was computed.
    """
    start = time.perf_counter()
    state = task(*args, return_state=True)
    result = state.result()  # re-raises the task's exception: the flow stops here
    cached = state.name == "Cached"
    stages[name] = {**stage_figures(result, cached), "wall_seconds": round(time.perf_counter() - start, 3)}
    if cached:
        get_run_logger().info("%s: cached (computed earlier in %.1f s)", name, result.get("seconds", 0.0))
    else:
        get_run_logger().info("%s: done in %.1f s", name, stages[name]["wall_seconds"])
    return result


def dense_ref(model: ModelCfg, fingerprints: Fingerprints) -> dict[str, str]:
    """The model reference of the dense model: its name and content fingerprint."""
    return {"name": model.name, "sha256": fingerprints["model"]}


@flow(name="topiary-pipeline")
def pipeline_flow(cfg: PipelineCfg) -> Summary:
    """Prune one model with one method and setting, evaluate, track and promote it.

    Args:
        cfg: a validated config with an absolute ``work_dir``.

    Returns:
        See :func:`run_pipeline`.
    """
    model, data, zs = cfg.model, cfg.data, cfg.zeroshot
    stages: dict[str, dict[str, Any]] = {}
    step = partial(_step, stages)  # as flows.prune.prune_recipe calls a step
    steps = prune_recipe(model, data, [cfg.prune], cfg.work_dir, step, zs.data_dir)
    fingerprints, pruned = steps.fingerprints, steps.prunes[0]["prune"]
    outputs = {"calibration": steps.calibration, "gradients": steps.gradients, **steps.prunes[0]}
    stages["save"] = stage_figures(pruned["save"], stages["prune"]["cached"])
    if not stages["prune"]["cached"]:  # the prune step's wall time includes the save
        stages["prune"]["wall_seconds"] = round(
            stages["prune"]["wall_seconds"] - pruned["save"]["seconds"], 3
        )
    dense = dense_ref(model, fingerprints)
    for label, target in (("dense", dense), ("pruned", pruned)):
        outputs[f"ppl_{label}"] = step(f"ppl_{label}", perplexity, target, model, data, fingerprints, label)
    for label, target in (("dense", dense), ("pruned", pruned)) if zs.enabled else ():
        name = f"zeroshot_{label}"
        outputs[name] = step(name, zeroshot, target, model, zs, fingerprints, label)
    evaluations = [outputs.get(k) for k in ("ppl_dense", "ppl_pruned", "zeroshot_dense", "zeroshot_pruned")]
    outputs["paired"] = step("paired", paired, *evaluations)
    tracked = step("track", track, cfg, outputs, f"{pruned['method']}-{pruned['setting']}")
    decision = step("promote", promote, tracked["run_id"], cfg.gate, cfg.tracking)
    return summarize(outputs, tracked, decision, stages)


def summarize(
    outputs: dict[str, Any],
    tracked: Mapping[str, Any],
    decision: Mapping[str, Any] | None,
    stages: dict[str, dict[str, Any]],
) -> Summary:
    """The figures :func:`run_pipeline` returns, from the tasks' outputs."""
    pruned, ppl_d, ppl_p = outputs["prune"], outputs["ppl_dense"], outputs["ppl_pruned"]
    zs_d, zs_p = outputs.get("zeroshot_dense"), outputs.get("zeroshot_pruned")
    metrics = {
        "method": pruned["method"],
        "setting": pruned["setting"],
        "sparsity": pruned["sparsity"],
        "seqlen": ppl_p["seqlen"],
        "ppl_dense": ppl_d["ppl"],
        "ppl_pruned": ppl_p["ppl"],
        "zeroshot_dense_mean": zs_d["mean_acc"] if zs_d else None,
        "zeroshot_pruned_mean": zs_p["mean_acc"] if zs_p else None,
        "paired": outputs.get("paired"),
    }
    return {
        "metrics": metrics,
        "run_id": tracked["run_id"],
        "model_uri": tracked.get("model_uri"),
        "promoted": bool(decision and decision["promoted"]),
        "promotion": decision,
        "model_dir": pruned["path"],
        "stages": stages,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_summary(summary: Summary) -> str:
    """The short end-of-run table: perplexity, zero-shot, sparsity, stages, MLflow run, promotion."""
    m = summary["metrics"]
    lines = [
        f"{m['method']} {m['setting']}: achieved sparsity {m['sparsity']:.4f}",
        f"{'':<22} {'dense':>10} {'pruned':>10}",
        f"{'ppl @ ' + str(m['seqlen']) + ' tokens':<22} "
        f"{_fmt(m['ppl_dense'], '10.3f')} {_fmt(m['ppl_pruned'], '10.3f')}",
        f"{'zero-shot mean acc':<22} {_fmt(m['zeroshot_dense_mean'], '10.4f')} "
        f"{_fmt(m['zeroshot_pruned_mean'], '10.4f')}",
        *paired_lines(m.get("paired")),
        "",
        f"{'stage':<16} {'time':>16} {'peak RSS':>10}",
    ]
    for name in STAGES:
        s = summary["stages"].get(name)
        if s is None:
            continue
        wall = s.get("wall_seconds", s.get("seconds", 0.0))
        if s["cached"]:
            lines.append(f"{name:<16} {f'cached ({wall:.1f} s)':>16} {'-':>10}")
            continue
        mem = f"{s['peak_mem_mb']:.0f} MB" if s.get("peak_mem_mb") is not None else "-"
        if s.get("peak_gpu_mb") is not None:
            mem += f" (GPU {s['peak_gpu_mb']:.0f} MB)"
        lines.append(f"{name:<16} {f'{wall:.1f} s':>16} {mem:>10}")
    lines += ["", f"MLflow run {summary['run_id']}", promotion_line(summary.get("promotion"))]
    return "\n".join(lines)


def paired_lines(paired: Mapping[str, Any] | None) -> list[str]:
    """The paired comparison in two lines: ppl ratio and zero-shot difference, 95% intervals."""
    if not paired:
        return []
    ppl = paired["ppl"]
    lines = [
        f"ppl ratio pruned/dense {ppl['ratio']:.3f}, 95% CI [{ppl['ratio_lo']:.3f}, {ppl['ratio_hi']:.3f}] "
        f"over {ppl['windows']} windows"
    ]
    zs = paired.get("zeroshot")
    if zs:
        m = zs["mean"]
        lines.append(
            f"zero-shot pruned-dense {m['diff']:+.2f} points, 95% CI [{m['lo']:+.2f}, {m['hi']:+.2f}] "
            f"over {m['n']} items (paired)"
        )
    return lines


def promotion_line(decision: Mapping[str, Any] | None) -> str:
    """One line on the gate's decision: promoted now, already the champion, or not, and why."""
    if not decision:
        return "not promoted: the gate did not run"
    version = f"version {decision['version']}"
    if decision["promoted"]:
        verdict = f"promoted: {version} is the new champion"
    elif decision["passed"] and decision.get("champion") == decision["version"]:
        verdict = f"not promoted again: {version} is already the champion"
    else:
        verdict = f"not promoted ({version} registered, gate failed)"
    return f"{verdict}; {decision.get('reason', '-')}"


def run_pipeline(cfg: PipelineCfg, *, echo: bool = True, checked: bool = False, wait: bool = True) -> Summary:
    """Run the pipeline flow for a validated config and print its summary table.

    Everything is checked first (:func:`flows.preflight.preflight_run`: model and its
    checkpoint, device, data, N:M widths, zero-shot tasks, tracking, work folder), before
    Prefect or any model starts. Results are persisted under ``<work_dir>/prefect-results``. The run
    holds ``<work_dir>/lock`` (a second run on the same folder waits, then reuses the
    results) and its own temporary Prefect server (:mod:`flows.server`) unless
    ``PREFECT_API_URL`` is set.

    Args:
        cfg: the pipeline config (``configs.schema.load_config``).
        echo: print the summary table at the end.
        checked: the caller ran :func:`flows.preflight.preflight_run` on ``cfg`` already
            (the CLI does, before Prefect is imported).
        wait: while another run holds the work folder, wait for it (else refuse at once).

    Returns:
        ``{"metrics": {method, setting, sparsity, seqlen, ppl_dense, ppl_pruned,
        zeroshot_dense_mean, zeroshot_pruned_mean, paired (the paired comparison: ``ppl`` and
        ``zeroshot`` with 95% intervals, see :func:`tasks.evaluate.paired`)}, "run_id",
        "model_uri", "promoted",
        "promotion" (the gate's decision, with ``reason``), "model_dir",
        "stages": {stage: {"seconds", "peak_mem_mb", "cached"}}}``; a cached stage
        reports the time it took when it was computed.
    """
    if not checked:
        preflight_run(cfg)
    work = results_dir(cfg.work_dir).parent
    logging.getLogger("modules").setLevel(logging.INFO)
    runner = pipeline_flow.with_options(result_storage=results_dir(work))
    with work_lock(work, wait), temporary_server():
        for name in crash_stale_runs():
            print(
                f"topiary: flow run {name} was left running by a killed process; marked crashed",
                file=sys.stderr,
            )
        with tags(*owner_tags()):
            summary = runner(cfg.model_copy(update={"work_dir": str(work)}))
    if echo:
        print(format_summary(summary))
    return summary
