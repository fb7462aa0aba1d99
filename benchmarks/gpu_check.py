"""One GPU check, prepared on the CPU, run in one call when a GPU is lent: ``make gpu-check``.

What it answers and how to run it: docs/gpu-check.md. The sections, in order:

1. CUDA tests: pytest in a child process on the cases that need CUDA (:data:`CUDA_TESTS`),
   each case's outcome read from its JUnit XML (skipped without CUDA, and said so).
2. 70B-shaped blocks: a random checkpoint with Llama-2-70B's block shapes
   (:data:`LLAMA_70B`; the embedded tokenizer's vocabulary of 4096, not 32000), pruned
   streamed with each of :data:`METHODS` through :func:`modules.engine.loop.prune_checkpoint`,
   whose ``run`` hook times every stage and reads its memory peak (reset before each
   stage). Each stage is set beside ``topiary plan``'s prediction
   (:func:`modules.engine.plan.make_plan`) for the same blocks, windows, method and dtype:
   measured / predicted.
3. Mixture of experts: not supported yet, reported as skipped.
4. The report: ``gpu_check.json`` and ``gpu_check.md`` in ``--out``, rewritten after each
   section (a run cut short leaves what it measured, marked incomplete); versions, the
   GPU's name, and the whole 80-block model's time and peak extrapolated from the blocks.

The block count comes from ``--budget-s`` (:func:`choose_size`); ``--small`` is the CPU dry
run's tiny shapes (tests/benchmarks/test_gpu_check.py runs it in ``make test``).

Usage::

    python -m benchmarks.gpu_check --out DIR [--device cuda|cpu] [--small] [--budget-s 420]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.make_checkpoint import make_checkpoint
from benchmarks.peak_rss import vm_hwm
from modules.engine.plan import Arch, Plan, arch_from_config, host_memory, make_plan
from modules.errors import TopiaryError
from modules.process import write_file
from modules.provenance import NOT_A_CHECKOUT, UNKNOWN, git_state, package_version

ROOT = Path(__file__).resolve().parents[1]
LLAMA_70B = ROOT / "tests" / "fixtures" / "configs" / "llama-2-70b.json"
COMMIT_FILE = ROOT / ".whl" / "topiary-commit"  # written by benchmarks/gpu_wheels.sh
CUDA_TESTS = (
    "tests/engine/test_cuda.py",
    "tests/engine/test_ddp.py::test_two_processes_match_one[cuda-fsdp]",
    "tests/engine/test_ddp.py::test_two_processes_match_one[cuda-deepspeed]",
)
METHODS = ("wanda", "sparsegpt", "admm-grad")
MOE = "skipped: mixture-of-experts pruning not supported yet"
PER_BLOCK = ("statistics", "masks", "update", "propagate")  # stages run once per block
PLAN_NAMES = {"capture": "windows"}  # the engine's stage name -> topiary plan's
CALIBRATION = (128, 2048)  # the papers' windows x tokens
MIN_WINDOWS = 16  # the windows are never halved below this, whatever the budget
VOCAB = 4096  # the embedded tokenizer's (benchmarks/make_checkpoint.py)
# Time estimate of one block per method, beyond plan's FLOPs: the files a block writes and
# reads back (two activation buffers each way, its statistics, its shard twice) at plan's
# disk rate, and building the random checkpoint at this rate (normal draws, then the file).
BUILD_SECONDS_PER_GB = 4.0
SMALL = {"hidden": 64, "intermediate": 224, "heads": 8, "kv_heads": 1, "blocks": 2, "windows": (8, 64)}


@dataclass(frozen=True)
class Size:
    """What the blocks section runs: the shapes, the block count and the calibration."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    blocks: int
    nsamples: int
    seqlen: int
    dtype: str
    full_blocks: int  # the whole model's (the extrapolation's)
    rule: str  # how the block count and windows were chosen


def full_config() -> dict:
    """Llama-2-70B's ``config.json`` (the test fixture's copy)."""
    return json.loads(LLAMA_70B.read_text())


def block_arch(size: Size, blocks: int | None = None) -> Arch:
    """The :class:`Arch` of the random checkpoint (or of ``blocks`` blocks of it)."""
    cfg = {
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "num_hidden_layers": blocks or size.blocks,
        "vocab_size": VOCAB,
        "torch_dtype": size.dtype,
        "_name_or_path": "random Llama-2-70B blocks",
    }
    return arch_from_config(cfg, "gpu_check")


