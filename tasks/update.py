"""The prune-and-save step: block-sequential pruning, then the pruned model on disk.

Inside one task, :func:`modules.engine.driver.prune_model` runs statistics -> masks -> (weight
update) per decoder block; the pruned model is then saved with ``save_pretrained``
(safetensors), its tokenizer, its keep-masks (``masks/block_{i:04d}.safetensors``, keyed
by parameter name, readable back with ``selector=mask``) and ``pruning_report.json``,
all in a temporary folder renamed into place when complete.

Cache key (:func:`prune_key`): the dense model's fingerprint and dtype, the whole
``prune`` section, the calibration windows' hash and, for GBLM, the gradients' hash.
The folder is ``<work_dir>/models/<method>-<setting>-<key>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from tasks.cache import (
    building,
    cache_key_fn,
    dir_sha256,
    measure,
    ref_hash,
    stage_key,
)

REPORT = "pruning_report.json"
MASKS = "masks"
WEIGHT_FILES = ("model*.safetensors", "config.json")


def plan_from_config(prune: dict):
    """The :class:`modules.engine.driver.PrunePlan` of a ``prune`` config section."""
    from modules.engine.driver import PrunePlan
    from modules.pruning.sparsity import parse_spec

    return PrunePlan(
        method=prune["method"],
        spec=parse_spec(prune.get("sparsity"), prune.get("pattern")),
        options=dict(prune.get("options") or {}),
        true_sequential=bool(prune.get("true_sequential", False)),
        owl=bool(prune.get("owl", False)),
        report_error=bool(prune.get("report_error", False)),
    )


def prune_and_save(
    net, tokenizer, input_ids, prune: dict, out_dir: Path, grads_dir: str | None = None
) -> dict:
    """Prune ``net`` in place and save it (weights, tokenizer, masks, report) to ``out_dir``.

    Everything is written to a temporary sibling folder first and renamed at the end,
    so ``out_dir`` is either absent, the previous result, or complete.

    Returns:
        The :class:`modules.engine.report.PruneReport`, with its ``phases``: ``seconds`` and
        ``peak_mem_mb`` of the prune and of the save.
    """
    from modules.engine.driver import prune_model
    from modules.process import pause_point, write_file

    with building(Path(out_dir)) as tmp:
        with measure() as pruning:
            report = prune_model(
                net, input_ids, plan_from_config(prune), grads_dir=grads_dir, mask_dir=tmp / MASKS
            )
            pause_point("prune")  # test hook: masks written, weights not yet saved
        with measure() as saving:
            net.save_pretrained(tmp, safe_serialization=True)
            pause_point("save")  # test hook: weights written, tokenizer and report not yet
            tokenizer.save_pretrained(tmp)
            _match_modes(tmp)
            report.phases = {"prune": pruning}
            write_file(tmp / REPORT, json.dumps(report.to_dict(), indent=2))
    report.phases["save"] = saving
    return report


def _match_modes(folder: Path) -> None:
    """Give the weight files ``config.json``'s mode: ``save_pretrained`` writes them 0600 (through
    a private temporary file), their siblings get the umask's mode (0644 usually)."""
    mode = (Path(folder) / "config.json").stat().st_mode & 0o777
    for weights in Path(folder).glob("model*.safetensors"):
        weights.chmod(mode)


def prune_key(model: dict, prune: dict, prints: dict, calib: dict, grads: dict | None = None) -> str:
    """Cache key of the pruned model: dense model + dtype, prune config, calibration, gradients."""
    return stage_key(
        "prune",
        model=prints["model"],
        dtype=model["dtype"],
        prune=prune,
        calib=calib["sha256"],
        grads=ref_hash(grads),
    )


def _folder_name(prune: dict, key: str) -> str:
    from modules.pruning.sparsity import parse_spec

    setting = str(parse_spec(prune.get("sparsity"), prune.get("pattern"))).replace(":", "of")
    return f"{prune['method']}-{setting}-{key[:12]}"


def _model_dir(parameters: dict, key: str) -> Path:
    return Path(parameters["work_dir"]).resolve() / "models" / _folder_name(parameters["prune"], key)


