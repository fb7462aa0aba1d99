"""Zero-shot evaluation with lm-eval: the official tasks and the embedded suite.

Three ways a task gets its data:

* **Embedded suite** (``embedded``, the default of ``configs/pipeline.yaml``): three
  tasks built deterministically from the embedded corpus's test split by
  :func:`modules.evaluation.suite.build_embedded_suite`, committed as lm-eval task YAMLs
  plus JSONL under ``modules/assets/lm_eval_tasks``; runs anywhere, offline, in seconds.
  What each task measures is in :data:`EMBEDDED_TASKS` and the YAML comments:
  ``topiary_greedy`` (the next word as the model's greedy continuation, scored like
  LAMBADA), ``topiary_order`` (word order: the real span against three with two
  neighbouring words swapped), ``topiary_word`` (the next word among four). Every
  context plus continuation stays below 120 tokens of the reference model (context 128).
  Paired intervals of dense, Wanda 50% and magnitude 70% on the reference model are in
  README ("Paired comparison"; ``python -m benchmarks.zeroshot_intervals``).
* **Official tasks** (``boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge,
  openbookqa``, the Wanda/ADMM set; ``official`` names all seven): lm-eval's own task
  definitions, unmodified, reading the data set from the Hugging Face Hub or the local
  ``datasets`` cache.
* **Data directory** (``data_dir``): the same official definitions, reading local files
  instead. ``<data_dir>/<task>.jsonl`` holds the rows of the split the official task
  scores (validation for boolq, rte, hellaswag, winogrande; test for arc_easy,
  arc_challenge, openbookqa), in the data set's own schema. A generated YAML
  ``include:``\\ s the installed task YAML and overrides only where the data comes from,
  so each task's prompt, choices and processing (hellaswag's cleaning, winogrande's
  partial scoring) still apply.

:func:`check_tasks` resolves names and proves every task's data is reachable before any
model work; :func:`zeroshot` wraps an already loaded model in lm-eval's ``HFLM`` and runs
``simple_evaluate``. The headline ``mean_acc`` is the unweighted mean of each task's
``acc`` (never ``acc_norm``), as the Wanda and ADMM papers average their seven tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from modules.errors import TopiaryError
from modules.evaluation.suite import EMBEDDED_GROUP, EMBEDDED_TASKS, SUITE_DIR
from modules.process import write_file

# lm_eval, datasets, torch and the engine load inside the functions that score a model:
# check_tasks (the preflight's, before any model) and the task names must stay light.

OFFICIAL_GROUP = "official"
MEAN_METRIC = "acc"

# name -> (task YAML under lm_eval/tasks, split the task scores, fields a row must have)
OFFICIAL_TASKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "boolq": ("super_glue/boolq/default.yaml", "validation", ("passage", "question", "label")),
    "rte": ("glue/rte/default.yaml", "validation", ("sentence1", "sentence2", "label")),
    "hellaswag": (
        "hellaswag/hellaswag.yaml",
        "validation",
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    ),
    "winogrande": ("winogrande/default.yaml", "validation", ("sentence", "option1", "option2", "answer")),
    "arc_easy": ("arc/arc_easy.yaml", "test", ("question", "choices", "answerKey")),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", ("question", "choices", "answerKey")),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test", ("question_stem", "choices", "answerKey")),
}
_SPLITS = ("training_split", "validation_split", "test_split")


# --------------------------------------------------------------------------- task resolution


@dataclass(frozen=True)
class TaskPlan:
    """Where each requested task comes from, decided before any model work."""

    requested: list[str]  # names handed to lm-eval (tasks or groups)
    leaves: list[str]  # the tasks that report a score, in order
    local: dict[str, Path] = field(default_factory=dict)  # official task -> data file
    hub: list[str] = field(default_factory=list)  # official tasks read via Hub / datasets cache


def valid_task_names() -> list[str]:
    """Every name :func:`check_tasks` accepts."""
    return [EMBEDDED_GROUP, *EMBEDDED_TASKS, OFFICIAL_GROUP, *OFFICIAL_TASKS]


def official_yaml_path(name: str) -> Path:
    """The installed lm-eval YAML that defines official task ``name``."""
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / OFFICIAL_TASKS[name][0]


def _official_source(name: str) -> tuple[str, str | None]:
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(official_yaml_path(name), resolve_func=False)
    return cfg["dataset_path"], cfg.get("dataset_name")


def _check_local(name: str, path: Path) -> None:
    fields = OFFICIAL_TASKS[name][2]
    try:
        with path.open(encoding="utf-8") as fh:
            first = json.loads(fh.readline())
    except (OSError, ValueError) as err:
        raise TopiaryError(f"zeroshot task {name!r}: {path} is not JSON lines ({err})") from None
    missing = [f for f in fields if f not in first]
    if missing:
        raise TopiaryError(
            f"zeroshot task {name!r}: {path} lacks field(s) {', '.join(missing)} "
            f"(rows must follow the data set's schema: {', '.join(fields)})"
        )


def _check_hub(name: str, data_dir: Path | None) -> None:
    import datasets

    path, config = _official_source(name)
    split = OFFICIAL_TASKS[name][1]
    try:
        datasets.load_dataset_builder(path, config)
    except Exception as err:  # noqa: BLE001 - any failure means the data cannot be read
        where = f"{data_dir / (name + '.jsonl')} does not exist, and " if data_dir else ""
        raise TopiaryError(
            f"zeroshot task {name!r}: data unreachable: {where}data set {path}"
            f"{f' ({config})' if config else ''} is neither reachable on the Hub nor in the local "
            f"datasets cache ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            f"Provide it: run once online to fill the cache (HF_HOME), or pass a data directory "
            f"(zeroshot data_dir / --data-dir) holding {name}.jsonl with the rows of its {split} "
            f"split in that data set's schema"
        ) from None


def check_tasks(tasks: list[str], data_dir: Path | str | None = None) -> TaskPlan:
    """Resolve task names and prove each task's data is reachable; no model is touched.

    Args:
        tasks: names from :func:`valid_task_names` (``embedded`` and ``official`` expand
            to their tasks).
        data_dir: optional folder with ``<task>.jsonl`` for official tasks; a task
            without its file there falls back to the Hub or the local datasets cache.

    Returns:
        The plan :func:`zeroshot` runs.

    Raises:
        TopiaryError: no task, an unknown name, a missing data directory, a malformed
            local file, or an official task whose data is unreachable.
    """
    if not tasks:
        raise TopiaryError(f"empty list (valid: {', '.join(valid_task_names())})", key="zeroshot tasks")
    unknown = [t for t in tasks if t not in valid_task_names()]
    if unknown:
        raise TopiaryError(
            f"unknown {', '.join(repr(t) for t in unknown)} (valid: {', '.join(valid_task_names())})",
            key="zeroshot tasks",
        )
    root = Path(data_dir) if data_dir is not None else None
    if root is not None and not root.is_dir():
        raise TopiaryError(f"zeroshot data_dir: {root} is not a directory")
    requested, leaves = [], []
    for name in tasks:
        names = list(OFFICIAL_TASKS) if name == OFFICIAL_GROUP else [name]
        for n in names:
            if n not in requested:
                requested.append(n)
            for leaf in EMBEDDED_TASKS if n == EMBEDDED_GROUP else [n]:
                if leaf not in leaves:
                    leaves.append(leaf)
    local, hub = {}, []
    for name in leaves:
        if name not in OFFICIAL_TASKS:
            continue
        path = root / f"{name}.jsonl" if root is not None else None
        if path is not None and path.is_file():
            _check_local(name, path)
            local[name] = path.resolve()
        else:
            _check_hub(name, root)
            hub.append(name)
    return TaskPlan(requested=requested, leaves=leaves, local=local, hub=hub)


def official_task_yaml(name: str, data_file: Path | str) -> str:
    """A task YAML running lm-eval's official ``name`` on a local JSONL file.

    It ``include``\\ s the installed YAML (absolute path, so it is written per machine) and
    overrides only the data source; the split the task scores reads ``data_file`` and
    the other splits are switched off (no training split is needed at zero shots).
    """
    split = OFFICIAL_TASKS[name][1]
    cfg = {
        "include": str(official_yaml_path(name)),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(Path(data_file).resolve())}},
    }
    cfg.update({key: (split if key == f"{split}_split" else None) for key in _SPLITS})
    return json.dumps(cfg, indent=2) + "\n"  # JSON is YAML


def task_manager(plan: TaskPlan, work_dir: Path | str):
    """An lm-eval ``TaskManager`` for ``plan``: the embedded suite, plus YAMLs for local files.

    The override YAMLs are written to ``work_dir``; lm-eval's own ~14,700 task index is
    built only when a task reads from the Hub (it costs 10-18 s).
    """
    from lm_eval.tasks import TaskManager

    work = Path(work_dir)
    for name, path in plan.local.items():
        write_file(work / f"{name}.yaml", official_task_yaml(name, path))
    return TaskManager(include_defaults=bool(plan.hub), include_path=[str(SUITE_DIR), str(work)])


# --------------------------------------------------------------------------- evaluation

# The last tokenizer's ids, kept between zero-shot runs of one process (the pipeline scores the
# dense and the pruned model on the same requests): {"key": tokenizer key, "ids": {...}}.
_ENCODED: dict = {"key": None, "ids": {}}


def tokenizer_key(tokenizer) -> str | None:
    """What a fast tokenizer's ids depend on (sha256 of its serialized state and special tokens);
    None for a tokenizer without a serialized state."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    extra = json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, str(tokenizer.special_tokens_map)])
    return hashlib.sha256((backend.to_str() + extra).encode()).hexdigest()


