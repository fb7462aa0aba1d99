"""Zero-shot evaluation with lm-eval: the official tasks and the embedded suite.

Three ways a task gets its data:

* **Embedded suite** (``embedded``, the default of ``configs/pipeline.yaml``): multiple-choice
  tasks built deterministically from the embedded corpus's test split by
  :func:`build_embedded_suite`, committed as lm-eval task YAMLs plus JSONL under
  ``modules/assets/lm_eval_tasks``. Runs anywhere, offline.
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
from dataclasses import dataclass, field
from pathlib import Path

from modules.errors import TopiaryError

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
CONT_ITEMS = 300  # topiary_continuation: items kept (of those the test split yields)
CONT_WORDS = 10  # words in each continuation (the choices)
CONT_CONTEXT_WORDS = (12, 36)  # context length in words: at least, at most
ORDER_ITEMS = 300  # topiary_order: items kept
ORDER_WORDS = 14  # words in each sentence (the choices)
MAX_CHARS = 320  # context + continuation, characters; keeps the reference model's 128 tokens

EMBEDDED_TASKS: dict[str, str] = {
    "topiary_continuation": (
        "Pick the true continuation of a docstring passage among four. The three wrong "
        "continuations are true continuations of other passages of the suite (each serves as a "
        "distractor about three times), so a model that ignores the context and prefers "
        "likely-looking text is at chance (25%); it measures how much the model uses the "
        "context: topic, identifiers, sentence structure."
    ),
    "topiary_order": (
        "Pick the real span of a docstring among four, with no context: the three others are "
        "the same words with one pair of them swapped, so every choice has the same words and "
        "length. It measures the model's knowledge of word order and local syntax; chance is 25%."
    ),
}


def _clean(doc: str) -> list[str]:
    """Words of a document, whitespace collapsed (line wraps and indentation become spaces)."""
    return doc.split()


def _continuation_items(docs: list[str], rng: random.Random) -> list[dict]:
    """Passages cut into (context, true continuation) pairs with three foreign distractors."""
    lo, hi = CONT_CONTEXT_WORDS
    pairs, seen = [], set()  # (doc index, context, continuation); continuations seen
    for d, doc in enumerate(docs):
        words = _clean(doc)
        for start in range(0, len(words), hi + CONT_WORDS):
            window = words[start : start + hi + CONT_WORDS]
            ctx, cont = window[:-CONT_WORDS], window[-CONT_WORDS:]
            while ctx and len(" ".join(window[-len(ctx) - CONT_WORDS :])) > MAX_CHARS:
                ctx = ctx[1:]
            if len(ctx) >= lo and len(cont) == CONT_WORDS and " ".join(cont) not in seen:
                seen.add(" ".join(cont))
                pairs.append((d, " ".join(ctx), " ".join(cont)))
    rng.shuffle(pairs)
    pairs = pairs[:CONT_ITEMS]
    picks = _distractors([p[0] for p in pairs], [p[2] for p in pairs], rng)
    items = []
    for (_, ctx, cont), others in zip(pairs, picks, strict=True):
        choices = [cont, *(pairs[j][2] for j in others)]
        rng.shuffle(choices)
        items.append({"context": ctx, "choices": choices, "label": choices.index(cont)})
    return items


def _distractors(groups: list[int], texts: list[str], rng: random.Random, k: int = 3) -> list[list[int]]:
    """For each item, ``k`` other items whose text serves as its distractors.

    Round ``r`` draws a random permutation, repaired by swaps until no item gets its own
    text, a text of its own document or one it already has; so every text is a
    distractor exactly ``k`` times and a preference that ignores the context has no
    systematic edge.
    """
    n = len(texts)
    picks: list[list[int]] = [[] for _ in range(n)]

    def fits(i: int, j: int) -> bool:
        return (
            groups[j] != groups[i] and texts[j] != texts[i] and texts[j] not in {texts[p] for p in picks[i]}
        )

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


def _order_items(docs: list[str], rng: random.Random) -> list[dict]:
    """Spans of ``ORDER_WORDS`` words and three variants with one pair of words swapped."""
    spans = []
    for doc in docs:
        words = _clean(doc)
        for start in range(0, len(words) - ORDER_WORDS + 1, 3 * ORDER_WORDS):
            span = words[start : start + ORDER_WORDS]
            if len(set(span)) >= ORDER_WORDS // 2 and len(" ".join(span)) <= MAX_CHARS // 2:
                spans.append(span)
    rng.shuffle(spans)
    items = []
    for span in spans[:ORDER_ITEMS]:
        real = " ".join(span)
        variants: list[str] = []
        while len(variants) < 3:
            i, j = sorted(rng.sample(range(ORDER_WORDS), 2))
            swapped = list(span)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            text = " ".join(swapped)
            if text != real and text not in variants:
                variants.append(text)
        choices = [real, *variants]
        rng.shuffle(choices)
        items.append({"context": "", "choices": choices, "label": choices.index(real)})
    return items


def _task_yaml(name: str, header: str, target_delimiter: str, metrics: list[str]) -> str:
    comment = "\n".join(f"# {line}" for line in _wrap(EMBEDDED_TASKS[name]))
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
        f"doc_to_text: context\n"
        f"doc_to_choice: choices\n"
        f"doc_to_target: label\n"
        f"target_delimiter: {json.dumps(target_delimiter)}\n"
        f"metric_list:\n{metric_lines}"
        f"metadata:\n  version: 1.0\n"
    )


def _wrap(text: str, width: int = 88) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, line] if line else lines


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def build_embedded_suite(out_dir: Path | str = SUITE_DIR, corpus=None) -> dict[str, int]:
    """Write the embedded zero-shot suite (task YAMLs, JSONL, manifest) to ``out_dir``.

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
    suites = {
        "topiary_continuation": (_continuation_items, " ", ["acc", "acc_norm"]),
        "topiary_order": (_order_items, "", ["acc"]),
    }
    counts = {}
    for i, (name, (make, delimiter, metrics)) in enumerate(suites.items()):
        items = make(corpus.test, random.Random(SUITE_SEED + i))
        rows = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        _atomic_write(out / f"{name}.jsonl", rows)
        _atomic_write(out / f"{name}.yaml", _task_yaml(name, header, delimiter, metrics))
        counts[name] = len(items)
    group = (
        f"{header}# The embedded suite; Topiary reports the mean of the tasks' acc.\n"
        f"group: {EMBEDDED_GROUP}\ntask:\n"
        + "".join(f"  - {name}\n" for name in suites)
        + "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: false\n"
        "metadata:\n  version: 1.0\n"
    )
    _atomic_write(out / f"{EMBEDDED_GROUP}.yaml", group)
    manifest = {
        "corpus_sha256": corpus.sha256(),
        "python": python_minor(),
        "seed": SUITE_SEED,
        "items": counts,
    }
    _atomic_write(out / "suite.json", json.dumps(manifest, indent=2) + "\n")
    loader = SUITE_DIR / "suite_data.py"
    if out.resolve() != SUITE_DIR.resolve():
        _atomic_write(out / "suite_data.py", loader.read_text(encoding="utf-8"))
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
        _atomic_write(work / f"{name}.yaml", official_task_yaml(name, path))
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

    Returns:
        ``{"tasks": {name: {"acc", "acc_stderr"[, "acc_norm", "acc_norm_stderr"]}},
        "mean_acc": mean of the tasks' acc, "mean_metric": "acc", "n": {name: items},
        "limit": limit}``; accuracies are fractions in [0, 1].
    """
    plan = check_tasks(tasks, data_dir)
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
            log_samples=False,
            bootstrap_iters=1000,  # acc is a mean: closed-form stderr, no bootstrap
        )
    return summarize(out, plan.leaves, limit)


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
