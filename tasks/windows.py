"""Input fingerprints and the calibration step (the checks before a run: :mod:`flows.preflight`).

The calibration windows are cached by the tokenizer's fingerprint, the calibration
source's fingerprint and ``nsamples``/``seqlen``/``seed`` (see :func:`calibration_key`);
they are saved as ``<work_dir>/calibration/<key>.safetensors`` (tensor ``input_ids``).
"""

from __future__ import annotations

from pathlib import Path

from tasks.cache import (
    NO_CACHE,
    artifact_path,
    cache_key_fn,
    digest,
    dir_sha256,
    measure,
    model_fingerprint,
    save_tensors,
    stage_key,
    task,
)


@task(name="fingerprints", cache_policy=NO_CACHE)
def fingerprints(
    model_name: str, calib: str, eval_source: str, zeroshot_dir: str | None = None
) -> dict[str, str]:
    """Content fingerprints of the inputs, for cache keys; cheap, so never cached itself.

    Returns:
        ``model`` (weights + config + tokenizer), ``tokenizer``, ``calib`` and ``eval``
        (the data sources) and ``zeroshot`` (the embedded suite, a local task data folder
        and the lm-eval version).
    """
    from importlib.metadata import version

    from modules.data.windows import data_fingerprint
    from modules.evaluation.suite import SUITE_DIR

    suite = {
        "suite": dir_sha256(SUITE_DIR, ("*.yaml", "*.jsonl", "*.py")),
        "data_dir": dir_sha256(zeroshot_dir, ("*.jsonl",)) if zeroshot_dir else None,
        "lm_eval": version("lm_eval"),
    }
    return {
        **model_fingerprint(model_name),
        "calib": data_fingerprint(calib),
        "eval": data_fingerprint(eval_source),
        "zeroshot": digest(suite),
    }


def calibration_key(data: dict, prints: dict) -> str:
    """Cache key of the calibration windows: tokenizer + source + how they are drawn."""
    return stage_key(
        "calibration",
        tokenizer=prints["tokenizer"],
        source=prints["calib"],
        nsamples=data["nsamples"],
        seqlen=data["seqlen"],
        seed=data["seed"],
    )


def _calibration_file(parameters: dict, key: str) -> Path:
    return artifact_path(parameters["work_dir"], "calibration", key, ".safetensors")


@task(
    name="calibration",
    cache_key_fn=cache_key_fn(calibration_key, _calibration_file),
    persist_result=True,
)
def calibration(model_name: str, data: dict, prints: dict, work_dir: str) -> dict:
    """Draw the calibration windows and save them; return ``{"path", "sha256", "shape", ...}``.

    Args:
        model_name: the model whose tokenizer (and context length) applies.
        data: the ``data`` config section (``calib``, ``nsamples``, ``seqlen``, ``seed``).
        prints: :func:`fingerprints` of the run.
        work_dir: the run's work folder.
    """
    from transformers import AutoConfig

    from modules.data.windows import calibration_windows
    from modules.engine.models import load_tokenizer
    from modules.engine.names import resolve_model

    with measure() as figures:
        path = resolve_model(model_name)
        tokenizer = load_tokenizer(path)
        context = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        ids = calibration_windows(
            data["calib"], tokenizer, data["nsamples"], data["seqlen"], data["seed"], max_context=context
        )
        key = calibration_key(data, prints)
        ref = save_tensors({"input_ids": ids}, _calibration_file({"work_dir": work_dir}, key))
    return {**ref, "shape": list(ids.shape), "key": key, **figures}


def load_calibration(ref: dict):
    """The calibration windows of a :func:`calibration` result (LongTensor ``(n, seqlen)``)."""
    from safetensors.torch import load_file

    return load_file(ref["path"])["input_ids"]


def _inputs_file(parameters: dict, key: str) -> Path:
    return Path(parameters["job"]["folder"]) / "acts" / "inputs-0000.safetensors"


def _capture_key(job: dict) -> str:
    return stage_key("capture", job={k: v for k, v in job.items() if k not in ("device", "activations")})


@task(name="capture", cache_key_fn=cache_key_fn(_capture_key, _inputs_file), persist_result=True)
def capture(job: dict, calib_path: str, work_dir: str) -> dict:
    """The first decoder block's inputs for the calibration windows (the embeddings only run)."""
    from modules.engine.job import Job
    from modules.engine.stages import capture as run

    return run(Job.from_json(job), calib_path)