@task(
    name="prune",
    task_run_name="prune-{prune[method]}",
    cache_key_fn=cache_key_fn(prune_key, _model_dir),
    persist_result=True,
)
def prune(model: dict, prune: dict, prints: dict, calib: dict, grads: dict | None, work_dir: str) -> dict:
    """Load the dense model, prune it block by block and save it with its masks and report.

    Args:
        model: the ``model`` config section (``name``, ``dtype``, ``device``).
        prune: the ``prune`` config section.
        prints: the run's fingerprints (``tasks.windows.fingerprints``).
        calib: the result of ``tasks.windows.calibration``.
        grads: the result of ``tasks.statistics.gradients`` (GBLM), else None.
        work_dir: the run's work folder.

    Returns:
        ``{"name"/"path": model folder, "sha256" (weights), "report": report file,
        "sparsity", "method", "setting", "key", "seconds", "peak_mem_mb", "save": {...}}``;
        ``name`` and ``sha256`` make it a model reference for the evaluation tasks.
    """
    from modules.engine.models import load_model
    from tasks.windows import load_calibration

    key = prune_key(model, prune, prints, calib, grads)
    out = _model_dir({"work_dir": work_dir, "prune": prune}, key)
    with measure() as figures:
        net, tokenizer = load_model(model["name"], model["dtype"], model["device"])
        report = prune_and_save(
            net, tokenizer, load_calibration(calib), prune, out, grads_dir=grads and grads["path"]
        )
        del net
    save = report.phases["save"]
    figures["seconds"] = round(figures["seconds"] - save["seconds"], 3)
    return {
        "name": str(out),
        "path": str(out),
        "sha256": dir_sha256(out, WEIGHT_FILES),
        "report": str(out / REPORT),
        "sparsity": report.sparsity,
        "method": report.method,
        "setting": report.setting,
        "key": key,
        **figures,
        "save": save,
    }


def prune_to_dir(
    model: str,
    method: str,
    sparsity: float | None,
    pattern: str | None,
    calib: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    owl: bool,
    options: dict,
    output: Path,
    dtype: str = "float32",
    device: str = "auto",
    report_error: bool = False,
    true_sequential: bool = False,
):
    """Prune a model one-shot and save it to ``output``, in this process, without Prefect.

    Used by ``topiary prune``. Runs the gradient step first when the method needs it
    (into a temporary folder). An existing ``output`` is replaced only if it is empty or
    a previous Topiary output (holds ``pruning_report.json``).

    Returns:
        The :class:`modules.engine.report.PruneReport` (also written to ``output/pruning_report.json``).
    """
    import tempfile

    from modules.data.windows import calibration_windows
    from modules.engine.models import load_model
    from modules.errors import TopiaryError
    from modules.process import grads_prefix, remove_stale
    from tasks.statistics import needs_gradients

    output = Path(output)
    remove_stale([output.parent], tmp_dir=Path(tempfile.gettempdir()))  # what killed runs left
    if output.exists() and (
        not output.is_dir() or (any(output.iterdir()) and not (output / REPORT).is_file())
    ):
        raise TopiaryError(
            f"output: {output} exists and is not a previous Topiary output; choose another path"
        )
    section = {
        "method": method,
        "sparsity": sparsity,
        "pattern": pattern,
        "options": dict(options or {}),
        "owl": owl,
        "true_sequential": true_sequential,
        "report_error": report_error,
    }
    plan_from_config(section)  # bad method/sparsity/pattern fail here, before the model loads
    net, tokenizer = load_model(model, dtype, device)
    context = getattr(net.config, "max_position_embeddings", None)
    ids = calibration_windows(calib, tokenizer, nsamples, seqlen, seed, max_context=context)
    with tempfile.TemporaryDirectory(prefix=grads_prefix()) as grads:
        if needs_gradients(section):
            from modules.engine.gradients import compute_gradients

            compute_gradients(net, ids, grads)
        return prune_and_save(net, tokenizer, ids, section, output, grads_dir=grads)
