"""SIGINT and SIGTERM end a real ``topiary pipeline`` wherever they arrive, promptly and completely.

Each case is a real ``python -m flows.cli pipeline`` process on the embedded model (4
calibration windows of 32 tokens), started with SIGINT at its default disposition, or
ignored (as a job that a script starts with ``&`` inherits it: Python then never raises
``KeyboardInterrupt``, and the CLI must handle SIGINT itself). The signal lands at one
moment of the run:

- in the prune, inside a Lightning statistics pass (Lightning turns a ``KeyboardInterrupt``
  there into ``sys.exit(1)``), and after the statistics of a block (the test hook
  ``TOPIARY_TEST_PAUSE_AT``);
- at the start of the first evaluation stage (``ppl-dense``), as soon as the flow logs the
  prune step's end (``prune: done`` or ``prune: cached``);
- in lm-eval's zero-shot loop (the embedded suite, 40 items per task);
- in tracking, its MLflow run open (the test hook).

Each must exit within :data:`LIMIT_S` seconds with 130 (SIGINT) or 143 (SIGTERM) and one
line saying so, and every process of the run's tree at the time of the signal (the
temporary Prefect server among them) must be gone by then. The cases share one work folder,
so that the later ones find calibration and prune in the cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import wait_for_log

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 10.0  # seconds from the signal to the exit of the run and of every process it started
SETS = ["data.nsamples=4", "data.seqlen=32", "zeroshot.enabled=false"]
ZEROSHOT = ["zeroshot.enabled=true", "zeroshot.limit=40"]
LINES = {signal.SIGINT: "topiary: interrupted", signal.SIGTERM: "topiary: terminated"}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ignored_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Pipeline:
    """One ``topiary pipeline`` in ``cwd`` (its stderr in a file), in a session of its own."""

    def __init__(
        self, cwd: Path, name: str, sets: list[str], pause: str | None, inherit=_default_sigint
    ) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(cwd / "tmp")}
        env.pop("PREFECT_API_URL", None)
        env.pop("TOPIARY_TEST_PAUSE_AT", None)
        env["PREFECT_HOME"] = str(cwd / "prefect-home")
        if pause:
            env["TOPIARY_TEST_PAUSE_AT"] = pause
        (cwd / "tmp").mkdir(exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "flows.cli",
            "pipeline",
            "--config",
            str(ROOT / "configs/pipeline.yaml"),
        ]
        for item in sets:
            command += ["--set", item]
        self.stderr = cwd / f"{name}.err"
        with open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=err, stderr=err, preexec_fn=inherit
            )

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 600) -> None:
        wait_for_log(self.proc, self.stderr, text, timeout, poll=0.05)

    def signal_and_wait(self, sig: int) -> tuple[int, float, list[str]]:
        """Send ``sig``; the exit status, the seconds until the run and its whole tree were gone,
        and the command lines of the tree's processes still alive :data:`LIMIT_S` s after the signal."""
        tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        assert any("flows.server" in " ".join(p.cmdline()) for p in tree), "no temporary Prefect server"
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            status = self.proc.wait(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            status = None
        _, alive = psutil.wait_procs(tree, timeout=max(0.0, start + LIMIT_S - time.monotonic()))
        seconds = time.monotonic() - start
        left = [" ".join(p.cmdline()[:4]) for p in alive if p.is_running()]
        for p in alive:  # the test fails, and leaves nothing running either
            p.kill()
        psutil.wait_procs(alive, timeout=10)
        return status, seconds, left


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("signals")


# (where, signal, test hook, text to wait for, config overrides), in order. The prune cases
# prune at rates of their own, so that each prunes afresh; the later ones share the cache.
PASS = ("statistics-pass@2", "TOPIARY_PAUSED statistics-pass")
CASES = [
    ("lightning-pass", signal.SIGINT, *PASS, ["prune.sparsity=0.3"]),
    ("prune-statistics", signal.SIGTERM, "statistics@2", "TOPIARY_PAUSED statistics", ["prune.sparsity=0.4"]),
    ("start-of-ppl-dense", signal.SIGINT, None, "prune: ", []),
    ("start-of-ppl-dense", signal.SIGTERM, None, "prune: ", []),
    ("sigint-inherited-ignored", signal.SIGINT, None, "prune: ", []),
    ("zeroshot-loop", signal.SIGTERM, None, "Running loglikelihood requests", ZEROSHOT),
    ("tracking", signal.SIGINT, "track", "TOPIARY_PAUSED track", []),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "sig", "pause", "marker", "sets"),
    CASES,
    ids=[f"{c[0]}-{signal.Signals(c[1]).name}" for c in CASES],
)
def test_a_signal_ends_the_pipeline_and_its_processes_promptly(work, where, sig, pause, marker, sets):
    name = f"{where}-{signal.Signals(sig).name}"
    inherit = _ignored_sigint if where == "sigint-inherited-ignored" else _default_sigint
    run = Pipeline(work, name, SETS + sets, pause, inherit)
    run.wait_for(marker)
    status, seconds, left = run.signal_and_wait(sig)
    assert status == 128 + sig, (
        f"exit {status} after {signal.Signals(sig).name} at {where}:\n{run.log()[-3000:]}"
    )
    assert not left, f"left running {LIMIT_S} s after {signal.Signals(sig).name} at {where}: {left}"
    assert seconds < LIMIT_S
    print(f"{name}: exit {status}, run and its tree gone {seconds:.1f} s after the signal")
    lines = [line for line in run.log().splitlines() if line.strip()]
    assert lines[-1] == LINES[sig] and lines.count(LINES[sig]) == 1, lines[-5:]


def test_an_error_raised_while_prefect_handles_its_signal_exception_is_that_signal():
    """A SIGTERM that Prefect's handler takes while a task run starts reaches the CLI as the
    ValueError its crash handling raises ("Task run is not set"), the signal's exception in its
    context: the exit status is still SIGTERM's. An error with no signal behind it is not."""
    from prefect.exceptions import TerminationSignal

    from flows.cli import _signal_in

    try:
        try:
            raise TerminationSignal(signal.SIGTERM)
        except BaseException:
            raise ValueError("Task run is not set")  # noqa: B904 - as Prefect raises it
    except ValueError as err:
        assert _signal_in(err) == signal.SIGTERM
    assert _signal_in(ValueError("a bug")) is None
