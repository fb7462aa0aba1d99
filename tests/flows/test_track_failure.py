"""Tracking never loses work: a store that fails at the end leaves the results in the cache.

A real ``topiary pipeline`` tracks into a real MLflow SQLite store that is made read-only
(``chattr +i``, which binds root too, or without write permission for another user) once
the prune is done: after the preflight's write probe passed, before the track
step. The run must end with one line naming the store, exit 2; the same command, once the
store is writable again, must track the run and recompute nothing (every step before
``track`` cached, the pruned model's files untouched).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from configs.schema import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[2]
CACHED_STEPS = ("calibration", "prune", "ppl_dense", "ppl_pruned", "paired")


def _lock(store: Path, on: bool) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(store)], check=True)
    else:
        store.chmod(0o444 if on else 0o644)


@pytest.fixture
def store(tmp_path) -> Path:
    """An empty SQLite file (MLflow makes its tables in it on the first use)."""
    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    store.touch()
    if os.geteuid() == 0 and (
        shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(store)]).returncode
    ):
        pytest.skip("root, and this file system cannot make a file immutable")
    _lock(store, False)
    yield store
    _lock(store, False)


def _command(work: Path, store: Path, eval_text: Path) -> list[str]:
    sets = {
        "prune.method": "wanda",
        "data.nsamples": 4,
        "data.seqlen": 32,
        "data.eval": str(eval_text),
        "data.eval_seqlen": 32,
        "zeroshot.enabled": "false",
        "work_dir": str(work),
        "tracking.uri": f"sqlite:///{store}",
        "tracking.experiment": "track-failure",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "pipeline",
        "--config",
        str(CONFIG_DIR / "pipeline.yaml"),
        *args,
    ]


def _run(argv: list[str], cwd: Path, when: str | None = None, then=None) -> tuple[int, str]:
    """Run ``argv``; call ``then()`` once a line holds ``when``. Returns (exit status, output)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if when and when in line:
            then()
            when = None
    return proc.wait(timeout=600), "".join(lines)


def _files(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_store_failing_at_the_end_loses_nothing_and_a_re_run_only_tracks(tmp_path, store):
    work, cwd = tmp_path / "work", tmp_path / "cwd"
    cwd.mkdir()
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text("Return the sum of a and b, raising TypeError for strings.\n" * 30)
    argv = _command(work, store, eval_text)

    status, out = _run(argv, cwd, when="prune: done", then=lambda: _lock(store, True))
    _lock(store, False)
    (tmp_path / "first-run.log").write_text(out)
    errors = [line for line in out.splitlines() if line.startswith("topiary: error")]
    assert status == 2, out[-3000:]
    assert len(errors) == 1 and str(store) in errors[0] and "re-run the same command" in errors[0], errors
    assert "Traceback" not in out
    models = work / "models"
    pruned = _files(models)
    assert pruned, "the pruned model is kept"

    status, out = _run(argv, cwd)
    assert status == 0, out[-3000:]
    for step in CACHED_STEPS:
        assert f"{step}: cached" in out, f"{step} was recomputed:\n{out[-3000:]}"
    assert "track: done" in out and "prune: done" not in out
    assert _files(models) == pruned, "the pruned model was written again"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("track-failure")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