def continuation_scores(lm, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """lm-eval 0.4.13's ``HFLM._loglikelihood_tokens`` for a causal LM, with logits only where scored.

    Upstream takes the log-softmax of each batch's whole logits, ``(batch, padded input,
    vocabulary)``, then keeps each request's continuation positions. Here the base model
    runs the batch without its head (:func:`modules.evaluation.perplexity.last_hidden`) and
    the head (:func:`modules.engine.blocks.head_logits`: final norm, head and
    post-processing) runs on each request's continuation positions alone, so memory holds
    one continuation x vocabulary at a time (a rolling request of lm-eval's perplexity tasks
    is one whole window: window x vocabulary). Everything else is upstream's: the order and
    batching (``Collator``, one-token continuations of one context scored once), the left
    truncation to ``max_length`` (without upstream's warning), the log-softmax dtype, the
    greedy check and the answers ``(sum of the continuation's log-probabilities, all
    greedy)``. lm-eval calls the model and takes the log-softmax inside this one method, and
    ``_model_call`` is given only the padded ids, not where continuations start: no
    narrower method can be overridden. Used for causal LMs at a fixed batch size without
    mixed precision (Topiary's use); any other configuration runs upstream's method.
    """
    import torch
    import torch.nn.functional as F
    from lm_eval.models.utils import Collator
    from lm_eval.models.utils_hf import pad_and_concat
    from tqdm import tqdm

    from modules.engine.blocks import find_blocks, head_logits
    from modules.evaluation.perplexity import last_hidden

    _, blocks = find_blocks(lm.model)
    re_ord = Collator(
        requests,
        sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])),
        group_by="contexts" if lm.logits_cache else None,
        group_fn=lambda req: req[-2] + req[-1][:-1],
    )
    res = []
    pbar = tqdm(
        total=len(requests), disable=disable_tqdm or lm.rank != 0, desc="Running loglikelihood requests"
    )
    for chunk in re_ord.get_batched(n=lm.batch_size):
        inps = [(ctx + cont)[-(lm.max_length + 1) :][:-1] for _, ctx, cont in chunk]
        tensors = [torch.tensor(i, dtype=torch.long, device=lm.device) for i in inps]
        with torch.no_grad():
            hidden, as_tuple = last_hidden(
                lm.model, blocks, pad_and_concat(max(map(len, inps)), tensors, padding_side="right")
            )
        for row, ((request_str, ctx, cont), inp) in enumerate(zip(chunk, inps, strict=True)):
            with torch.no_grad():
                logits = head_logits(
                    lm.model, blocks, hidden[row : row + 1, len(inp) - len(cont) : len(inp)], as_tuple
                )
            logprobs = F.log_softmax(logits, dim=-1, dtype=lm.softmax_dtype)  # [1, cont, vocab]
            greedy = logprobs.argmax(dim=-1)
            for key, toks, scored in re_ord.get_cache(
                req_str=request_str, cxt_toks=ctx, cont_toks=cont, logits=logprobs
            ):
                cont_toks = torch.tensor(toks, dtype=torch.long, device=lm.device).unsqueeze(0)
                max_equal = (greedy[:, -cont_toks.shape[1] :] == cont_toks).all()
                logp = torch.gather(scored, 2, cont_toks.unsqueeze(-1)).squeeze(-1)
                answer = (float(logp.sum()), bool(max_equal))
                res.append(answer)
                if key is not None:
                    lm.cache_hook.add_partial("loglikelihood", key, answer)
                pbar.update(1)
    pbar.close()
    return re_ord.get_original(res)


