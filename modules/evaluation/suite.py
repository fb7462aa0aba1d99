"""The embedded zero-shot suite: three tasks built from the corpus's test split.

Built deterministically from the embedded corpus's test split and committed under
``modules/assets/lm_eval_tasks`` (``python -c "from modules.evaluation.suite import
build_embedded_suite; build_embedded_suite()"`` rebuilds it byte for byte); what each
task measures is :data:`EMBEDDED_TASKS`. :mod:`modules.evaluation.zeroshot` runs it.
"""

from __future__ import annotations

import json
import random
import re
import textwrap
from pathlib import Path
from typing import Any

from modules.data.corpus import build_corpus, python_minor
from modules.process import write_file

SUITE_DIR = Path(__file__).parents[1] / "assets" / "lm_eval_tasks"
EMBEDDED_GROUP = "embedded"

SUITE_SEED = 20240601
# items per task at most (the test split gives 7633 / 1565 / 3043): as many as keep one model's
# zero-shot near 15 s on 2 cores (target 30 s)
ITEMS = {"topiary_greedy": 5000, "topiary_order": 1200, "topiary_word": 2000}
ORDER_STEP = 6  # words between the starts of two spans
ORDER_WORDS = 12  # topiary_order: words of a span
CONTEXT_WORDS = 8  # topiary_greedy and topiary_word: words of context, at least
CONTEXT_CHARS, SPAN_CHARS = 190, 110  # with _prose, context + continuation stay < 120 tokens
PROSE = 0.8  # least share of letters among a text's non-space characters (tokens ~ length)

EMBEDDED_TASKS: dict[str, str] = {
    "topiary_greedy": (
        "Predict the next word of a docstring passage, scored as LAMBADA is: the item counts "
        "only when the model's greedy (argmax) tokens after the context are exactly the "
        "word's, so the answer is ranked against the whole vocabulary, not three "
        "distractors. Contexts keep the documents' line breaks, as the model saw them in "
        "training. Chance is near 0%."
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
        "context; contexts keep the documents' line breaks. Chance is 25%; acc_norm divides "
        "by the word's length."
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


def _next_words(docs: list[str], min_len: int) -> list[tuple[int, str, str]]:
    """Every ``(doc, context, word)`` of the split where a word of letters follows text and a space.

    The context is the document's own text before the word, line breaks kept (collapsing
    them to spaces is text the model never saw: on it, Wanda 50% scored *above* dense),
    cut to at most :data:`CONTEXT_CHARS` at a whitespace boundary.
    """
    out = []
    for d, doc in enumerate(docs):
        for match in re.finditer(r"(?<=\S) ([A-Za-z]+)\b", doc):  # a space after text, then letters
            word, context = match.group(1), doc[: match.start()]
            if len(context) > CONTEXT_CHARS:
                tail = context[-CONTEXT_CHARS:]
                context = tail[next((i for i, c in enumerate(tail) if c.isspace()), len(tail)) :].lstrip()
            if len(context.split()) >= CONTEXT_WORDS and len(word) >= min_len and _prose(context):
                out.append((d, context, word))
    return out


def _greedy_items(docs: list[str], rng: random.Random) -> list[dict]:
    """(context, next word) pairs, words of two letters or more."""
    pairs = _next_words(docs, 2)
    rng.shuffle(pairs)
    return [{"context": context, "word": word} for _, context, word in pairs[: ITEMS["topiary_greedy"]]]


def _word_items(docs: list[str], rng: random.Random) -> list[dict]:
    """(context, next word) pairs; each context gets its word and three foreign words."""
    pairs = _next_words(docs, 3)[::2]  # every other word: neighbouring contexts overlap
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
            if len(set(span)) >= ORDER_WORDS // 2 and len(text) <= SPAN_CHARS and _prose(text):
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


# name -> (builder, doc_to_text, doc_to_choice (None: loglikelihood), doc_to_target, target_delimiter,
# metrics); a loglikelihood task's acc is lm-eval's is_greedy, and lm-eval adds no delimiter there.
# The greedy target is a function, not a Jinja template: lm-eval compiles a template anew on every
# call (three per item).
_SUITE = {
    "topiary_greedy": (_greedy_items, "context", None, "!function suite_data.greedy_target", "", ["acc"]),
    "topiary_order": (_order_items, "context", "choices", "label", "", ["acc"]),
    "topiary_word": (_word_items, "context", "choices", "label", " ", ["acc", "acc_norm"]),
}


def item_requests(name: str, row: dict[str, Any]) -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval scores for one item of task ``name`` (a line of
    its JSONL: ``context`` and ``word`` or ``choices``)."""
    if name == "topiary_greedy":  # one request; lm-eval adds no delimiter to a loglikelihood target
        return [(row["context"], " " + row["word"])]
    delimiter = _SUITE[name][4]
    return [(row["context"], delimiter + choice) for choice in row["choices"]]


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
        f"output_type: {'loglikelihood' if choice is None else 'multiple_choice'}\n"
        f"test_split: test\n"
        f"doc_to_text: {text}\n"
        + ("" if choice is None else f"doc_to_choice: {choice}\n")
        + f"doc_to_target: {target if target.startswith('!function') else json.dumps(target)}\n"
        f"target_delimiter: {json.dumps(delimiter)}\n"
        f"metric_list:\n{metric_lines}"
        f"metadata:\n  version: 1.0\n"
    )


def build_embedded_suite(out_dir: Path | str = SUITE_DIR, corpus=None) -> dict[str, int]:
    """Write the embedded zero-shot suite (task YAMLs, JSONL, manifest) to ``out_dir``.

    Items come from the corpus's test split (never seen in training), at most
    :data:`ITEMS` per task; prose only (numbers and tables cost many tokens). Contexts
    keep the documents' line breaks; ``topiary_order``'s spans are words joined by single
    spaces. Distractors of ``topiary_word`` are other items' gold words, each used exactly
    three times (:func:`_distractors`).

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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus or build_corpus()
    header = (
        "# Generated by modules.evaluation.suite.build_embedded_suite from the embedded corpus's test\n"
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
