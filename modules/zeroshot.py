"""Zero-shot evaluation with lm-eval: the official tasks and the embedded suite.

Three ways a task gets its data:

* **Embedded suite** (``embedded``, the default of ``configs/pipeline.yaml``): three
  four-way multiple-choice tasks built deterministically from the embedded corpus's test
  split by :func:`build_embedded_suite`, committed as lm-eval task YAMLs plus JSONL under
  ``modules/assets/lm_eval_tasks``; runs anywhere, offline, in seconds. What each task
  measures is in :data:`EMBEDDED_TASKS` and the YAML comments: ``topiary_continuation``
  (use of context: which of four passages a continuation follows),
  ``topiary_order`` (word order: the real span against three with two neighbouring words
  swapped),
  ``topiary_word`` (next-word prediction). Every context plus continuation stays below
  120 tokens of the reference model (context 128). Mean acc on the reference model
  (``python -m benchmarks.zeroshot_intervals``; chance 0.25): dense 0.729, Wanda 50%
  0.723, magnitude 70% 0.605; paired intervals in README ("Paired comparison").
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

import json
import logging
import random
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from modules.errors import TopiaryError
from modules.process import write_file

SUITE_DIR = Path(__file__).parent / "assets" / "lm_eval_tasks"
EMBEDDED_GROUP = "embedded"
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


# --------------------------------------------------------------------------- embedded suite

SUITE_SEED = 20240601
# items per task at most (the test split gives 527 / 1565 / 721): as many as keep one model's
# zero-shot near 30 s on 2 cores; the long continuation items cost most per item
ITEMS = {"topiary_continuation": 300, "topiary_order": 1200, "topiary_word": 1000}
CONT_STEP, WORD_STEP, ORDER_STEP = 12, 6, 6  # words between the starts of two windows
PASSAGE_WORDS = (12, 36)  # topiary_continuation: words of a passage, at least / at most
CONT_WORDS = 10  # topiary_continuation: words of a continuation
ORDER_WORDS = 12  # topiary_order: words of a span
WORD_CONTEXT = (8, 24)  # topiary_word: words of context, at least / at most
PASSAGE_CHARS, CONT_CHARS = 190, 70  # with _prose, context + continuation stay < 120 tokens
PROSE = 0.8  # least share of letters among a text's non-space characters (tokens ~ length)

EMBEDDED_TASKS: dict[str, str] = {
    "topiary_continuation": (
        "Four docstring passages and one continuation: pick the passage the continuation "
        "truly follows. The three other passages come from other documents, and each passage "
        "of the suite is a distractor exactly three times. Scored like winogrande: the "
        "log-likelihood of the same continuation after each passage, so only the use of the "
        "context counts (topic, identifiers, sentence structure), never how likely the "
        "choices are on their own. Chance is 25%."
    ),
    "topiary_order": (
        "Pick the real span of a docstring among four, with no context: the three others are "
        "the same words with one pair of neighbouring words swapped, so every choice has the "
        "same words and length and differs from the real span in one place only. It measures "
        "the model's knowledge of word order and local syntax. Chance is 25%."
    ),
    "topiary_word": (
        "Pick the next word of a docstring passage among four. The three wrong words are true "
        "next words of other items (each is a distractor exactly three times), so a preference "
        "for frequent words has no systematic edge. It measures next-word prediction in "
        "context. Chance is 25%; acc_norm divides by the word's length."
    ),
}


def _prose(text: str) -> bool:
    """Mostly letters: numbers, tables and code take many more tokens per character."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(c.isalpha() for c in chars) >= PROSE * len(chars)


