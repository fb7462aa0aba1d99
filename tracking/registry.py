"""Model-registry promotion: register a run's pruned model, gate it, move ``champion``.

The gate (:func:`gate_decision`) is a pure function of the figures; :func:`promote` reads
them back from the run, registers (or re-uses) the run's model version, tags the version
and the run with the decision, and moves the alias only when every check passes.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from configs.schema import GateCfg, TrackingCfg
from modules.errors import TopiaryError
from modules.process import pause_point
from modules.provenance import summary as provenance_summary
from tracking.runs import MODEL_ID_TAG, client, fluent_uri, get_run, load_run_config, run_provenance

# mlflow and transformers load inside the functions that use them (see tracking.runs).

CHAMPION = "champion"
_PPL_RE = re.compile(r"^ppl_pruned_w(\d+)$")
_EPS = 1e-9  # a figure exactly on a limit passes despite float rounding (0.5 - 0.4 = 0.10000000000000003)


@dataclass(frozen=True)
class RunFigures:
    """What a run logged that the gate and the registry read (:func:`run_figures`); None where
    it logged nothing. Its fields, those not None, are also the tags of the run's version."""

    window: int | None = None
    """The perplexity window length the figures are at."""
    ppl: float | None = None
    """The pruned model's perplexity."""
    ppl_dense: float | None = None
    zeroshot_mean: float | None = None
    """The pruned model's zero-shot mean accuracy (a fraction); None: zero-shot disabled."""
    zeroshot_mean_dense: float | None = None
    ppl_ratio_lo95: float | None = None
    """95% paired bootstrap interval of pruned / dense perplexity."""
    ppl_ratio_hi95: float | None = None
    ppl_windows: int | None = None
    zeroshot_diff_lo95: float | None = None
    """95% interval of pruned - dense zero-shot mean, in points."""
    zeroshot_diff_hi95: float | None = None
    zeroshot_items: int | None = None
    sparsity: float | None = None
    method: str | None = None
    setting: str | None = None


@dataclass(frozen=True)
class Champion:
    """The registered model's current champion: its version and its run's figures."""

    version: int
    figures: RunFigures
    run_id: str | None = None
    is_candidate: bool = False
    """The candidate of this gate already is the champion (a re-applied gate)."""


def gate_decision(figures: RunFigures, champion: Champion | None, gate: GateCfg) -> tuple[bool, list[str]]:
    """Decide whether a pruned model may become champion.

    Args:
        figures: the candidate's: ``ppl`` against ``ppl_dense``, ``zeroshot_mean`` against
            ``zeroshot_mean_dense`` (``zeroshot_mean`` None means zero-shot was disabled and
            its check is skipped) and, for ``gate.rule == "interval"``, the paired 95%
            intervals (``ppl_ratio_lo95``/``_hi95``, ``ppl_windows``,
            ``zeroshot_diff_lo95``/``_hi95``, ``zeroshot_items``).
        champion: the current champion, or None when there is none.
        gate: thresholds; zero-shot means are fractions, ``max_zeroshot_drop`` is in
            percentage points. ``rule`` ``point`` limits the point figures, ``interval`` the
            upper bounds of the intervals (a missing interval fails the check).

    Returns:
        ``(passed, reasons)``: one line per check, starting with ``pass:``, ``fail:`` or
        ``skip:``; passed when no line is a ``fail:``.
    """
    checks: list[tuple[bool | None, str]] = []
    interval = gate.rule == "interval"
    ppl, dense_ppl = float(figures.ppl), float(figures.ppl_dense)
    limit = gate.max_ppl_ratio * dense_ppl
    if interval:
        checks.append(_ppl_interval_check(figures, ppl / dense_ppl, gate))
    else:
        ok = ppl <= limit * (1 + _EPS)
        sign = "<=" if ok else ">"
        checks.append(
            (ok, f"ppl {ppl:.4g} {sign} {gate.max_ppl_ratio:g} x dense {dense_ppl:.4g} = {limit:.4g}")
        )
    zs, dense_zs = figures.zeroshot_mean, figures.zeroshot_mean_dense
    if zs is None:
        checks.append((None, "zero-shot disabled, drop check skipped"))
    elif dense_zs is None:
        checks.append((False, "zero-shot mean measured but no dense zero-shot mean to compare"))
    elif interval:
        checks.append(_zeroshot_interval_check(figures, 100.0 * (float(dense_zs) - float(zs)), gate))
    else:
        drop = 100.0 * (float(dense_zs) - float(zs))
        ok = drop <= gate.max_zeroshot_drop + _EPS
        checks.append(
            (
                ok,
                f"zero-shot mean {zs:.4f} is {drop:.2f} points below dense {dense_zs:.4f} "
                f"({'within' if ok else 'more than'} {gate.max_zeroshot_drop:g})",
            )
        )
    checks.append(_champion_check(figures, champion, gate))
    reasons = [f"{'skip' if ok is None else 'pass' if ok else 'fail'}: {text}" for ok, text in checks]
    return all(ok is not False for ok, _ in checks), reasons


