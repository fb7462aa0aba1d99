"""The masks stage: one decoder block's keep-masks (a selecting method's, or an update's selector's).

Not cached, like every per-block task (:mod:`tasks.statistics`); the masks go to
``<run folder>/masks/<block>-<group>.safetensors``.
"""

from __future__ import annotations

from modules.engine.request import Job
from tasks.cache import NO_CACHE, task


@task(name="masks", task_run_name="block-{index}-masks", cache_policy=NO_CACHE)
def masks(
    job: Job,
    index: int,
    group: int,
    stats: str | None,
    linears: list[str],
    pruned: list[str],
    grads_dir: str | None,
    rate: float | None,
    work_dir: str,
) -> dict:
    """Keep-masks of block ``index``'s linears of ``group`` (:func:`modules.engine.weight_stages.masks`)."""
    # The engine (torch with lightning and transformers) loads when a step computes: a run whose
    # steps are all cached never imports it.
    from modules.engine import weight_stages

    return weight_stages.masks(job, index, group, stats, linears, pruned, grads_dir, rate)
