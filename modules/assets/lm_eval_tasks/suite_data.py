"""Loader of the embedded zero-shot suite's data, named by the task YAMLs beside it.

lm-eval resolves ``data_files`` against the working directory; this loader reads the
JSONL next to the YAMLs instead, so ``--include_path modules/assets/lm_eval_tasks``
works from anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path


def load(file: str, **_metadata):
    """Return ``DatasetDict(test=...)`` from ``file`` in this folder (lm-eval's custom_dataset)."""
    import datasets

    path = Path(__file__).parent / file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def greedy_target(doc: dict) -> str:
    """``topiary_greedy``'s continuation: the word after a space (lm-eval adds no delimiter
    to a loglikelihood target)."""
    return " " + doc["word"]