def memo_hflm():
    """lm-eval's ``HFLM``, whose ``tok_encode`` remembers the ids of each string it was asked for.

    lm-eval tokenizes every request anew, one string at a time: the embedded suite asks for
    35,600 strings, 20,500 of them distinct, for 1.9 s of its 13 s; the pipeline's pruned
    model then asks for the same strings again. The ids are those of lm-eval's own
    ``tok_encode`` for the same string and arguments, kept for one tokenizer
    (:func:`tokenizer_key`, with the model's BOS handling) and dropped when another comes;
    a tokenizer without a key keeps them for its own run only. Its loglikelihood requests of
    a causal LM are scored by :func:`continuation_scores` (logits only where scored).
    """
    from array import array

    from lm_eval.models.huggingface import HFLM

    class MemoHFLM(HFLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            tokenizer = tokenizer_key(self.tokenizer)
            if tokenizer is None:  # remembered for this run only
                self._ids = {}
                return
            key = (tokenizer, self.add_bos_token, self.prefix_token_id)
            if _ENCODED["key"] != key:
                _ENCODED.update(key=key, ids={})
            self._ids = _ENCODED["ids"]

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            if left_truncate_len or kwargs:
                return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
            ids = self._ids.get((string, add_special_tokens))
            if ids is None:
                ids = array("q", super().tok_encode(string, add_special_tokens))
                self._ids[(string, add_special_tokens)] = ids
            return list(ids)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            if (
                self.backend != "causal"
                or self.batch_size == "auto"
                or self.mixed_precision_dtype is not None
            ):
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            return continuation_scores(self, requests, disable_tqdm)

    return MemoHFLM


class ItemScores(TypedDict):
    """Each item's correctness per task (:func:`item_scores`)."""

    metric: str
    acc: dict[str, list[int]]
    """Task -> each item's ``acc`` (1 or 0), in item order."""
    docs: dict[str, str]
    """Task -> sha256 of its items' lm-eval doc hashes: equal exactly when the items are."""


class ZeroShot(TypedDict):
    """A zero-shot result (its JSON form: a task persists it, MLflow logs it in ``evaluation.json``)."""

    tasks: dict[str, dict[str, float]]
    """Task -> ``acc``, ``acc_stderr`` and, where the task has it, ``acc_norm``, ``acc_norm_stderr``."""
    mean_acc: float
    mean_metric: str
    n: dict[str, int]
    """Task -> items scored."""
    limit: int | None
    items: NotRequired[ItemScores]
    """With ``per_item``."""
    seconds: NotRequired[float]
    """This and the fields below: added by the task (``tasks.evaluate.zeroshot``)."""
    peak_mem_mb: NotRequired[float]
    peak_gpu_mb: NotRequired[float]
    provenance: NotRequired[dict[str, str]]


def zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 16,
    data_dir: Path | str | None = None,
    device: str | None = None,
    per_item: bool = False,
) -> ZeroShot:
    """Zero-shot accuracy of an already loaded causal LM on lm-eval tasks.

    The model is wrapped in lm-eval's ``HFLM`` as it is (no reload, so pruned weights in
    memory are what gets scored); progress shows through lm-eval's logs and bars.

    Args:
        model: a Hugging Face causal LM, in eval mode.
        tokenizer: its tokenizer.
        tasks: task names (see :func:`check_tasks`).
        limit: score only the first ``limit`` items of each task (None: all).
        batch_size: requests per forward pass.
        data_dir: local copies of official tasks' data (see the module docstring).
        device: move the model there first (None: leave it where it is).
        per_item: also return each item's correctness (lm-eval's logged samples), what a
            paired comparison of two models on the same items needs.

    Returns:
        ``{"tasks": {name: {"acc", "acc_stderr"[, "acc_norm", "acc_norm_stderr"]}},
        "mean_acc": mean of the tasks' acc, "mean_metric": "acc", "n": {name: items},
        "limit": limit}``; accuracies are fractions in [0, 1]. With ``per_item``, also
        ``"items"``: see :func:`item_scores`.
    """
    from modules.engine.models import check_finite_weights

    plan = check_tasks(tasks, data_dir)
    if limit is not None and limit < 1:
        raise TopiaryError(f"limit: {limit} must be at least 1 (None scores every item)")
    if batch_size < 1:
        raise TopiaryError(f"batch_size: {batch_size} must be at least 1")
    check_finite_weights(model)
    import lm_eval
    from lm_eval.utils import setup_logging

    setup_logging(logging.INFO)
    if device is not None:
        model.to(device)
    lm = memo_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    with tempfile.TemporaryDirectory(prefix="topiary-lm-eval-") as work:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=plan.requested,
            num_fewshot=0,
            limit=limit,
            task_manager=task_manager(plan, work),
            log_samples=per_item,
            bootstrap_iters=1000,  # acc is a mean: closed-form stderr, no bootstrap
        )
    result = summarize(out, plan.leaves, limit)
    if per_item:
        result["items"] = item_scores(out, plan.leaves)
    return result


