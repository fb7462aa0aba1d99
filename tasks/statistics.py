"""GBLM's gradient step as a cached task.

Cached by the dense model's fingerprint, its dtype and the calibration windows' hash
(:func:`gradients_key`); written to ``<work_dir>/gradients/<key>/block_{i:04d}.safetensors``
by :func:`modules.engine.gradients.compute_gradients` (into a temporary folder, then renamed).
The prune step reads that folder block by block.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from tasks.cache import artifact_path, building, cache_key_fn, dir_sha256, measure, stage_key


def needs_gradients(prune: dict) -> bool:
    """Whether a ``prune`` config section needs the gradient step (the method's own rule)."""
    from modules.pruning.registry import get_method

    return "grad" in get_method(prune["method"]).statistics(prune.get("options", {}))


def gradients_key(model: dict, prints: dict, calib: dict) -> str:
    """Cache key of the gradients: the dense model, its dtype and the calibration windows."""
    return stage_key("gradients", model=prints["model"], dtype=model["dtype"], calib=calib["sha256"])


def _gradients_dir(parameters: dict, key: str) -> Path:
    return artifact_path(parameters["work_dir"], "gradients", key)


@task(
    name="gradients",
    cache_key_fn=cache_key_fn(gradients_key, _gradients_dir),
    persist_result=True,
)
def gradients(model: dict, prints: dict, calib: dict, work_dir: str) -> dict:
    """Compute GBLM's per-weight gradient aggregates of the dense model on the calibration windows.

    Args:
        model: the ``model`` config section (``name``, ``dtype``, ``device``).
        prints: the run's fingerprints (``tasks.windows.fingerprints``).
        calib: the result of ``tasks.windows.calibration``.
        work_dir: the run's work folder.

    Returns:
        ``{"path": folder, "sha256", "key", "seconds", "peak_mem_mb"}``.
    """
    from modules.engine.gradients import compute_gradients
    from modules.engine.models import load_model
    from tasks.windows import load_calibration

    key = gradients_key(model, prints, calib)
    final = _gradients_dir({"work_dir": work_dir}, key)
    with measure() as figures:
        net, _ = load_model(model["name"], model["dtype"], model["device"])
        with building(final) as tmp:
            compute_gradients(net, load_calibration(calib), tmp)
    return {"path": str(final), "sha256": dir_sha256(final), "key": key, **figures}