def plan_for(size: Size, method: str, device: torch.device, blocks: int | None = None) -> Plan:
    """``topiary plan``'s estimate for the check's checkpoint, method and windows."""
    return make_plan(
        block_arch(size, blocks),
        method=method,
        device_memory=device_memory(device),
        host_memory=host_memory(),
        nsamples=size.nsamples,
        seqlen=size.seqlen,
        dtype=size.dtype,
    )


def device_memory(device: torch.device) -> int:
    """Bytes of the device's memory (the host's for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return host_memory()


def estimate_block_seconds(plan: Plan) -> float:
    """Seconds of one block of ``plan``'s prune: its FLOPs' time plus its files at plan's disk rate."""
    flops = sum(s.flops for s in plan.stages if s.name in PER_BLOCK)
    compute = flops / (plan.tflops * 1e12 * plan.arch.layers)
    files = 4 * plan.activation_bytes + plan.statistics_bytes + 2 * plan.block_bytes
    return compute + files / (plan.disk_gbps * 1e9)


def choose_size(
    small: bool, budget_s: float, spent_s: float, device: torch.device, blocks: int | None
) -> Size:
    """The shapes, block count and windows that fit ``budget_s - spent_s`` seconds.

    Full size: Llama-2-70B's block shapes and its dtype; as many blocks as the estimate
    (:func:`estimate_block_seconds` summed over :data:`METHODS`, plus building the block)
    fits in what is left of the budget, at least 2; if 2 blocks do not fit at 128 windows,
    the windows are halved (down to :data:`MIN_WINDOWS`) and the report says so.
    ``blocks`` forces the count. ``--small``: :data:`SMALL`'s tiny shapes.
    """
    cfg = full_config()
    if small:
        n, seqlen = SMALL["windows"]
        dims = {k: SMALL[k] for k in ("hidden", "intermediate", "heads", "kv_heads")}
        count = blocks or SMALL["blocks"]
        rule = "--small: tiny shapes, a fixed count"
        return Size(**dims, blocks=count, nsamples=n, seqlen=seqlen, dtype=cfg["torch_dtype"],
                    full_blocks=cfg["num_hidden_layers"], rule=rule)  # fmt: skip
    nsamples, seqlen = CALIBRATION
    left = budget_s - spent_s
    while True:
        size = Size(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                    cfg["num_key_value_heads"], 2, nsamples, seqlen, cfg["torch_dtype"],
                    cfg["num_hidden_layers"], "")  # fmt: skip
        plan = plan_for(size, METHODS[0], device)
        per_block = sum(estimate_block_seconds(plan_for(size, m, device)) for m in METHODS)
        per_block += plan.block_bytes / 1e9 * BUILD_SECONDS_PER_GB
        fits = int(left // per_block)
        if blocks or fits >= 2 or nsamples <= MIN_WINDOWS:
            break
        nsamples //= 2
    count = blocks or max(2, fits)
    rule = (
        f"--blocks {blocks}" if blocks else
        f"{left:.0f} s of the {budget_s:.0f} s budget left after the CUDA tests; estimated "
        f"{per_block:.0f} s per block for the {len(METHODS)} methods (plan's FLOPs at "
        f"{plan.tflops:g} TFLOP/s, the block's files at {plan.disk_gbps:g} GB/s, building at "
        f"{BUILD_SECONDS_PER_GB:g} s/GB): {count} blocks (at least 2)"
    )  # fmt: skip
    if nsamples < CALIBRATION[0]:
        rule += f"; {nsamples} windows instead of {CALIBRATION[0]}: 2 blocks at 128 did not fit the budget"
    return Size(**{**size.__dict__, "blocks": count, "rule": rule})


def reset_rss_peak() -> bool:
    """Reset this process's peak resident set (``VmHWM``) to its current one; False where
    Linux does not allow it (``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class StageRecorder:
    """``prune_checkpoint``'s ``run`` hook: runs each stage, timing it and reading its memory peak.

    The peak is ``torch.cuda.max_memory_allocated`` on CUDA, reset before each stage; on
    the CPU, the process's peak resident set (``VmHWM``), reset through
    ``/proc/self/clear_refs`` where Linux allows it, else None.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.runs: list[dict] = []

    def _reset(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return reset_rss_peak()

    def _peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return vm_hwm()

    def __call__(self, stage: str, job, *args):
        from modules.engine.loop import STAGES

        measured = self._reset()
        start = time.perf_counter()
        result = STAGES[stage](job, *args)
        seconds = time.perf_counter() - start
        self.runs.append(
            {
                "stage": PLAN_NAMES.get(stage, stage),
                "block": args[0] if stage in PER_BLOCK else None,
                "seconds": round(seconds, 4),
                "peak_bytes": self._peak() if measured else None,
            }
        )
        return result


def memory_measure(device: torch.device) -> str | None:
    """What a stage's ``peak_bytes`` is on ``device`` (None: not measured)."""
    if device.type == "cuda":
        return "device: torch.cuda.max_memory_allocated, reset before each stage"
    if not reset_rss_peak():
        return None
    return "process peak resident set (VmHWM, reset before each stage): host memory, not a device's"


def ratio(measured: float | None, predicted: float) -> float | None:
    """``measured / predicted`` (4 decimals), None where either is missing or zero."""
    if measured is None or not predicted:
        return None
    return round(measured / predicted, 4)


def stage_table(runs: list[dict], plan: Plan) -> dict[str, dict]:
    """Per stage: the runs, the measured time per block (per run for a once-per-prune stage),
    the peak, plan's prediction of both for the same unit, and the ratios."""
    blocks = plan.arch.layers
    table = {}
    for name in dict.fromkeys(r["stage"] for r in runs):
        mine = [{k: r[k] for k in ("block", "seconds", "peak_bytes")} for r in runs if r["stage"] == name]
        per = blocks if name in PER_BLOCK else 1
        peaks = [r["peak_bytes"] for r in mine]
        seconds = sum(r["seconds"] for r in mine) / per
        peak = None if None in peaks else max(peaks)
        predicted = plan.stage(name)
        table[name] = {
            "unit": "block" if name in PER_BLOCK else "run",
            "runs": mine,
            "seconds": round(seconds, 4),
            "peak_bytes": peak,
            "plan_seconds": predicted.seconds / per,
            "plan_peak_bytes": predicted.device,
            "time_ratio": ratio(seconds, predicted.seconds / per),
            "peak_ratio": ratio(peak, predicted.device),
        }
    return table


def extrapolate(table: dict[str, dict], blocks: int, full_blocks: int) -> dict:
    """The whole model's prune from the measured stages: the per-block stages ``full_blocks``
    times, capture once, assemble (a copy of every block's shard) scaled by the block count;
    the peak is the largest stage's (each holds one block)."""
    seconds = 0.0
    for name, row in table.items():
        if name in PER_BLOCK:
            seconds += full_blocks * row["seconds"]
        elif name == "assemble":
            seconds += row["seconds"] * full_blocks / blocks
        else:
            seconds += row["seconds"]
    peaks = [row["peak_bytes"] for row in table.values()]
    return {
        "blocks": full_blocks,
        "seconds": round(seconds, 1),
        "peak_bytes": None if None in peaks else max(peaks),
        "rule": "per-block stages x blocks, capture once, assemble scaled by blocks; peak: largest stage",
    }


def run_method(checkpoint: Path, size: Size, method: str, device: torch.device, work: Path) -> dict:
    """Prune the checkpoint streamed with ``method`` (50% unstructured); its stages against plan's."""
    from modules.engine.loop import prune_checkpoint
    from modules.engine.request import PruneRequest
    from modules.pruning.sparsity import parse_spec

    plan = plan_for(size, method, device)
    ids = torch.randint(0, VOCAB, (size.nsamples, size.seqlen), generator=torch.Generator().manual_seed(0))
    recorder = StageRecorder(device)
    out = work / f"out-{method}"
    start = time.perf_counter()
    try:
        prune_checkpoint(checkpoint, out, PruneRequest(method, parse_spec(0.5, None)), ids,
                         device=str(device), dtype=getattr(torch, size.dtype), folder=work / f"run-{method}",
                         run=recorder)  # fmt: skip
        status = "ran"
    except (TopiaryError, RuntimeError) as err:  # CUDA out of memory is a RuntimeError: say it
        status = f"failed: {' '.join(str(err).split())[:300]}"
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / f"run-{method}", ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what a failed method held goes back before the next one
    table = stage_table(recorder.runs, plan)
    whole = plan_for(size, method, device, size.full_blocks)
    return {
        "status": status,
        "seconds": round(time.perf_counter() - start, 2),
        "batch_size": PruneRequest.batch_size,  # the engine's default, as `topiary prune` runs
        "plan_batch_size": plan.batch_size,  # the one plan's forward working set assumes
        "stages": table,
        "extrapolated": {
            **extrapolate(table, size.blocks, size.full_blocks),
            "plan_seconds": round(sum(s.seconds for s in whole.stages if s.name != "eval"), 1),
            "plan_peak_bytes": max(s.device for s in whole.stages if s.name != "eval"),
        }
        if status == "ran"
        else None,
    }


def junit_cases(path: Path) -> list[dict]:
    """Each test case of a JUnit XML file: its id, outcome (passed, failed, error, skipped),
    seconds and, unless passed, the reason pytest gave."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = " ".join((child.get("message") or child.text or "").split())[:300]
                break
        module = case.get("classname", "").replace(".", "/")
        cases.append(
            {
                "id": f"{module}.py::{case.get('name')}",
                "outcome": outcome,
                "seconds": round(float(case.get("time") or 0), 2),
                "message": message,
            }
        )
    return cases


def cuda_tests(work: Path, out: Path, timeout_s: float) -> dict:
    """Run :data:`CUDA_TESTS` with pytest in a child process; each case's outcome from its JUnit
    XML, pytest's own output in ``out/cuda_tests.log`` (a failure's whole traceback)."""
    xml = work / "cuda-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *CUDA_TESTS]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, log = None, f"{err.stdout or ''}\ntimed out after {timeout_s:.0f} s"
    log = log.decode(errors="replace") if isinstance(log, bytes) else log
    write_file(out / "cuda_tests.log", log)
    tail = log.strip().splitlines()[-1:]
    cases = junit_cases(xml) if xml.is_file() else []
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {
        "command": " ".join(["python", *cmd[1:]]).replace(str(xml), "cuda-tests.xml"),
        "returncode": code,
        "seconds": round(time.perf_counter() - start, 1),
        "counts": counts,
        "cases": cases,
        "summary": tail[0] if tail else "",
    }


def commit() -> dict:
    """Topiary's commit: from git, else from the file ``benchmarks/gpu_wheels.sh`` wrote
    beside the wheels (a GPU machine gets the tree without its ``.git``)."""
    sha, dirty = git_state(ROOT)
    if sha not in (NOT_A_CHECKOUT, UNKNOWN):
        return {"topiary_commit": sha, "topiary_dirty": dirty, "commit_from": "git"}
    if COMMIT_FILE.is_file():
        sha, _, dirty = COMMIT_FILE.read_text().strip().partition(" ")
        return {
            "topiary_commit": sha,
            "topiary_dirty": dirty or UNKNOWN,
            "commit_from": str(COMMIT_FILE.name),
        }
    return {"topiary_commit": sha, "topiary_dirty": dirty, "commit_from": "none"}


def versions(device: torch.device) -> dict:
    """The GPU's name (or ``cpu``), Python, torch and its CUDA, transformers, Lightning, the commit."""
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        **{
            pkg: package_version(pkg)
            for pkg in ("transformers", "lightning", "pytorch-lightning", "safetensors")
        },
        **commit(),
    }