def item_scores(out: dict[str, Any], leaves: list[str]) -> ItemScores:
    """Each item's ``acc`` (1 or 0) per task, in item order, from ``simple_evaluate``'s samples.

    Returns:
        ``{"metric": "acc", "acc": {task: [0 or 1, ...]}, "docs": {task: sha256 of the items'
        lm-eval doc hashes}}``; two results were scored on the same items exactly when their
        ``docs`` agree, which a paired comparison checks.
    """
    acc, docs = {}, {}
    for name in leaves:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        acc[name] = [int(round(float(s[MEAN_METRIC]))) for s in samples]
        docs[name] = hashlib.sha256("".join(str(s["doc_hash"]) for s in samples).encode()).hexdigest()
    return {"metric": MEAN_METRIC, "acc": acc, "docs": docs}


def summarize(out: dict[str, Any], leaves: list[str], limit: int | None = None) -> ZeroShot:
    """Pick acc (and acc_norm) of each task out of ``out`` (what ``lm_eval.simple_evaluate``
    returns), and their mean acc."""
    tasks, n = {}, {}
    for name in leaves:
        row = out["results"][name]
        scores = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in row:
                scores[metric] = float(row[f"{metric},none"])
                stderr = row.get(f"{metric}_stderr,none")
                if isinstance(stderr, int | float):
                    scores[f"{metric}_stderr"] = float(stderr)
        tasks[name] = scores
        n[name] = int(out["n-samples"][name]["effective"])
    from modules.engine.models import check_finite_metric

    for name, scores in tasks.items():  # (a stderr may be NaN for one item: not checked)
        for metric in ("acc", "acc_norm"):
            if metric in scores:
                check_finite_metric(f"zeroshot {name} {metric}", scores[metric])
    mean = sum(t[MEAN_METRIC] for t in tasks.values()) / len(tasks)
    return {"tasks": tasks, "mean_acc": mean, "mean_metric": MEAN_METRIC, "n": n, "limit": limit}


def format_table(result: ZeroShot) -> str:
    """The result of :func:`zeroshot` as a plain-text table, mean last."""
    lines = [f"{'task':<22} {'n':>6} {'acc':>8} {'acc_norm':>9}"]
    for name, scores in result["tasks"].items():
        norm = f"{scores['acc_norm']:9.4f}" if "acc_norm" in scores else f"{'-':>9}"
        lines.append(f"{name:<22} {result['n'][name]:>6} {scores['acc']:8.4f} {norm}")
    lines.append(f"{'mean (' + result['mean_metric'] + ')':<22} {'':>6} {result['mean_acc']:8.4f}")
    return "\n".join(lines)
