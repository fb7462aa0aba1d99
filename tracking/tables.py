"""The sweep's results as a Markdown table and as CSV (logged as artifacts, printed by ``make sweep``)."""

from __future__ import annotations

import csv
import io
import math
from typing import TypedDict


class Baseline(TypedDict):
    """The dense model's row of a sweep table."""

    ppl: float | None
    seqlen: int | None
    """The perplexity's window length."""
    zeroshot_mean: float | None


class SweepRow(Baseline):
    """One member of a sweep: its method and setting, figures and MLflow run."""

    method: str
    setting: str
    sparsity: float | None
    run_id: str


def _num(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if math.isfinite(value) else str(value)


def sweep_markdown(rows: list[SweepRow], dense: Baseline) -> str:
    """The sweep as a Markdown table: one row per method, one column per setting.

    Each cell is ``ppl / zero-shot mean acc`` (``-`` where zero-shot is off or a member
    is missing); the dense model is the first row, the window length in the header.
    """
    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    cells = {(r["method"], r["setting"]): r for r in rows}
    window = dense.get("seqlen") or next((r.get("seqlen") for r in rows if r.get("seqlen")), None)
    header = ["method", *[f"{s}" for s in settings]]
    lines = [
        f"ppl @ window {window} / zero-shot mean acc",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(settings)) + "|",
    ]
    dense_cell = f"{_num(dense.get('ppl'), '.3f')} / {_num(dense.get('zeroshot_mean'), '.4f')}"
    lines.append("| dense | " + " | ".join([dense_cell] * len(settings)) + " |")
    for m in methods:
        row = [m]
        for s in settings:
            r = cells.get((m, s))
            row.append(
                "-" if r is None else f"{_num(r.get('ppl'), '.3f')} / {_num(r.get('zeroshot_mean'), '.4f')}"
            )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("method", "setting", "sparsity", "ppl", "seqlen", "zeroshot_mean", "run_id")


def sweep_csv(rows: list[SweepRow]) -> str:
    """The sweep as CSV, one line per member (``CSV_FIELDS``)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in CSV_FIELDS})
    return out.getvalue()
