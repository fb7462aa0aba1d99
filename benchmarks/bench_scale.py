"""Peak memory of a prune against depth: ``make bench-scale`` (printed, never asserted).

Builds random-weight LLaMA checkpoints (:mod:`benchmarks.make_checkpoint`) of 12 and 24
blocks (hidden 3584, intermediate 7168, 28 heads, fp16: 257 MB a block, 6.2 GB at 24 blocks) in a
temporary folder, prunes each on the CPU with Wanda and ADMM-Grad in a fresh process, and
prints that process's peak resident set (its own ``VmHWM`` at exit, through
:mod:`benchmarks.peak_rss`) against

- one block (its parameters in the prune's dtype), the calibration activations
  (``nsamples * seqlen * hidden`` fp32) and the method's statistics of one block, from
  :func:`modules.engine.plan.statistics_bytes`;
- the baseline: the peak of a process that only imports what the prune imports;
- the checkpoint's size.

A prune whose memory is bounded by one block has the same peak at 12 and 24 blocks (the
issue's target: within 10%) and stays below ``baseline + 2 * (block + activations +
statistics)``; one that loads the whole model grows with the checkpoint. ADMM-Grad runs
``--admm-iters`` iterations (default 1; its memory does not depend on the count, its time
does: on two shared cores the default 20 would take hours at 24 blocks). The temporary
folder (checkpoints and outputs) is removed at the end, also on Ctrl-C or SIGTERM; with
``--checkpoints DIR`` the checkpoints are built there once and kept for later runs.

Usage::

    python -m benchmarks.bench_scale                       # 12 and 24 blocks (about 19 GB of disk)
    python -m benchmarks.bench_scale --blocks 2,4 --hidden 512 --intermediate 1024 --heads 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a prune imports (old and new layout); the baseline process imports these and exits.
BASELINE_MODULES = (
    "torch",
    "transformers",
    "lightning",
    "prefect",
    "flows.cli",
    "tasks.prune",
    "tasks.update",
    "modules.prune",
    "modules.engine.loop",
    "modules.models",
    "modules.engine.models",
)


def prune_command(checkpoint: Path, method: str, output: Path, args: argparse.Namespace) -> list[str]:
    """The command that prunes ``checkpoint``: the one place to change for another entry point."""
    cmd = [sys.executable, "-m", "flows.cli", "prune", str(checkpoint), "--method", method]
    cmd += ["--sparsity", "0.5", "--calib", "embedded", "--nsamples", str(args.nsamples)]
    cmd += ["--seqlen", str(args.seqlen), "--dtype", args.dtype, "--device", "cpu", "--output", str(output)]
    if method in ("admm", "admm-grad"):
        cmd += ["--option", f"iters={args.admm_iters}"]
    if method == "admm-grad":
        cmd += ["--option", f"ks={max(1, args.admm_iters - 1)}"]
    return cmd


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``[python, -m M | -c C, args...]`` to completion: exit code, wall seconds, peak RSS.

    The peak (bytes) is the child's own ``VmHWM``, reported by :mod:`benchmarks.peak_rss`
    at its exit (0 if it died by a signal).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    report = log.with_suffix(".peak")
    report.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "wb") as out:
        rc = subprocess.run(
            [cmd[0], "-m", "benchmarks.peak_rss", str(report), *cmd[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        ).returncode
    peak = int(report.read_text()) if report.is_file() else 0  # 0: killed before its exit
    return {"rc": rc, "seconds": time.perf_counter() - start, "peak": peak}


def _tail(log: Path, lines: int = 5) -> str:
    return "\n".join(log.read_text(errors="replace").strip().splitlines()[-lines:])


def build(path: Path, blocks: int, args: argparse.Namespace, logs: Path) -> dict:
    """Build (in a process of its own) the checkpoint of ``blocks`` blocks; its figures."""
    cmd = [sys.executable, "-m", "benchmarks.make_checkpoint", str(path), "--blocks", str(blocks)]
    cmd += [
        "--hidden",
        str(args.hidden),
        "--intermediate",
        str(args.intermediate),
        "--heads",
        str(args.heads),
    ]
    cmd += ["--dtype", "float16", "--seed", str(args.seed)]
    log = logs / f"build-{blocks}.log"
    res = run_measured(cmd, log)
    if res["rc"] != 0:
        raise SystemExit(f"bench_scale: building {blocks} blocks failed:\n{_tail(log)}")
    print(
        f"built {blocks} blocks in {res['seconds']:.0f} s, builder peak RSS {res['peak'] / 1e9:.2f} GB",
        flush=True,
    )
    return res


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the checkpoint's safetensors shards."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(args: argparse.Namespace, where: Path) -> list[dict]:
    """Build what is missing, measure the baseline and every prune; one row per prune."""
    from modules.engine.plan import DTYPE_BYTES, read_arch, statistics_bytes

    logs = where / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ckpts = Path(args.checkpoints) if args.checkpoints else where
    for blocks in args.blocks:
        path = ckpts / f"llama-{blocks}"
        if not (path / "model.safetensors.index.json").is_file():
            build(path, blocks, args, logs)
    code = "import importlib.util as u, importlib as i\n"
    code += f"for m in {BASELINE_MODULES!r}:\n"
    code += "    (u.find_spec(m.split('.')[0]) and u.find_spec(m)) and i.import_module(m)"
    base = run_measured([sys.executable, "-c", code], logs / "baseline.log")
    if base["rc"] != 0:
        raise SystemExit(f"bench_scale: the baseline imports failed:\n{_tail(logs / 'baseline.log')}")
    rows = []
    for blocks in args.blocks:
        path = ckpts / f"llama-{blocks}"
        arch, _ = read_arch(str(path))
        for method in args.methods:
            out = where / f"out-{blocks}-{method}"
            log = logs / f"prune-{blocks}-{method}.log"
            res = run_measured(prune_command(path, method, out, args), log)
            shutil.rmtree(out, ignore_errors=True)
            if res["rc"] != 0:
                print(f"prune of {blocks} blocks with {method} failed (rc {res['rc']}):\n{_tail(log)}")
            rows.append(
                {
                    "blocks": blocks,
                    "method": method,
                    "checkpoint": checkpoint_bytes(path),
                    "block": arch.block_params() * DTYPE_BYTES[args.dtype],
                    "acts": args.nsamples * args.seqlen * arch.hidden * 4,
                    "stats": statistics_bytes(arch, method),
                    "baseline": base["peak"],
                    **res,
                }
            )
            took, peak = res["seconds"], res["peak"] / 1e9
            print(f"pruned {blocks} blocks with {method}: {took:.0f} s, peak {peak:.2f} GB", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """The printed table and the 24-vs-12 ratio per method."""
    gb = 1e9
    head = (
        f"{'blocks':>6} {'method':<10} {'ckpt GB':>8} {'block GB':>9} {'acts GB':>8} {'stats GB':>9} "
        f"{'base GB':>8} {'peak GB':>8} {'time s':>7} {'peak/BAS':>9} {'(peak-base)/BAS':>16} "
        f"{'peak/ckpt':>9}"
    )
    lines = [head]
    for r in rows:
        bas = r["block"] + r["acts"] + r["stats"]
        lines.append(
            f"{r['blocks']:>6} {r['method']:<10} {r['checkpoint'] / gb:>8.2f} {r['block'] / gb:>9.3f} "
            f"{r['acts'] / gb:>8.3f} {r['stats'] / gb:>9.3f} {r['baseline'] / gb:>8.2f} "
            f"{r['peak'] / gb:>8.2f} "
            f"{r['seconds']:>7.0f} {r['peak'] / bas:>9.2f} {(r['peak'] - r['baseline']) / bas:>16.2f} "
            f"{r['peak'] / r['checkpoint']:>9.2f}" + ("" if r["rc"] == 0 else f"  FAILED rc {r['rc']}")
        )
    lines.append(
        "BAS = one block + activations + statistics; target: (peak-base)/BAS < 2, same peak at every depth"
    )
    depths = sorted({r["blocks"] for r in rows})
    if len(depths) > 1:
        for method in dict.fromkeys(r["method"] for r in rows):
            peaks = {r["blocks"]: r["peak"] for r in rows if r["method"] == method}
            lo, hi = depths[0], depths[-1]
            ratio = f"{peaks[hi] / peaks[lo]:.2f}" if peaks[lo] and peaks[hi] else "- (a run failed)"
            lines.append(f"{method}: peak at {hi} blocks / peak at {lo} blocks = {ratio}")
    return "\n".join(lines)


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="12,24", help="comma-separated depths")
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--intermediate", type=int, default=7168)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--methods", default="wanda,admm-grad")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--admm-iters", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="where the temporary folder goes (default: the system's)")
    p.add_argument("--checkpoints", default=None, help="build the checkpoints here once and keep them")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)  # unwind, so the temporary folder is removed
    args.blocks = [int(b) for b in args.blocks.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="topiary-bench-scale-", dir=args.work_dir) as tmp:
        rows = measure(args, Path(tmp))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