def _gb(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    """The report as Markdown: versions, the CUDA tests, each method's stages against plan's."""
    v = report["versions"]
    lines = [
        "# GPU check",
        "",
        f"{v['gpu']}: {'complete' if report['complete'] else 'INCOMPLETE (cut short; what was measured)'}, "
        f"{report.get('seconds', '-')} s of a {report['budget_s']:.0f} s budget"
        + ("; a CPU dry run with tiny shapes, not a GPU result" if report["device"] == "cpu" else ""),
        "",
        " | ".join(f"{k} {val}" for k, val in v.items()),
        "",
        "## CUDA tests",
        "",
    ]
    tests = report["cuda_tests"]
    if tests:
        counts = ", ".join(f"{n} {k}" for k, n in tests["counts"].items())
        lines += [f"`{tests['command']}`: {counts} (exit {tests['returncode']}, {tests['seconds']} s)", ""]
        if report["device"] == "cpu":
            skipped = tests["counts"]["skipped"]
            lines += [f"A CPU run: these cases need CUDA; {skipped} of {len(tests['cases'])} skipped.", ""]
        lines += ["| case | outcome | s | reason |", "| --- | --- | --- | --- |"]
        lines += [
            f"| `{c['id']}` | {c['outcome']} | {c['seconds']} | {c['message']} |" for c in tests["cases"]
        ]
    blocks = report["blocks"]
    if blocks:
        s = blocks["size"]
        lines += [
            "",
            "## 70B-shaped blocks",
            "",
            f"{s['blocks']} blocks{'' if report['small'] else ' of Llama-2-70B'} (hidden {s['hidden']}, "
            f"intermediate "
            f"{s['intermediate']}, {s['heads']} heads, {s['kv_heads']} KV heads) in {s['dtype']}, random "
            f"weights, vocabulary {VOCAB} (the embedded tokenizer's, not 32000); {s['nsamples']} x "
            f"{s['seqlen']} calibration tokens (random ids); 50% unstructured. {s['rule']}.",
            f"Checkpoint built in {blocks['build_seconds']} s. "
            f"Memory: {report['memory_measure'] or 'not measured'}.",
            "Ratios: measured / `topiary plan`'s prediction; per block, or per run for capture and assemble.",
        ]
        for method, row in blocks["methods"].items():
            lines += ["", f"### {method}: {row['status']}", ""]
            if not row.get("stages"):
                continue
            lines += [
                "| stage | per | time s | plan s | ratio | peak | plan peak | ratio |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for name, st in row["stages"].items():
                lines.append(
                    f"| {name} | {st['unit']} | {_num(st['seconds'])} | {_num(st['plan_seconds'])} | "
                    f"{_num(st['time_ratio'])} | {_gb(st['peak_bytes'])} | {_gb(st['plan_peak_bytes'])} | "
                    f"{_num(st['peak_ratio'])} |"
                )
            x = row["extrapolated"]
            if x:
                lines += [
                    "",
                    f"Whole model ({x['blocks']} blocks): {x['seconds'] / 60:.1f} min, "
                    f"peak {_gb(x['peak_bytes'])} "
                    f"(plan: {x['plan_seconds'] / 60:.1f} min, {_gb(x['plan_peak_bytes'])}); {x['rule']}.",
                ]
    lines += ["", "## Mixture of experts", "", report["moe"], ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    """``gpu_check.json`` and ``gpu_check.md`` in ``out``, each replaced atomically."""
    write_file(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    write_file(out / "gpu_check.md", markdown(report))


def blocks_section(
    report: dict, out: Path, size: Size, device: torch.device, work: Path, start: float
) -> None:
    """Build the random checkpoint, prune it with each method, the report rewritten after each."""
    t = time.perf_counter()
    checkpoint = work / "checkpoint"
    make_checkpoint(checkpoint, blocks=size.blocks, hidden=size.hidden, intermediate=size.intermediate,
                    heads=size.heads, kv_heads=size.kv_heads, dtype=size.dtype)  # fmt: skip
    methods: dict[str, dict] = {}
    report["blocks"] = {
        "size": size.__dict__,
        "build_seconds": round(time.perf_counter() - t, 1),
        "methods": methods,
    }
    scale = 1.0  # the largest measured / estimated time of the methods run so far
    for method in METHODS:
        estimate = size.blocks * estimate_block_seconds(plan_for(size, method, device))
        spent = time.perf_counter() - start
        if spent + scale * estimate > report["budget_s"]:
            status = (
                f"skipped: {spent:.0f} s spent, about {scale * estimate:.0f} s more would pass the budget"
            )
            methods[method] = {"status": status, "stages": {}, "extrapolated": None}
        else:
            methods[method] = run_method(checkpoint, size, method, device, work)
            scale = max(scale, methods[method]["seconds"] / estimate)
        write_report(out, report)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder of gpu_check.json and gpu_check.md")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes: the CPU dry run")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds the whole check may take")
    p.add_argument(
        "--blocks", type=int, default=None, help="force the block count (default: from the budget)"
    )
    p.add_argument("--work", default=None, help="folder for the checkpoint and run files (default: $TMPDIR)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the check; exit 2 with one line on bad input, 0 once the report is written."""
    from modules.engine.names import check_device
    from modules.env import apply

    args = parse_args(argv)
    out = Path(args.out)
    try:
        device = check_device(args.device)
        if device.type not in ("cuda", "cpu"):
            raise TopiaryError(f"device: {args.device!r} is neither cuda nor cpu")
        if args.budget_s <= 0 or (args.blocks is not None and args.blocks < 2):
            raise TopiaryError("--budget-s must be positive and --blocks at least 2")
        if out.exists() and not out.is_dir():
            raise TopiaryError(f"--out: {out} exists and is not a folder")
    except TopiaryError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2
    apply(offline=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the work folder
    start = time.perf_counter()
    report = {"schema": 1, "complete": False, "device": device.type, "small": args.small,
              "budget_s": args.budget_s, "versions": versions(device),
              "memory_measure": memory_measure(device), "cuda_tests": None, "blocks": None,
              "moe": MOE}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.work) as tmp:
        work = Path(tmp)
        report["cuda_tests"] = cuda_tests(work, out, timeout_s=max(60.0, args.budget_s / 2))
        write_report(out, report)
        spent = time.perf_counter() - start
        size = choose_size(args.small, args.budget_s, spent, device, args.blocks)
        blocks_section(report, out, size, device, work, start)
    report["complete"] = True
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_report(out, report)
    print(f"gpu_check: {out / 'gpu_check.md'} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