def _distractors(groups: list[int], texts: list[str], rng: random.Random, k: int = 3) -> list[list[int]]:
    """For each item, ``k`` other items whose text serves as its distractors.

    Each of ``k`` rounds draws a random permutation, repaired by swaps until no item gets
    a text of its own document, its own text or one it already has (case ignored); so
    every text is a distractor exactly ``k`` times.
    """
    n = len(texts)
    keys = [t.lower() for t in texts]
    picks: list[list[int]] = [[] for _ in range(n)]

    def fits(i: int, j: int) -> bool:
        taken = {keys[p] for p in picks[i]}
        return groups[j] != groups[i] and keys[j] != keys[i] and keys[j] not in taken

    for _ in range(k):
        perm = list(range(n))
        rng.shuffle(perm)
        for i in range(n):
            while not fits(i, perm[i]):
                j = rng.randrange(n)
                if fits(i, perm[j]) and fits(j, perm[i]):
                    perm[i], perm[j] = perm[j], perm[i]
        for i in range(n):
            picks[i].append(perm[i])
    return picks


def _with_distractors(
    pairs: list[tuple[int, str, str]], rng: random.Random, swap: int, items: int
) -> list[tuple[list[str], int, str]]:
    """``(doc, a, b)`` triples -> (four choices of field ``swap``, gold index, the other field)."""
    rng.shuffle(pairs)
    pairs = pairs[:items]
    picks = _distractors([p[0] for p in pairs], [p[swap] for p in pairs], rng)
    out = []
    for pair, others in zip(pairs, picks, strict=True):
        choices = [pair[swap], *(pairs[j][swap] for j in others)]
        rng.shuffle(choices)
        out.append((choices, choices.index(pair[swap]), pair[3 - swap]))
    return out


def _continuation_items(docs: list[str], rng: random.Random) -> list[dict]:
    """Passages cut into (passage, continuation); each continuation gets four passages."""
    lo, hi = PASSAGE_WORDS
    pairs, seen = [], set()
    for d, doc in enumerate(docs):
        words = doc.split()  # line wraps and indentation become single spaces
        for start in range(0, len(words), CONT_STEP):  # windows overlap
            window = words[start : start + hi + CONT_WORDS]
            passage, cont = window[:-CONT_WORDS], " ".join(window[-CONT_WORDS:])
            while passage and len(" ".join(passage)) > PASSAGE_CHARS:
                passage = passage[1:]
            text = " ".join(passage)
            if len(passage) >= lo and len(window) > CONT_WORDS and len(cont) <= CONT_CHARS:
                if _prose(text) and _prose(cont) and text not in seen:
                    seen.add(text)
                    pairs.append((d, text, cont))
    return [
        {"passages": passages, "continuation": cont, "label": label}
        for passages, label, cont in _with_distractors(pairs, rng, 1, ITEMS["topiary_continuation"])
    ]


def _word_items(docs: list[str], rng: random.Random) -> list[dict]:
    """(context, next word) pairs; each context gets its word and three foreign words."""
    lo, hi = WORD_CONTEXT
    pairs = []
    for d, doc in enumerate(docs):
        words = doc.split()
        for end in range(hi, len(words), WORD_STEP):  # contexts overlap
            context, word = words[end - hi : end], words[end]
            while context and len(" ".join(context)) > PASSAGE_CHARS:
                context = context[1:]
            if len(context) >= lo and word.isalpha() and len(word) >= 3 and _prose(" ".join(context)):
                pairs.append((d, " ".join(context), word))
    return [
        {"context": context, "choices": choices, "label": label}
        for choices, label, context in _with_distractors(pairs, rng, 2, ITEMS["topiary_word"])
    ]


def _adjacent_swaps(span: list[str]) -> list[str]:
    """Every distinct text of ``span`` with one pair of neighbouring words swapped."""
    real, out = " ".join(span), []
    for i in range(len(span) - 1):
        swapped = list(span)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        text = " ".join(swapped)
        if text != real and text not in out:
            out.append(text)
    return out


