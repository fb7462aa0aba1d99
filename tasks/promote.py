"""The promotion stage: the gate applied to a tracked run, as a Prefect task.

Never cached: the gate compares with the registry's *current* champion, which other runs
may have changed since; re-applying it to the same run re-uses that run's model version.
The gate itself and the registry code are :mod:`tracking.registry`.
"""

from __future__ import annotations

from configs.schema import GateCfg, TrackingCfg
from tasks.cache import NO_CACHE, measure, task
from tracking.registry import promote as apply_gate
from tracking.runs import end_stale_runs


@task(name="promote", cache_policy=NO_CACHE)
def promote(run_id: str, gate: GateCfg, tracking: TrackingCfg) -> dict:
    """Apply the promotion gate to an evaluated, tracked run (see :func:`tracking.registry.promote`).

    Returns:
        The decision (``passed``, ``promoted``, ``version``, ``champion``, ``reasons``...)
        plus ``reason`` (one line) and ``seconds``/``peak_mem_mb``.
    """
    with measure() as figures:
        end_stale_runs(tracking)  # also when ``track`` came from the cache
        decision = apply_gate(run_id, gate, tracking)
    failed = [r for r in decision["reasons"] if r.startswith("fail:")]
    decision["reason"] = "; ".join(failed or decision["reasons"]) or (
        "passed" if decision["passed"] else "failed"
    )
    return {**decision, **figures}
