"""What produced a figure: Topiary's commit, the library versions, device, precision, threads.

:func:`provenance` builds one flat dict of strings that is recorded with every result:
the pruning report, each evaluation (and so ``evaluation.json``), the MLflow run's params
and tags, and the registry listing. Mismatched figures between two machines are then
traced to an lm-eval upgrade, another dtype or a dirty tree by reading, not by guessing.

It is never part of a cache key: the code fingerprint (``tasks.cache.code_fingerprint``)
already covers the code that computes results, and a dirty flag that flips with every
edit of a README would otherwise invalidate every cached step. A cached result keeps the
provenance of the run that computed it, which is what produced its figures.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "lm_eval", "prefect", "mlflow")  # distribution names
KEYS = (
    "topiary_commit",
    "topiary_dirty",
    "python",
    *PACKAGES,
    "device",
    "device_name",
    "dtype",
    "torch_threads",
)
NOT_A_CHECKOUT = "not a git checkout"
UNKNOWN = "unknown"


def _git(root: Path, *args: str) -> str | None:
    """stdout of ``git -C root ARGS``, or None when git is missing or fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(root: str | Path = ROOT) -> tuple[str, str]:
    """``(commit, dirty)`` of the Topiary checkout at ``root``.

    ``dirty`` is ``"true"`` when a tracked file differs from the commit or a file that is
    neither committed nor ignored exists (``git status --porcelain``), else ``"false"``.
    Outside a git checkout of ``root`` itself (an installed copy, or a folder inside some
    other repository) the commit is ``"not a git checkout"`` and ``dirty`` ``"unknown"``;
    without a ``git`` program, both are ``"unknown"``.
    """
    root = Path(root).resolve()
    try:
        subprocess.run(["git", "--version"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN, UNKNOWN
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root:
        return NOT_A_CHECKOUT, UNKNOWN
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain")
    if commit is None:  # a repository without any commit yet
        return NOT_A_CHECKOUT, UNKNOWN
    return commit.strip(), UNKNOWN if status is None else str(bool(status.strip())).lower()


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``"not installed"``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def device_names(device: torch.device | str | None) -> tuple[str, str]:
    """``(device, device_name)``: ``("cuda:0", "NVIDIA H200")`` or ``("cpu", "x86_64, 16 cores")``."""
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index}", torch.cuda.get_device_name(index)
    return str(dev), f"{platform.machine() or UNKNOWN}, {os.cpu_count() or '?'} cores"


def provenance(
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    admm_precision: str | None = None,
    root: str | Path = ROOT,
) -> dict[str, str]:
    """The provenance record of a result computed now, in this process.

    Args:
        device: Where the model ran (``cpu``, ``cuda:0``); default ``cpu``.
        dtype: The model's dtype (``torch.float32`` or ``"bfloat16"``); None: ``"unknown"``.
        admm_precision: ADMM's resolved product precision (``fp32``/``mixed``), recorded
            only when given (an ADMM method ran).
        root: The Topiary checkout whose commit is recorded.

    Returns:
        :data:`KEYS` (plus ``admm_precision`` when given) mapped to strings.
    """
    commit, dirty = git_state(root)
    dev, name = device_names(device)
    record = {
        "topiary_commit": commit,
        "topiary_dirty": dirty,
        "python": platform.python_version(),
        **{pkg: package_version(pkg) for pkg in PACKAGES},
        "device": dev,
        "device_name": name,
        "dtype": UNKNOWN if dtype is None else str(dtype).removeprefix("torch."),
        "torch_threads": str(torch.get_num_threads()),
    }
    if admm_precision is not None:
        record["admm_precision"] = admm_precision
    return record


def merge(records: dict[str, dict | None]) -> dict[str, str]:
    """One record for results that came from several steps (``{step: record}``).

    A value all steps agree on is kept as is; one where they differ (a cached dense
    baseline computed under an older lm-eval, say) becomes ``"step=value; ..."``, so the
    difference shows instead of being averaged away. Steps without a record are skipped.
    """
    present = {step: r for step, r in records.items() if r}
    keys = list(dict.fromkeys(k for r in present.values() for k in r))
    merged = {}
    for key in keys:
        values = {step: r[key] for step, r in present.items() if key in r}
        distinct = set(values.values())
        merged[key] = (
            distinct.pop() if len(distinct) == 1 else "; ".join(f"{s}={v}" for s, v in values.items())
        )
    return merged


def summary(record: dict[str, str]) -> str:
    """A record on one line: ``topiary 1a2b3c4d5e6f (dirty), python 3.11.7, torch 2.13.0, ...``."""
    if not record:
        return "no provenance recorded"
    commit = record.get("topiary_commit", UNKNOWN)
    short = commit[:12] if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit) else commit
    dirty = " (dirty)" if record.get("topiary_dirty") == "true" else ""
    parts = [f"topiary {short}{dirty}", f"python {record.get('python', UNKNOWN)}"]
    parts += [f"{pkg} {record.get(pkg, UNKNOWN)}" for pkg in PACKAGES]
    parts.append(f"{record.get('device', UNKNOWN)} ({record.get('device_name', UNKNOWN)})")
    parts.append(record.get("dtype", UNKNOWN))
    if "admm_precision" in record:
        parts.append(f"admm {record['admm_precision']}")
    parts.append(f"{record.get('torch_threads', UNKNOWN)} threads")
    return ", ".join(parts)