def _ppl_interval_check(figures: RunFigures, ratio: float, gate: GateCfg) -> tuple[bool, str]:
    """The ppl rule on the interval: the upper 95% bound of pruned/dense at most the limit."""
    lo, hi = figures.ppl_ratio_lo95, figures.ppl_ratio_hi95
    if lo is None or hi is None:
        return False, "rule interval: no 95% interval of the ppl ratio was logged (ppl_ratio_w<L>_hi95)"
    ok = float(hi) <= gate.max_ppl_ratio * (1 + _EPS)
    return ok, (
        f"ppl ratio {ratio:.4g}, 95% CI [{lo:.4g}, {hi:.4g}] over {_count(figures.ppl_windows)} "
        f"windows: upper bound {'<=' if ok else '>'} {gate.max_ppl_ratio:g}"
    )


def _zeroshot_interval_check(figures: RunFigures, drop: float, gate: GateCfg) -> tuple[bool, str]:
    """The zero-shot rule on the interval: the drop's upper 95% bound at most the limit.

    The logged interval is of pruned - dense (points), so the drop's bounds are its negated
    bounds, swapped: the drop's upper bound is minus the difference's lower bound.
    """
    lo, hi = figures.zeroshot_diff_lo95, figures.zeroshot_diff_hi95
    if lo is None or hi is None:
        return False, "rule interval: no 95% interval of the zero-shot difference was logged"
    drop_lo, drop_hi = -float(hi), -float(lo)
    ok = drop_hi <= gate.max_zeroshot_drop + _EPS
    return ok, (
        f"zero-shot mean drop {drop:.2f} points, 95% CI [{drop_lo:.2f}, {drop_hi:.2f}] over "
        f"{_count(figures.zeroshot_items)} items: upper bound "
        f"{'within' if ok else 'more than'} {gate.max_zeroshot_drop:g}"
    )


def _count(value: Any) -> str:
    return "?" if value is None else str(int(value))


def _champion_check(figures: RunFigures, champion: Champion | None, gate: GateCfg) -> tuple[bool | None, str]:
    key = gate.primary_metric
    if not gate.beat_champion:
        return None, "beat_champion is off, no comparison with the champion"
    if champion is None:
        return None, "no champion yet"
    if champion.is_candidate:
        return None, f"already the champion (v{champion.version})"
    mine, theirs = getattr(figures, key), getattr(champion.figures, key)
    if mine is None:
        why = "zero-shot disabled" if key == "zeroshot_mean" else "not measured"
        return False, f"primary metric {key} unavailable for this run ({why}), cannot beat the champion"
    if theirs is None:
        return False, f"champion v{champion.version} has no {key} to compare"
    better = float(mine) < float(theirs) if key == "ppl" else float(mine) > float(theirs)
    word = ("lower" if key == "ppl" else "higher") if better else "not better"
    return better, f"{key} {mine:.4g} {word} than champion v{champion.version} ({theirs:.4g})"


def run_figures(run, window: int | None = None) -> RunFigures:
    """The gate's figures of a run, read from its metrics, params and tags.

    The perplexity window is ``window`` when given, else the run's ``data.eval_seqlen``
    when it was logged at that length, else the largest logged.
    """
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    windows = sorted(int(m.group(1)) for m in map(_PPL_RE.match, metrics) if m)
    if window is None and windows:
        wanted = params.get("data.eval_seqlen", "")
        window = int(wanted) if wanted.isdigit() and int(wanted) in windows else windows[-1]
    return RunFigures(
        window=window,
        ppl=metrics.get(f"ppl_pruned_w{window}"),
        ppl_dense=metrics.get(f"ppl_dense_w{window}"),
        zeroshot_mean=metrics.get("zeroshot_pruned_mean"),
        zeroshot_mean_dense=metrics.get("zeroshot_dense_mean"),
        ppl_ratio_lo95=metrics.get(f"ppl_ratio_w{window}_lo95"),
        ppl_ratio_hi95=metrics.get(f"ppl_ratio_w{window}_hi95"),
        ppl_windows=_int(metrics.get(f"ppl_windows_w{window}")),
        zeroshot_diff_lo95=metrics.get("zeroshot_diff_mean_lo95"),
        zeroshot_diff_hi95=metrics.get("zeroshot_diff_mean_hi95"),
        zeroshot_items=_int(metrics.get("zeroshot_paired_items")),
        sparsity=metrics.get("sparsity"),
        method=params.get("prune.method", tags.get("topiary.method")),
        setting=tags.get("topiary.setting"),
    )


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def interval_tags(figures: RunFigures) -> dict[str, str]:
    """Readable registry tags of the intervals: ``ppl_ratio_ci95`` and ``zeroshot_drop_ci95``.

    The zero-shot one is of the drop (dense - pruned, points), the figure the gate limits.
    """
    tags = {}
    if figures.ppl_ratio_lo95 is not None and figures.ppl_ratio_hi95 is not None:
        tags["ppl_ratio_ci95"] = f"[{figures.ppl_ratio_lo95:.4f}, {figures.ppl_ratio_hi95:.4f}]"
    if figures.zeroshot_diff_lo95 is not None and figures.zeroshot_diff_hi95 is not None:
        lo, hi = -figures.zeroshot_diff_hi95, -figures.zeroshot_diff_lo95
        tags["zeroshot_drop_ci95"] = f"[{lo:.2f}, {hi:.2f}]"
    return tags


