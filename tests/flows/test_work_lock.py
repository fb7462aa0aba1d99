"""One run per work folder, with real ``topiary`` processes on the embedded model.

A ``topiary prune`` is stopped (SIGSTOP) in its first block, holding its work folder. Meanwhile:
a second ``topiary prune`` on the same folder (another ``--output``) waits, saying which pid,
command and since when holds it; ``topiary clean`` waits too and leaves the running prune's
state alone; with ``--no-wait`` both refuse at once, exit 2, with that line. Once the first
prune goes on (SIGCONT), every command ends well and both outputs are the same bytes. A read
(``topiary validate``) runs alongside without waiting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import output_digests, wait_for_log

ROOT = Path(__file__).resolve().parents[2]
PRUNE = ["prune", "embedded", "--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "16",
         "--seqlen", "32", "--device", "cpu"]  # fmt: skip
HOLDER = "topiary prune embedded --method sparsegpt"


def _env(tmp: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp / "tmp")}
    env.pop("TOPIARY_TEST_PAUSE_AT", None)
    (tmp / "tmp").mkdir(exist_ok=True)
    return env


def _start(tmp: Path, name: str, args: list[str]) -> subprocess.Popen:
    err = open(tmp / f"{name}.err", "w")  # noqa: SIM115 - the process writes it
    command = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.Popen(command, cwd=tmp, env=_env(tmp), stdout=err, stderr=err)


def _refused(tmp: Path, args: list[str], holder: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args, "--no-wait"],
        cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert f"is in use by pid {holder} ({HOLDER}" in line and " since " in line, line


@pytest.mark.slow
def test_commands_on_one_work_folder_wait_for_the_running_prune_and_all_end_well(tmp_path):
    work = str(tmp_path / "work")
    first = _start(tmp_path, "first", [*PRUNE, "--output", str(tmp_path / "first"), "--work-dir", work])
    wait_for_log(first, tmp_path / "first.err", "block 1/4: statistics", timeout=300, poll=0.2)
    os.kill(first.pid, signal.SIGSTOP)  # mid-prune, holding the work folder
    try:
        runs = list((tmp_path / "work" / "runs").iterdir())
        second = _start(
            tmp_path, "second", [*PRUNE, "--output", str(tmp_path / "second"), "--work-dir", work]
        )
        cleaner = _start(tmp_path, "clean", ["clean", "--work-dir", work])
        for proc, name in ((second, "second"), (cleaner, "clean")):
            wait_for_log(proc, tmp_path / f"{name}.err", f"is in use by pid {first.pid} ({HOLDER}", 300, 0.2)
        read = [sys.executable, "-m", "flows.cli", "validate", str(ROOT / "configs" / "pipeline.yaml")]
        read += ["--set", f"work_dir={work}"]  # a read: it takes no lock, so it does not wait
        assert subprocess.run(read, cwd=tmp_path, env=_env(tmp_path), timeout=60).returncode == 0
        _refused(tmp_path, ["clean", "--work-dir", work], first.pid)
        _refused(tmp_path, [*PRUNE, "--output", str(tmp_path / "third"), "--work-dir", work], first.pid)
        time.sleep(1)
        assert second.poll() is None and cleaner.poll() is None, "a second command did not wait"
        assert runs and all(run.is_dir() for run in runs), "the running prune's state was removed"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    for proc, name in ((first, "first"), (second, "second"), (cleaner, "clean")):
        assert proc.wait(timeout=600) == 0, f"{name}:\n{(tmp_path / f'{name}.err').read_text()[-3000:]}"
    assert not (tmp_path / "third").exists()
    digests = output_digests(tmp_path / "first")
    assert any(name.startswith("masks/") for name in digests)
    assert output_digests(tmp_path / "second") == digests