def _order_items(docs: list[str], rng: random.Random) -> list[dict]:
    """Spans of ``ORDER_WORDS`` words and three variants, each with two neighbouring words swapped.

    Neighbours, not any pair: a swap of two distant words breaks the syntax so plainly
    that pruning hardly changes the answer (Wanda 50% scored as dense); a local swap
    needs the fine knowledge of word order that pruning erodes.
    """
    spans = []
    for doc in docs:
        words = doc.split()
        for start in range(0, len(words) - ORDER_WORDS + 1, ORDER_STEP):
            span = words[start : start + ORDER_WORDS]
            text = " ".join(span)
            if len(set(span)) >= ORDER_WORDS // 2 and len(text) <= CONT_CHARS + 40 and _prose(text):
                spans.append(span)
    rng.shuffle(spans)
    items = []
    for span in spans:
        if len(items) == ITEMS["topiary_order"]:
            break
        swaps = _adjacent_swaps(span)
        if len(swaps) < 3:
            continue
        real, variants = " ".join(span), rng.sample(swaps, 3)
        choices = [real, *variants]
        rng.shuffle(choices)
        items.append({"context": "", "choices": choices, "label": choices.index(real)})
    return items


# name -> (builder, doc_to_text, doc_to_choice, doc_to_target, target_delimiter, metrics)
_SUITE = {
    "topiary_continuation": (_continuation_items, "label", "passages", "continuation", " ", ["acc"]),
    "topiary_order": (_order_items, "context", "choices", "label", "", ["acc"]),
    "topiary_word": (_word_items, "context", "choices", "label", " ", ["acc", "acc_norm"]),
}


def _task_yaml(name: str, header: str) -> str:
    _, text, choice, target, delimiter, metrics = _SUITE[name]
    comment = "\n".join(f"# {line}" for line in textwrap.wrap(EMBEDDED_TASKS[name], 88))
    metric_lines = "".join(
        f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics
    )
    return (
        f"{header}{comment}\n"
        f"task: {name}\n"
        f"tag: topiary\n"
        f"custom_dataset: !function suite_data.load\n"
        f"dataset_kwargs:\n  file: {name}.jsonl\n"
        f"output_type: multiple_choice\n"
        f"test_split: test\n"
        f"doc_to_text: {text}\n"
        f"doc_to_choice: {choice}\n"
        f"doc_to_target: {target}\n"
        f"target_delimiter: {json.dumps(delimiter)}\n"
        f"metric_list:\n{metric_lines}"
        f"metadata:\n  version: 1.0\n"
    )