def _check_evaluated(run, figures: RunFigures) -> None:
    run_id, status = run.info.run_id, run.info.status
    if status in ("FAILED", "KILLED"):
        raise TopiaryError(f"run {run_id}: status {status}; a failed run is never registered")
    if figures.ppl is None:
        raise TopiaryError(
            f"run {run_id}: no pruned perplexity metric (ppl_pruned_w<L>); it stopped before "
            "evaluation and is never registered"
        )
    if figures.ppl_dense is None:
        raise TopiaryError(f"run {run_id}: no ppl_dense_w{figures.window} metric to gate against")
    if run.data.params.get("zeroshot.enabled") == "True" and figures.zeroshot_mean is None:
        raise TopiaryError(
            f"run {run_id}: zero-shot is enabled but no zeroshot_pruned_mean metric was logged; "
            "its evaluation did not finish"
        )
    if MODEL_ID_TAG not in run.data.tags:
        raise TopiaryError(f"run {run_id}: no logged model (tag {MODEL_ID_TAG}); call log_model first")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def _version_for_run(mc, tracking: TrackingCfg, name: str, run_id: str, model_id: str):
    """The run's existing version (a re-applied gate), else a new one."""
    from mlflow.exceptions import MlflowException

    found = mc.search_model_versions(f"name = {_quote(name)} and run_id = {_quote(run_id)}")
    if found:
        return max(found, key=lambda v: int(v.version))
    try:
        mc.create_registered_model(name, description="Pruned models registered by Topiary")
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    # A local registry resolves the ``models:/`` source through the global client (MLflow 3.17).
    with fluent_uri(tracking):
        return mc.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)


def _champion(mc, name: str, window: int | None) -> Champion | None:
    from mlflow.exceptions import MlflowException

    try:
        version = mc.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        # No registered model yet, or one without a champion (every version failed the
        # gate, or a promotion was killed between registering and moving the alias).
        if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    figures = RunFigures()
    if version.run_id:
        try:
            figures = run_figures(mc.get_run(version.run_id), window)
        except MlflowException:
            pass  # the champion's run was deleted: nothing to compare with
    return Champion(int(version.version), figures, version.run_id)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def promote(run_id: str, gate: GateCfg | None = None, tracking: TrackingCfg | None = None) -> dict:
    """Register a run's pruned model and make it champion if it passes the gate.

    A run that failed or stopped before evaluation is refused with a
    :class:`~modules.errors.TopiaryError`, and nothing is registered. Re-applying the gate
    to a run re-uses its version. A failing version keeps (never takes) the alias.

    Args:
        run_id: the MLflow run of a pipeline run (model logged, results logged).
        gate: thresholds; None reads the run's own ``config.yaml``.
        tracking: where the run and the registry live; None uses the default store and
            the registered model name of the run's config.

    Returns:
        The decision: ``run_id``, ``model``, ``version``, ``passed``, ``promoted`` (the
        alias moved now), ``champion`` (version after), ``previous_champion``,
        ``reasons`` and the ``figures`` it was judged on. The same is tagged on the
        version (``gate``, ``gate_reason``, figures) and the run (``topiary.gate*``).
    """
    run = get_run(run_id, tracking or TrackingCfg())
    figures = run_figures(run)
    _check_evaluated(run, figures)
    if gate is None or tracking is None:
        cfg = load_run_config(run_id, tracking or TrackingCfg())
        gate = gate or cfg.gate
        tracking = tracking or cfg.tracking.model_copy(update={"uri": TrackingCfg().uri})
    name, mc = tracking.registered_model, client(tracking)
    champion = _champion(mc, name, figures.window)
    version = _version_for_run(mc, tracking, name, run_id, run.data.tags[MODEL_ID_TAG])
    pause_point("promote")  # test hook: the version is registered, the gate not yet applied
    number = int(version.version)
    if champion is not None and champion.version == number:
        champion = replace(champion, is_candidate=True)
    passed, reasons = gate_decision(figures, champion, gate)
    failed = [r for r in reasons if r.startswith("fail:")]
    reason = "; ".join(failed if failed else reasons)
    tags = {"gate": "passed" if passed else "failed", "gate_reason": reason, "run_id": run_id}
    tags.update({k: _fmt(v) for k, v in asdict(figures).items() if v is not None})
    tags.update(interval_tags(figures))
    for key, value in tags.items():
        mc.set_model_version_tag(name, str(number), key, value)
    previous = champion.version if champion else None
    promoted = passed and previous != number
    if promoted:
        mc.set_registered_model_alias(name, CHAMPION, str(number))
    run_tags = {
        "topiary.gate": tags["gate"],
        "topiary.gate_reason": reason,
        "topiary.registered_model": name,
        "topiary.model_version": str(number),
        "topiary.promoted": str(promoted).lower(),
    }
    for key, value in run_tags.items():
        mc.set_tag(run_id, key, value)
    return {
        "run_id": run_id,
        "model": name,
        "version": number,
        "passed": passed,
        "promoted": promoted,
        "champion": number if promoted else previous,
        "previous_champion": previous,
        "reasons": reasons,
        "figures": asdict(figures),
    }


