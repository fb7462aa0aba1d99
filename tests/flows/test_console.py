"""A real ``topiary pipeline``'s console: Topiary's lines only; everything in the run's log file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.console import OWN

ROOT = Path(__file__).resolve().parents[2]
SETS = ["data.nsamples=8", "zeroshot.limit=5"]
# A record in the log file: "<date> <time> LEVEL logger (path:line): message"
RECORD = re.compile(r"^\S+ \S+ (INFO|WARNING)\s+(\S+) \((.+?):\d+\): (.*)$")
# The console formats of lm-eval's and MLflow's own handlers.
FOREIGN = re.compile(
    r"^\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d (INFO|WARNING)|^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARNING) "
)


def _pipeline(cwd: Path, *extra: str) -> str:
    env = {**os.environ, "PREFECT_HOME": str(cwd / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.cli", "pipeline", "--config", str(ROOT / "configs/pipeline.yaml")]
    for item in SETS:
        command += ["--set", item]
    done = subprocess.run(
        [*command, *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _log_file(console: str, cwd: Path) -> Path:
    named = re.search(r"^topiary: log: (.+)$", console, re.M)
    assert named, f"no log file named on the console:\n{console[:2000]}"
    return cwd / named.group(1)


@pytest.mark.slow
def test_the_console_carries_topiarys_lines_and_the_log_file_everything(tmp_path: Path):
    console = _pipeline(tmp_path)
    lines = console.splitlines()
    assert any("block 1/4: statistics" in line for line in lines), console[-3000:]
    assert any("ppl ratio pruned/dense" in line for line in lines), console[-3000:]
    assert not [line for line in lines if FOREIGN.search(line)], (
        "lm-eval's or MLflow's own lines on the console"
    )

    log = _log_file(console, tmp_path).read_text()
    foreign = []
    for match in map(RECORD.match, log.splitlines()):
        if match and match.group(4).strip() and not match.group(3).startswith(OWN):
            foreign.append(match.group(4).strip())
    names = {m.group(2).split(".")[0] for m in map(RECORD.match, log.splitlines()) if m}
    assert {"prefect", "lm_eval", "mlflow"} <= names, f"the log file misses a library's records: {names}"
    assert any("Overwriting default num_fewshot" in m for m in foreign)
    shown = [m for m in foreign if any(line.rstrip().endswith(m) for line in lines)]
    assert not shown, f"third-party INFO/WARNING lines on the console: {shown[:5]}"

    # --verbose: the same run again (served from the cache) shows Prefect's own lines too.
    verbose = _pipeline(tmp_path, "--verbose")
    assert "Finished in state Cached" in verbose
    assert "Finished in state Cached" in _log_file(verbose, tmp_path).read_text()
