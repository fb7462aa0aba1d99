"""Input fingerprints and the calibration step (the checks before a run: :mod:`flows.preflight`).

The calibration windows are cached by the tokenizer's fingerprint, the calibration
source's fingerprint and ``nsamples``/``seqlen``/``seed`` (see :func:`calibration_key`);
they are saved as ``<work_dir>/calibration/<key>.safetensors`` (tensor ``input_ids``).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from safetensors.torch import load_file
from typing_extensions import TypedDict  # pydantic reads it on Python 3.11

from configs.schema import DataCfg
from modules.data.windows import calibration_windows, data_fingerprint
from modules.engine.names import resolve_model
from modules.engine.request import Job
from modules.evaluation.suite import SUITE_DIR
from tasks.cache import (
    NO_CACHE,
    Artifact,
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


class Fingerprints(TypedDict):
    """Content fingerprints of a run's inputs (:func:`fingerprints`), what the cache keys hold."""

    model: str  # weights + config + tokenizer
    tokenizer: str
    calib: str  # the calibration source
    eval: str  # the evaluation source
    zeroshot: str  # the embedded suite, a local task data folder and the lm-eval version


class Calibration(Artifact, total=False):
    """The :func:`calibration` step's result: its windows' file, their shape, key and figures."""

    shape: list[int]
    key: str
    seconds: float
    peak_mem_mb: float


@task(name="fingerprints", cache_policy=NO_CACHE)
def fingerprints(
    model_name: str, calib: str, eval_source: str, zeroshot_dir: str | None = None
) -> Fingerprints:
    """Content fingerprints of the inputs, for cache keys; cheap, so never cached itself."""
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


def calibration_key(data: DataCfg, fingerprints: Fingerprints) -> str:
    """Cache key of the calibration windows: tokenizer + source + how they are drawn."""
    return stage_key(
        "calibration",
        tokenizer=fingerprints["tokenizer"],
        source=fingerprints["calib"],
        nsamples=data.nsamples,
        seqlen=data.seqlen,
        seed=data.seed,
    )


def calibration_file(key: str, work_dir: str) -> Path:
    """Where the calibration windows of ``key`` are saved."""
    return artifact_path(work_dir, "calibration", key, ".safetensors")


@task(
    name="calibration",
    cache_key_fn=cache_key_fn(calibration_key, calibration_file),
    persist_result=True,
)
def calibration(model_name: str, data: DataCfg, fingerprints: Fingerprints, work_dir: str) -> Calibration:
    """Draw the calibration windows and save them.

    Args:
        model_name: the model whose tokenizer (and context length) applies.
        data: the ``data`` config section (``calib``, ``nsamples``, ``seqlen``, ``seed``).
        fingerprints: :func:`fingerprints` of the run.
        work_dir: the run's work folder.
    """
    from transformers import AutoConfig  # the engine's companions: see capture

    from modules.engine.models import load_tokenizer

    with measure() as figures:
        path = resolve_model(model_name)
        tokenizer = load_tokenizer(path)
        context = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        ids = calibration_windows(
            data.calib, tokenizer, data.nsamples, data.seqlen, data.seed, max_context=context
        )
        key = calibration_key(data, fingerprints)
        ref = save_tensors({"input_ids": ids}, calibration_file(key, work_dir))
    return {**ref, "shape": list(ids.shape), "key": key, **figures}


def load_calibration(ref: Artifact):
    """The calibration windows of a :func:`calibration` result (LongTensor ``(n, seqlen)``)."""
    return load_file(ref["path"])["input_ids"]


@task(name="capture", cache_policy=NO_CACHE)  # per-block: see tasks.statistics
def capture(job: Job, calib_path: str, work_dir: str) -> dict:
    """The first decoder block's inputs for the calibration windows (the embeddings only run)."""
    # The engine (torch with lightning and transformers) loads when a step computes: a run whose
    # steps are all cached never imports it.
    from modules.engine import stages

    return stages.capture(job, calib_path)
