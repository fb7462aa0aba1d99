"""PNG plots of a run (per-block sparsity and reconstruction error) and of a sweep.

Figures are drawn with matplotlib's Agg canvas directly, without ``pyplot``: no global
backend state, safe in worker threads and processes, no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path

from modules.process import building

# matplotlib loads inside the function that draws: heavy, and only a tracked run draws.


def _figure(rows: int, width: float = 7.0, height: float = 2.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    """Write to a temporary name, then rename: no half-written PNG is left behind."""
    path = Path(path)
    with building(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def plot_blocks(blocks: list[dict], path: str | Path, title: str = "") -> Path:
    """Bar charts of achieved sparsity and reconstruction error per decoder block.

    Args:
        blocks: one dict per block with ``index``, ``sparsity`` (a fraction) and, when the
            method measured it, ``recon_error`` (None or missing where it did not).
        path: where to write the PNG.
        title: shown above the figure (e.g. ``wanda 0.5``).

    Returns:
        The path of the PNG.
    """
    if not blocks:
        raise ValueError("plot_blocks: no blocks to plot")
    index = [int(b["index"]) for b in blocks]
    errors = [b.get("recon_error") for b in blocks]
    has_error = any(e is not None for e in errors)
    fig = _figure(2 if has_error else 1)
    axes = fig.subplots(2 if has_error else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].bar(index, [float(b["sparsity"]) for b in blocks], color="tab:green")
    axes[0].set_ylabel("sparsity")
    axes[0].set_ylim(0, 1)
    axes[0].grid(axis="y", alpha=0.3)
    if has_error:
        values = [math.nan if e is None else float(e) for e in errors]
        axes[1].bar(index, values, color="tab:red")
        axes[1].set_ylabel("reconstruction error")
        if all(v > 0 for v in values if not math.isnan(v)):
            axes[1].set_yscale("log")
        axes[1].grid(axis="y", alpha=0.3)
    axes[-1].set_xlabel("decoder block")
    if len(index) <= 32:  # one tick per block while they stay readable
        axes[-1].set_xticks(index)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_ppl_vs_sparsity(
    points: list[dict], path: str | Path, dense_ppl: float | None = None, title: str = ""
) -> Path:
    """Perplexity against achieved sparsity, one line per method (log scale when positive).

    Args:
        points: dicts with ``method``, ``sparsity`` (achieved, a fraction) and ``ppl``.
            N:M settings are plotted at their achieved sparsity like any other.
        path: where to write the PNG.
        dense_ppl: the unpruned model's perplexity, drawn as a dashed line.
        title: shown above the plot.

    Returns:
        The path of the PNG.
    """
    if not points:
        raise ValueError("plot_ppl_vs_sparsity: no points to plot")
    fig = _figure(1, height=4.0)
    ax = fig.subplots()
    methods = sorted({str(p["method"]) for p in points})
    for method in methods:
        mine = sorted((float(p["sparsity"]), float(p["ppl"])) for p in points if str(p["method"]) == method)
        ax.plot([s for s, _ in mine], [q for _, q in mine], marker="o", label=method)
    if dense_ppl is not None:
        ax.axhline(float(dense_ppl), color="black", linestyle="--", linewidth=1, label="dense")
    finite = [float(p["ppl"]) for p in points if math.isfinite(float(p["ppl"]))]
    if finite and all(v > 0 for v in finite):
        ax.set_yscale("log")
    ax.set_xlabel("achieved sparsity")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)