def build_embedded_suite(out_dir: Path | str = SUITE_DIR, corpus=None) -> dict[str, int]:
    """Write the embedded zero-shot suite (task YAMLs, JSONL, manifest) to ``out_dir``.

    Items come from the corpus's test split (never seen in training), whitespace
    collapsed, at most :data:`ITEMS` per task; prose only (numbers and tables cost many
    tokens). Distractors of ``topiary_continuation`` and ``topiary_word`` are other items'
    gold texts, each used exactly three times (:func:`_distractors`).

    Deterministic: the same corpus (same Python minor version) and seed give the same
    bytes; ``suite.json`` records the corpus hash they were built from. The loader
    ``suite_data.py`` that the YAMLs name lives beside them in the repository and is
    copied when ``out_dir`` is elsewhere.

    Args:
        out_dir: folder to write into (created if missing).
        corpus: the embedded corpus when the caller has built it already.

    Returns:
        Number of items of each task.
    """
    from modules.corpus import build_corpus, python_minor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus or build_corpus()
    header = (
        "# Generated by modules.zeroshot.build_embedded_suite from the embedded corpus's test\n"
        "# split; do not edit by hand. lm-eval runs it: --include_path modules/assets/lm_eval_tasks\n"
    )
    counts = {}
    for i, (name, spec) in enumerate(_SUITE.items()):
        items = spec[0](corpus.test, random.Random(SUITE_SEED + i))
        rows = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        write_file(out / f"{name}.jsonl", rows)
        write_file(out / f"{name}.yaml", _task_yaml(name, header))
        counts[name] = len(items)
    group = (
        f"{header}# The embedded suite; Topiary reports the mean of the tasks' acc.\n"
        f"group: {EMBEDDED_GROUP}\ntask:\n"
        + "".join(f"  - {name}\n" for name in _SUITE)
        + "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: false\n"
        "metadata:\n  version: 1.0\n"
    )
    write_file(out / f"{EMBEDDED_GROUP}.yaml", group)
    manifest = {
        "corpus_sha256": corpus.sha256(),
        "python": python_minor(),
        "seed": SUITE_SEED,
        "items": counts,
    }
    write_file(out / "suite.json", json.dumps(manifest, indent=2) + "\n")
    loader = SUITE_DIR / "suite_data.py"
    if out.resolve() != SUITE_DIR.resolve():
        write_file(out / "suite_data.py", loader.read_text(encoding="utf-8"))
    return counts


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
        raise TopiaryError(f"zeroshot tasks: empty list (valid: {', '.join(valid_task_names())})")
    unknown = [t for t in tasks if t not in valid_task_names()]
    if unknown:
        raise TopiaryError(
            f"zeroshot tasks: unknown {', '.join(repr(t) for t in unknown)} "
            f"(valid: {', '.join(valid_task_names())})"
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


def zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 16,
    data_dir: Path | str | None = None,
    device: str | None = None,
    per_item: bool = False,
) -> dict:
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
    from modules.models import check_finite_weights

    plan = check_tasks(tasks, data_dir)
    if limit is not None and limit < 1:
        raise TopiaryError(f"limit: {limit} must be at least 1 (None scores every item)")
    if batch_size < 1:
        raise TopiaryError(f"batch_size: {batch_size} must be at least 1")
    check_finite_weights(model)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import setup_logging

    setup_logging(logging.INFO)
    if device is not None:
        model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
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


def item_scores(out: dict, leaves: list[str]) -> dict:
    """Each item's ``acc`` (1 or 0) per task, in item order, from ``simple_evaluate``'s samples.

    Returns:
        ``{"metric": "acc", "acc": {task: [0 or 1, ...]}, "docs": {task: sha256 of the items'
        lm-eval doc hashes}}``; two results were scored on the same items exactly when their
        ``docs`` agree, which a paired comparison checks.
    """
    import hashlib

    acc, docs = {}, {}
    for name in leaves:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        acc[name] = [int(round(float(s[MEAN_METRIC]))) for s in samples]
        docs[name] = hashlib.sha256("".join(str(s["doc_hash"]) for s in samples).encode()).hexdigest()
    return {"metric": MEAN_METRIC, "acc": acc, "docs": docs}


def summarize(out: dict, leaves: list[str], limit: int | None = None) -> dict:
    """Pick acc (and acc_norm) of each task out of lm-eval's results, and their mean acc."""
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
    from modules.models import check_finite_metric

    for name, scores in tasks.items():  # (a stderr may be NaN for one item: not checked)
        for metric in ("acc", "acc_norm"):
            if metric in scores:
                check_finite_metric(f"zeroshot {name} {metric}", scores[metric])
    mean = sum(t[MEAN_METRIC] for t in tasks.values()) / len(tasks)
    return {"tasks": tasks, "mean_acc": mean, "mean_metric": MEAN_METRIC, "n": n, "limit": limit}


def format_table(result: dict) -> str:
    """The result of :func:`zeroshot` as a plain-text table, mean last."""
    lines = [f"{'task':<22} {'n':>6} {'acc':>8} {'acc_norm':>9}"]
    for name, scores in result["tasks"].items():
        norm = f"{scores['acc_norm']:9.4f}" if "acc_norm" in scores else f"{'-':>9}"
        lines.append(f"{name:<22} {result['n'][name]:>6} {scores['acc']:8.4f} {norm}")
    lines.append(f"{'mean (' + result['mean_metric'] + ')':<22} {'':>6} {result['mean_acc']:8.4f}")
    return "\n".join(lines)
