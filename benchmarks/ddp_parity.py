"""One process against several: ``topiary prune --devices N`` on the embedded model, per method.

``python -m benchmarks.ddp_parity`` prunes the embedded model with each method at 50% on 1
and on N gloo processes (``--devices N``, CPU), each run a fresh ``topiary prune`` into its
own temporary output and work folder, and prints per method: whether the keep-masks (the
zeros of every pruned linear) are equal, the worst relative weight difference
``max |W1 - WN| / max |W1|`` over the model's tensors, and the wall-time ratio N / 1. The
ranks split the calibration windows and all-reduce their sums, so only the order of the
floating-point additions differs between the runs; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("magnitude", "wanda", "sparsegpt", "gblm", "admm", "admm-grad")


def _prune(base: Path, method: str, devices: int, nsamples: int) -> tuple[Path, float]:
    """Output folder and wall seconds of one ``topiary prune`` in a fresh process."""
    out, work = base / f"{method}-{devices}", base / f"work-{method}-{devices}"
    command = [sys.executable, "-m", "flows.cli", "prune", "embedded", "--method", method]
    command += ["--sparsity", "0.5", "--nsamples", str(nsamples), "--device", "cpu"]
    command += ["--devices", str(devices), "--output", str(out), "--work-dir", str(work)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"ddp-parity: `{' '.join(command[2:])}` failed:\n{done.stderr[-3000:]}")
    return out, seconds


def _compare(one: Path, many: Path) -> tuple[bool, float]:
    """(every tensor's zeros equal, worst max |a - b| / max |a|) of two saved models."""
    from safetensors.torch import load_file

    masks_equal, worst = True, 0.0
    for shard in sorted(one.glob("*.safetensors")):
        a, b = load_file(shard), load_file(many / shard.name)
        for name, x in a.items():
            y = b[name].float()
            x = x.float()
            masks_equal &= bool(((x == 0) == (y == 0)).all())
            scale = x.abs().max().item() or 1.0
            worst = max(worst, (x - y).abs().max().item() / scale)
    return masks_equal, worst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ddp_parity", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--devices", type=int, default=2, help="processes of the second run (default: 2)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default: 16)")
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="topiary-ddp-parity-"))
    rows = []
    try:
        for method in args.methods.split(","):
            one, t1 = _prune(base, method, 1, args.nsamples)
            many, tn = _prune(base, method, args.devices, args.nsamples)
            rows.append((method, *_compare(one, many), tn / t1))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    n = args.devices
    print(f"\nembedded model, 50%, {args.nsamples} windows, 1 against {n} gloo processes\n")
    print(f"| method | masks equal | worst relative weight difference | wall {n} / 1 |")
    print("| --- | --- | ---: | ---: |")
    for method, equal, worst, ratio in rows:
        print(f"| {method} | {'yes' if equal else 'no'} | {worst:.1e} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
