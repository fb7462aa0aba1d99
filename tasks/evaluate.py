"""Evaluation tasks: perplexity and lm-eval zero-shot, of the dense or the pruned model.

Both take a model reference (:class:`ModelRef`: ``name``, ``embedded``, a folder or a Hub id, and ``sha256``)
and are cached by that hash plus the evaluation settings only (:func:`perplexity_key`,
:func:`zeroshot_key`), never by the prune config: the dense baselines are computed once
per model and data config and reused by every pruned variant and every re-run. Each
result carries the provenance of the run that computed it (commit, versions, device,
dtype, threads); it is never part of a key, so a re-run in a dirty tree still hits.

Their results keep the per-item figures (each window's NLL, each zero-shot item's
correctness: a few KB, persisted with the result like every figure), from which
:func:`paired` compares the pruned model with the dense one on the same windows and items.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from configs.schema import DataCfg, ModelCfg, ZeroShotCfg
from modules.data.windows import eval_windows
from modules.engine.names import check_device, resolve_model
from modules.errors import TopiaryError
from modules.evaluation.intervals import Paired, paired_accuracy, paired_perplexity
from modules.evaluation.zeroshot import ZeroShot
from modules.evaluation.zeroshot import zeroshot as run_zeroshot
from modules.provenance import provenance
from tasks.cache import cache_key_fn, measure, stage_key, task

if TYPE_CHECKING:  # a type only; the evaluations load the engine inside the tasks (see perplexity)
    from modules.evaluation.perplexity import Perplexity


class ModelRef(TypedDict):
    """The model an evaluation scores: the dense one (``model.name`` and its fingerprint) or a
    pruned one (the prune task's result, which holds these two among others)."""

    name: str
    """``embedded``, a local folder or a Hub id."""
    sha256: str
    """Its content fingerprint: what the cache key holds."""


def perplexity_key(target: ModelRef, model: ModelCfg, data: DataCfg, fingerprints: dict[str, str]) -> str:
    """Cache key of a perplexity: the model's hash and dtype, the eval data and window length."""
    return stage_key(
        "perplexity",
        model=target["sha256"],
        dtype=model.dtype,
        tokenizer=fingerprints["tokenizer"],
        source=fingerprints["eval"],
        seqlen=data.eval_seqlen,
    )


@task(
    name="perplexity",
    task_run_name="ppl-{label}",
    cache_key_fn=cache_key_fn(perplexity_key),
    persist_result=True,
)
def perplexity(
    target: ModelRef, model: ModelCfg, data: DataCfg, fingerprints: dict[str, str], label: str = ""
) -> Perplexity:
    """Perplexity of ``target`` over non-overlapping windows of ``data.eval_seqlen`` tokens.

    Args:
        target: the model scored.
        model: dtype and device.
        data: ``eval``, ``eval_seqlen``, ``eval_batch_size``.
        fingerprints: the content hashes of the inputs (``tasks.windows.fingerprints``).
        label: ``dense`` or ``pruned``, for the task run's name only.

    Returns:
        The :class:`~modules.evaluation.perplexity.Perplexity` with ``seconds``,
        ``peak_mem_mb``, ``streamed`` and ``provenance``
        (:func:`modules.provenance.provenance` of this evaluation, not in the key).
    """
    # The engine (torch with lightning and transformers) loads when an evaluation computes: a
    # run whose steps are all cached never imports it.
    from transformers import AutoConfig

    from modules.engine.models import DTYPES, load_model, load_tokenizer
    from modules.evaluation.perplexity import perplexity as ppl
    from modules.evaluation.perplexity import perplexity_streamed

    with measure() as figures:
        path = resolve_model(target["name"])
        streamed = streams(path)
        if streamed:  # larger than memory: one block at a time, the same result
            device = check_device(model.device)
            context = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
            ids = eval_windows(data.eval, load_tokenizer(path), data.eval_seqlen, max_context=context)
            dtype = DTYPES[model.dtype]
            result = perplexity_streamed(path, ids, device, dtype=dtype, batch_size=data.eval_batch_size)
            record = provenance(device, dtype)
        else:
            net, tokenizer = load_model(target["name"], model.dtype, model.device)
            context = getattr(net.config, "max_position_embeddings", None)
            ids = eval_windows(data.eval, tokenizer, data.eval_seqlen, max_context=context)
            result = ppl(net, ids, batch_size=data.eval_batch_size)
            record = provenance(net.device, net.dtype)
            del net
    return {**result, **figures, "provenance": record, "streamed": streamed}


def streams(model_dir: str) -> bool:
    """Whether a model is evaluated block by block: its weights exceed half the available memory.

    ``TOPIARY_STREAM_EVAL=1`` (or ``0``) forces the choice (tests, or a machine shared with others).
    """
    from modules.engine.streaming import available_memory  # the engine: see perplexity

    forced = os.environ.get("TOPIARY_STREAM_EVAL")
    if forced in ("0", "1"):
        return forced == "1"
    size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return size > 0.5 * available_memory()


def zeroshot_key(
    target: ModelRef, model: ModelCfg, zeroshot: ZeroShotCfg, fingerprints: dict[str, str]
) -> str:
    """Cache key of a zero-shot evaluation: the model's hash and dtype, tasks, limit, task data."""
    return stage_key(
        "zeroshot",
        model=target["sha256"],
        dtype=model.dtype,
        tasks=zeroshot.tasks,
        limit=zeroshot.limit,
        data=fingerprints.get("zeroshot"),
    )


@task(
    name="zeroshot",
    task_run_name="zeroshot-{label}",
    cache_key_fn=cache_key_fn(zeroshot_key),
    persist_result=True,
)
def zeroshot(
    target: ModelRef, model: ModelCfg, zeroshot: ZeroShotCfg, fingerprints: dict[str, str], label: str = ""
) -> ZeroShot:
    """lm-eval zero-shot accuracy of ``target`` on ``zeroshot.tasks``.

    Returns:
        The :class:`~modules.evaluation.zeroshot.ZeroShot` with ``items`` (each item's
        correctness), ``seconds``, ``peak_mem_mb`` and ``provenance`` (not in the key).
    """
    from modules.engine.models import load_model  # the engine: see perplexity

    with measure() as figures:
        net, tokenizer = load_model(target["name"], model.dtype, model.device)
        result = run_zeroshot(
            net,
            tokenizer,
            zeroshot.tasks,
            limit=zeroshot.limit,
            batch_size=zeroshot.batch_size,
            data_dir=zeroshot.data_dir,
            per_item=True,
        )
        record = provenance(net.device, net.dtype)
        del net
    return {**result, **figures, "provenance": record}


def paired_key(
    ppl_dense: Perplexity, ppl_pruned: Perplexity, zs_dense: ZeroShot | None, zs_pruned: ZeroShot | None
) -> str:
    """Cache key of a paired comparison: the per-window and per-item figures it reads."""
    items = [None if z is None else z.get("items") for z in (zs_dense, zs_pruned)]
    return stage_key("paired", ppl=[ppl_dense["window_nll"], ppl_pruned["window_nll"]], zeroshot=items)


@task(name="paired", cache_key_fn=cache_key_fn(paired_key), persist_result=True)
def paired(
    ppl_dense: Perplexity, ppl_pruned: Perplexity, zs_dense: ZeroShot | None, zs_pruned: ZeroShot | None
) -> Paired:
    """Pruned against dense on the same windows and items, with 95% paired bootstrap intervals.

    Args:
        ppl_dense: the dense model's :func:`perplexity` result.
        ppl_pruned: the pruned model's, on the same windows.
        zs_dense: the dense model's :func:`zeroshot` result, or None (zero-shot disabled).
        zs_pruned: the pruned model's, on the same items, or None.

    Returns:
        ``ppl``: :func:`~modules.evaluation.intervals.paired_perplexity`, ``zeroshot``:
        :func:`~modules.evaluation.intervals.paired_accuracy` or None, ``seconds``, ``peak_mem_mb``.

    Raises:
        TopiaryError: the two models were scored on other windows or items.
    """
    return compare(ppl_dense, ppl_pruned, zs_dense, zs_pruned)


def compare(
    ppl_dense: Perplexity, ppl_pruned: Perplexity, zs_dense: ZeroShot | None, zs_pruned: ZeroShot | None
) -> Paired:
    """The body of :func:`paired`, callable without Prefect."""
    with measure() as figures:
        if ppl_dense["seqlen"] != ppl_pruned["seqlen"]:
            raise TopiaryError(
                f"paired comparison: windows of {ppl_dense['seqlen']} (dense) and "
                f"{ppl_pruned['seqlen']} (pruned) tokens"
            )
        ppl_pair = paired_perplexity(
            ppl_dense["window_nll"], ppl_pruned["window_nll"], ppl_dense["seqlen"] - 1
        )
        zs = None
        if zs_dense is not None and zs_pruned is not None:
            dense, pruned = zs_dense["items"], zs_pruned["items"]
            if dense["docs"] != pruned["docs"]:
                names = dense["docs"].keys() | pruned["docs"].keys()
                differ = sorted(t for t in names if dense["docs"].get(t) != pruned["docs"].get(t))
                raise TopiaryError(f"paired comparison: zero-shot items differ on {', '.join(differ)}")
            zs = paired_accuracy(dense["acc"], pruned["acc"])
    return {"ppl": ppl_pair, "zeroshot": zs, **figures}
