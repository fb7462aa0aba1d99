"""The masks stage: one decoder block's keep-masks (a selecting method's, or an update's selector's).

Cached by the run's key, the block and the statistics group (:func:`tasks.statistics.block_key`);
the masks go to ``<run folder>/masks/<block>-<group>.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

from tasks.cache import cache_key_fn, task
from tasks.statistics import block_key


def _masks_file(parameters: dict, key: str) -> Path:
    return (
        Path(parameters["job"]["folder"])
        / "masks"
        / f"{parameters['index']:04d}-{parameters['stage']}.safetensors"
    )


@task(
    name="masks",
    task_run_name="block-{index}-masks",
    cache_key_fn=cache_key_fn(block_key("masks"), _masks_file),
    persist_result=True,
)
def masks(
    job: dict,
    index: int,
    stage: int,
    stats: str | None,
    linears: list[str],
    pruned: list[str],
    grads_dir: str | None,
    rate: float | None,
    work_dir: str,
) -> dict:
    """Keep-masks of block ``index``'s group ``stage`` (:func:`modules.engine.weight_stages.masks`)."""
    from modules.engine.job import Job
    from modules.engine.weight_stages import masks as run

    return run(Job.from_json(job), index, stage, stats, linears, pruned, grads_dir, rate)