def registry_table(name: str, tracking: TrackingCfg) -> list[dict]:
    """Every version of registered model ``name`` with its figures, oldest first.

    Returns:
        One dict per version: ``model``, ``version``, ``champion`` (bool), ``aliases``,
        ``run_id``, ``method``, ``setting``, ``sparsity``, ``window``, ``ppl``,
        ``ppl_dense``, ``zeroshot_mean``, ``zeroshot_mean_dense``, ``gate``,
        ``gate_reason``, ``created`` (ms since the epoch), ``provenance`` (what produced the
        figures: :func:`tracking.runs.run_provenance`). Empty when ``name`` is unknown.
    """
    from mlflow.exceptions import MlflowException

    mc = client(tracking)
    try:
        registered = mc.get_registered_model(name)
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    by_version: dict[int, list[str]] = {}
    for alias, number in (registered.aliases or {}).items():  # search results carry no aliases
        by_version.setdefault(int(number), []).append(alias)
    rows = []
    for v in sorted(mc.search_model_versions(f"name = {_quote(name)}"), key=lambda v: int(v.version)):
        figures, record = RunFigures(), {}
        if v.run_id:
            try:
                run = mc.get_run(v.run_id)
                figures, record = run_figures(run), run_provenance(run)
            except MlflowException:
                pass  # run deleted; the version's tags still say what the gate saw
        aliases = sorted(by_version.get(int(v.version), []))
        rows.append(
            {
                "model": name,
                "version": int(v.version),
                "champion": CHAMPION in aliases,
                "aliases": aliases,
                "run_id": v.run_id,
                **asdict(figures),
                "gate": v.tags.get("gate"),
                "gate_reason": v.tags.get("gate_reason"),
                "created": v.creation_timestamp,
                "provenance": record,
            }
        )
    return rows


def format_registry(rows: list[dict]) -> str:
    """Render :func:`registry_table` rows as a plain-text table, champion marked ``*``.

    Under the table, one line per version says what produced its figures (provenance).
    """
    if not rows:
        return "no registered versions"

    def num(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = ["", "version", "method", "setting", "sparsity", "ppl", "dense ppl", "zs mean", "gate", "run"]
    body = [
        [
            "*" if r["champion"] else "",
            str(r["version"]),
            r["method"] or "-",
            r["setting"] or "-",
            num(r["sparsity"], ".4f"),
            num(r["ppl"], ".3f") + (f" @{r['window']}" if r["ppl"] is not None and r["window"] else ""),
            num(r["ppl_dense"], ".3f"),
            num(r["zeroshot_mean"], ".4f"),
            r["gate"] or "-",
            (r["run_id"] or "-")[:12],
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [f"registered model {rows[0]['model']} (* = {CHAMPION})"]
    for line in [header, *body]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    lines.append("produced by:")
    for r in rows:
        lines.append(f"  v{r['version']}: {provenance_summary(r.get('provenance') or {})}")
    return "\n".join(lines)


def load_champion(tracking: TrackingCfg, alias: str = CHAMPION) -> dict:
    """Load ``models:/<registered_model>@<alias>`` as transformers components.

    Returns:
        ``{"model", "tokenizer", "task", ...}`` as ``mlflow.transformers.load_model`` gives.
    """
    import mlflow

    from modules.engine.models import LOAD_LOCK

    with fluent_uri(tracking), LOAD_LOCK:
        return mlflow.transformers.load_model(
            f"models:/{tracking.registered_model}@{alias}", return_type="components"
        )
