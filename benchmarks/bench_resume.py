"""What checking the resume state costs a resumed ``topiary prune``, with and without the checks.

``python -m benchmarks.bench_resume`` builds a random LLaMA checkpoint
(:mod:`benchmarks.make_checkpoint`), starts ``topiary prune`` on it and SIGKILLs it in the
statistics of block ``--kill-at``; then it runs the same command twice from copies of that
state, each in a fresh process:

1. as shipped: the records and every file they name are verified before reuse, and each
   new record hashes its files (:mod:`modules.engine.state`);
2. with both switched off in that process alone (the records read as they are, no hashes
   written): what a resumed run cost before the checks.

Run 1 also times, inside its process, every call of the checks (the verification and the
hashing of new records): on a shared machine the two walls differ by more than the checks
cost, so the added share is ``checks / (wall - checks)`` of run 1, the ratio of the walls
beside it. It prints both, the bytes the verification read, and whether the two outputs are
the same bytes. Nothing is asserted; the issue's target is at most 5% added.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.make_checkpoint import make_checkpoint
from modules.engine.state import verified_records

ROOT = Path(__file__).resolve().parents[1]
CHECKED = """
import atexit, sys, time
import modules.engine.loop as loop

spent = [0.0]

def timed(fn):
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start
    return call

loop.verified_records = timed(loop.verified_records)
loop.describe = timed(loop.describe)
atexit.register(lambda: print(f"CHECKS_SECONDS {spent[0]:.4f}", file=sys.stderr, flush=True))
sys.argv[0] = "topiary"
from flows.cli import console
console()
"""
UNCHECKED = """
import json, sys
import modules.engine.loop as loop
from modules.engine.state import record_path

def unchecked(folder, blocks, log):  # the records as they are: no verification, nothing rebuilt
    paths = [record_path(folder, i) for i in range(blocks)]
    return [json.loads(p.read_text()) for p in paths if p.is_file()], False

loop.verified_records = unchecked
loop.describe = lambda folder, paths: {}  # no hashes in the new records
sys.argv[0] = "topiary"
from flows.cli import console
console()
"""


def _env(base: Path) -> dict[str, str]:
    from modules.env import RUN

    env = {**RUN, **os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(base / "tmp")}
    env.pop("TOPIARY_TEST_PAUSE_AT", None)
    (base / "tmp").mkdir(exist_ok=True)
    return env


def _kill_at(command: list[str], env: dict[str, str], stage: str, log: Path) -> None:
    """Run ``command`` until it pauses at ``stage`` (the test hook), then SIGKILL it."""
    with open(log, "w") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env={**env, "TOPIARY_TEST_PAUSE_AT": stage}, stderr=err)
    while f"TOPIARY_PAUSED {stage.partition('@')[0]} {proc.pid}" not in log.read_text():
        if proc.poll() is not None:
            sys.exit(f"bench-resume: the run ended before {stage}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of ``command`` and its stderr."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench-resume: `{' '.join(command[:4])} ...` failed:\n{done.stderr[-3000:]}")
    return seconds, done.stderr


def _restore(backup: Path, work: Path) -> None:
    """The killed run's work folder back in place (its records name files by this path)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(backup, work)


def _weights(out: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(out.glob("model*.safetensors")) + sorted(out.glob("masks/*")):
        h.update(path.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    """Kill once, resume twice (checked, unchecked) and print the figures."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_resume", description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument(
        "--kill-at", type=int, default=4, help="the block (1-based) whose statistics the kill stops"
    )
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="topiary-bench-resume-"))
    env = _env(base)
    try:
        dims = {"blocks": args.blocks, "hidden": args.hidden, "intermediate": args.intermediate}
        model = make_checkpoint(base / "model", **dims, heads=args.heads, dtype="float32")
        work = base / "work"
        prune = [sys.executable, "-m", "flows.cli", "prune", str(base / "model"), "--method", args.method,
                 "--sparsity", "0.5", "--nsamples", str(args.nsamples), "--calib", "embedded",
                 "--device", "cpu", "--work-dir", str(work)]  # fmt: skip
        _kill_at(
            [*prune, "--output", str(base / "killed")], env, f"statistics@{args.kill_at}", base / "kill.err"
        )
        shutil.copytree(work, base / "work.bak")
        _restore(base / "work.bak", work)
        (run,) = (work / "runs").iterdir()
        start = time.perf_counter()
        records, _ = verified_records(run, args.blocks, logging.getLogger("bench"))
        verify = time.perf_counter() - start
        read = sum(f["size"] for r in records for f in (*r["files"].values(), *r["inputs_file"].values()))
        unchecked, _ = _timed(
            [sys.executable, "-c", UNCHECKED, *prune[3:], "--output", str(base / "off")], env
        )
        _restore(base / "work.bak", work)
        checked, err = _timed([sys.executable, "-c", CHECKED, *prune[3:], "--output", str(base / "on")], env)
        checks = float(err.split("CHECKS_SECONDS")[1].split()[0])
    finally:
        same = (base / "on").is_dir() and _weights(base / "on") == _weights(base / "off")
        shutil.rmtree(base, ignore_errors=True)
    what = f"{args.method} on a {args.blocks}-block LLaMA ({model['bytes'] / 1e6:.0f} MB fp32), "
    what += f"{args.nsamples} windows, killed in block {args.kill_at}"
    print(f"bench-resume: {what}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"  resumed, state checked:    {checked:7.2f} s, of which the checks {checks:.3f} s")
    print(f"  resumed, unchecked:        {unchecked:7.2f} s")
    print(f"  added by the checks:       {100 * checks / (checked - checks):7.2f} %  (target <= 5%)")
    print(f"  ratio of the walls:        {checked / unchecked:7.3f}  (one run each: the machine's noise)")
    print(f"  verification alone:        {verify:7.3f} s, {len(records)} records, {read / 1e6:.0f} MB read")
    print(f"  outputs identical:         {same}")


if __name__ == "__main__":
    main()
