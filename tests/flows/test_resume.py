"""Kill a real ``topiary prune`` at three points, re-run it, and get an uninterrupted run's bytes.

Each run is a real ``python -m flows.cli prune`` process on the embedded model (4 decoder
blocks) with ADMM on Wanda's mask, so every block has statistics, masks, an update and a
propagation. The test hook ``TOPIARY_TEST_PAUSE_AT=<stage>@<n>`` stops the run the n-th
time it reaches ``stage``; the test then SIGKILLs it there:

1. during the statistics of block 3 (of 4), after blocks 1-2 are durable;
2. during ADMM's update of block 2 (its first linear computed, its file partly written);
3. during the write of block 3's output shard (written under its temporary name).

After each kill the same command is run again: it says ``resuming at block k/n``, goes on
from the first unfinished block, and its output's weight files and keep-masks (``masks/``,
one file per block, the finished blocks' too) equal, byte for byte, an uninterrupted run's.
The resume state is gone once a run completes.

GBLM's gradient step resumes the same way: killed in its backward, after the top segment
(blocks 3-4 of 4), the re-run goes on from the upstream gradient it saved there.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import output_digests, wait_for_log

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["prune", "embedded", "--method", "admm", "--sparsity", "0.5", "--option", "selector=wanda",
        "--option", "iters=5", "--nsamples", "4", "--seqlen", "32", "--device", "cpu"]  # fmt: skip


def _run(
    tmp: Path, name: str, pause: str | None = None, args: list[str] = ARGS, paths: bool = True
) -> subprocess.Popen:
    """``python -m flows.cli *args`` in ``tmp``, its output in ``tmp/<name>.err``; with ``paths``
    its ``--output`` and ``--work-dir`` are ``tmp/<name>/out`` and ``tmp/<name>/work``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp / "tmp")}
    env.pop("TOPIARY_TEST_PAUSE_AT", None)
    if pause:
        env["TOPIARY_TEST_PAUSE_AT"] = pause
    (tmp / "tmp").mkdir(exist_ok=True)
    command = [sys.executable, "-m", "flows.cli", *args]
    if paths:
        command += ["--output", str(tmp / name / "out"), "--work-dir", str(tmp / name / "work")]
    err = open(tmp / f"{name}.err", "a")  # noqa: SIM115 - the process writes it
    return subprocess.Popen(command, cwd=tmp, env=env, stdout=err, stderr=err)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("baseline")
    proc = _run(tmp, "base")
    assert proc.wait(timeout=900) == 0, (tmp / "base.err").read_text()[-3000:]
    assert not (tmp / "base" / "work" / "runs").exists() or not any(
        (tmp / "base" / "work" / "runs").iterdir()
    )
    digests = output_digests(tmp / "base" / "out")
    assert len([k for k in digests if k.startswith("masks/")]) == 4, "the baseline has no mask per block"
    return digests


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pause", "resumes_at"),
    [("statistics@3", 3), ("update@2", 2), ("streaming-shard@3", 3)],
    ids=["statistics-of-block-3", "admm-update-of-block-2", "write-of-block-3"],
)
def test_a_killed_prune_resumes_and_gives_the_same_bytes(baseline, tmp_path, pause, resumes_at):
    proc = _run(tmp_path, "run", pause)
    log = tmp_path / "run.err"
    wait_for_log(proc, log, f"TOPIARY_PAUSED {pause.partition('@')[0]} {proc.pid}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "run" / "out").exists(), "a killed run left an output"
    runs = tmp_path / "run" / "work" / "runs"
    assert any(runs.iterdir()), "the killed run left no resume state"

    again = _run(tmp_path, "run")
    assert again.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert f"resuming at block {resumes_at}/4" in log.read_text()
    assert output_digests(tmp_path / "run" / "out") == baseline  # weights and every block's masks
    assert not any(runs.iterdir()), "the resume state outlived the run"


GBLM = ["prune", "embedded", "--method", "gblm", "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "32",
        "--device", "cpu"]  # fmt: skip


@pytest.mark.slow
def test_a_prune_killed_in_its_gradient_step_resumes_it_and_gives_the_same_bytes(tmp_path):
    base = _run(tmp_path, "base", args=GBLM)
    assert base.wait(timeout=900) == 0, (tmp_path / "base.err").read_text()[-3000:]
    proc = _run(tmp_path, "run", "gradients-backward@2", args=GBLM)
    log = tmp_path / "run.err"
    wait_for_log(proc, log, f"TOPIARY_PAUSED gradients-backward {proc.pid}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    work = tmp_path / "run" / "work"
    assert not (work / "gradients").exists() or not any((work / "gradients").iterdir())
    assert any((work / "runs").iterdir()), "the killed gradient step left no resume state"

    again = _run(tmp_path, "run", args=GBLM)
    assert again.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert "gradients: resuming the backward at block 2/4" in log.read_text()
    assert output_digests(tmp_path / "run" / "out") == output_digests(tmp_path / "base" / "out")
    assert _tree(work / "gradients") == _tree(tmp_path / "base" / "work" / "gradients")
    assert not any((work / "runs").iterdir()), "the resume state outlived the run"


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.*"))
    }
