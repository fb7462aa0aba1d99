"""Evaluation tasks: perplexity and lm-eval zero-shot, of the dense or the pruned model.

Both take a *model reference* ``{"name": "embedded" | folder | Hub id, "sha256": ...}``
and are cached by that hash plus the evaluation settings only (:func:`perplexity_key`,
:func:`zeroshot_key`), never by the prune config: the dense baselines are computed once
per model and data config and reused by every pruned variant and every re-run. Each
result carries the provenance of the run that computed it (commit, versions, device,
dtype, threads); it is never part of a key, so a re-run in a dirty tree still hits.
"""

from __future__ import annotations

from prefect import task

from tasks.cache import cache_key_fn, measure, stage_key


def perplexity_key(target: dict, model: dict, data: dict, prints: dict) -> str:
    """Cache key of a perplexity: the model's hash and dtype, the eval data and window length."""
    return stage_key(
        "perplexity",
        model=target["sha256"],
        dtype=model["dtype"],
        tokenizer=prints["tokenizer"],
        source=prints["eval"],
        seqlen=data["eval_seqlen"],
    )


@task(
    name="perplexity",
    task_run_name="ppl-{label}",
    cache_key_fn=cache_key_fn(perplexity_key),
    persist_result=True,
)
def perplexity(target: dict, model: dict, data: dict, prints: dict, label: str = "") -> dict:
    """Perplexity of ``target`` over non-overlapping windows of ``data.eval_seqlen`` tokens.

    Args:
        target: the model reference (dense: ``model.name`` and its fingerprint; pruned: the
            prune task's result).
        model: the ``model`` config section (dtype, device).
        data: the ``data`` config section (``eval``, ``eval_seqlen``, ``eval_batch_size``).
        prints: the run's fingerprints.
        label: ``dense`` or ``pruned``, for the task run's name only.

    Returns:
        ``{"ppl", "nll", "tokens", "windows", "seqlen", "seconds", "peak_mem_mb",
        "provenance"}`` (:func:`modules.provenance.provenance` of this evaluation; not in the key).
    """
    from modules.data import eval_windows
    from modules.models import load_model
    from modules.perplexity import perplexity as ppl
    from modules.provenance import provenance

    with measure() as figures:
        net, tokenizer = load_model(target["name"], model["dtype"], model["device"])
        context = getattr(net.config, "max_position_embeddings", None)
        ids = eval_windows(data["eval"], tokenizer, data["eval_seqlen"], max_context=context)
        result = ppl(net, ids, batch_size=data["eval_batch_size"])
        record = provenance(net.device, net.dtype)
        del net
    return {**result, **figures, "provenance": record}


def zeroshot_key(target: dict, model: dict, zeroshot: dict, prints: dict) -> str:
    """Cache key of a zero-shot evaluation: the model's hash and dtype, tasks, limit, task data."""
    return stage_key(
        "zeroshot",
        model=target["sha256"],
        dtype=model["dtype"],
        tasks=zeroshot["tasks"],
        limit=zeroshot.get("limit"),
        data=prints.get("zeroshot"),
    )


@task(
    name="zeroshot",
    task_run_name="zeroshot-{label}",
    cache_key_fn=cache_key_fn(zeroshot_key),
    persist_result=True,
)
def zeroshot(target: dict, model: dict, zeroshot: dict, prints: dict, label: str = "") -> dict:
    """lm-eval zero-shot accuracy of ``target`` on ``zeroshot.tasks``.

    Returns:
        :func:`modules.zeroshot.zeroshot`'s result (``tasks``, ``mean_acc``, ``n``, ...) plus
        ``seconds``, ``peak_mem_mb`` and ``provenance`` (not in the key).
    """
    from modules.models import load_model
    from modules.provenance import provenance
    from modules.zeroshot import zeroshot as run_zeroshot

    with measure() as figures:
        net, tokenizer = load_model(target["name"], model["dtype"], model["device"])
        result = run_zeroshot(
            net,
            tokenizer,
            zeroshot["tasks"],
            limit=zeroshot.get("limit"),
            batch_size=zeroshot["batch_size"],
            data_dir=zeroshot.get("data_dir"),
        )
        record = provenance(net.device, net.dtype)
        del net
    return {**result, **figures, "provenance": record}
