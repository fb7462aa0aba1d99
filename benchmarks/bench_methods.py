"""Pruning benchmark: time, peak memory and reconstruction error per method (``make bench``).

Synthetic linears ``(C_out, C_in)`` with calibration inputs whose channels have heavy-tailed
scales (log-normal per channel, plus a low-rank shared component that correlates them);
a separate set of held-out tokens measures the relative reconstruction error
``||X (W - W_p)^T|| / ||X W^T||``. Each (layer, method) runs in a fresh subprocess:

- times are multiples of one dense forward ``X @ W^T`` of the same layer on the
  calibration tokens, timed in the same subprocess just before (fastest of 3; the
  machine may be shared, the ratio is what to compare); pruning runs once;
- "stats" is the time to build the method's statistics from the calibration tokens in
  batches of 2048 tokens (Topiary: ``sq_norm`` and ``gram`` as ``modules.engine.statistics``
  accumulates them; reference: its own ``add_batch``), "prune" the time of the method
  given its statistics;
- peak extra memory on CPU is the peak resident set size during the pruning call minus
  the resident size just before it: the kernel's high-water mark ``VmHWM`` is reset
  through ``/proc/self/clear_refs`` (else a 2 ms sampling thread is used), and glibc is
  told to ``mmap`` every allocation above 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that
  freed tensors leave the resident set at once. On CUDA it is
  ``torch.cuda.max_memory_allocated`` minus the allocation before the call.

Methods: Topiary's ``magnitude``, ``wanda``, ``sparsegpt``, ``admm`` (ADMM1 on Wanda's mask),
``admm-grad`` (per-row, the default), ``admm-grad/matrix`` (whole-matrix group, as the
reference), ``admm-grad/fp32`` (per-row, every product in fp32) and ``admm-grad/mixed``
(per-row, bf16 products but the last two iterations; the default precision ``auto`` is
printed in the header), and the public code re-implemented in :mod:`benchmarks.reference_impl`:
``ref-magnitude``, ``ref-wanda``, ``ref-sparsegpt``, ``ref-admm-grad`` (the ADMM
repository's default: explicit inverse, 15 gradual steps, 20 iterations).

A second part times a whole LLaMA decoder block (width 2048, intermediate 5504, random
weights) through the in-memory oracle (tests/engine/oracle.py) for magnitude and Wanda,
against two dense forwards of the block (:func:`bench_block`).

Usage::

    python -m benchmarks.bench_methods            # full run (minutes)
    python -m benchmarks.bench_methods --quick    # tiny shapes, seconds
    python -m benchmarks.bench_methods --sizes 1024x1024,4096x1024 --patterns 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch

FULL_SIZES = ((1024, 1024), (4096, 1024), (1024, 4096), (4096, 4096))
QUICK_SIZES = ((256, 256), (512, 256), (256, 512))
OURS = (
    "magnitude",
    "wanda",
    "sparsegpt",
    "admm",
    "admm-grad",
    "admm-grad/matrix",
    "admm-grad/fp32",
    "admm-grad/mixed",
)
REFERENCE = ("ref-magnitude", "ref-wanda", "ref-sparsegpt", "ref-admm-grad")
METHODS = OURS + REFERENCE
BATCH_TOKENS = 2048
FORWARD_REPEATS = 3  # the dense forward is timed 3 times, the fastest is the unit
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# ----------------------------------------------------------------------------- data


def make_layer(c_out: int, c_in: int, tokens: int, heldout: int, seed: int = 0):
    """``(W, X_cal, X_held)``: weights and inputs with heavy-tailed, correlated channels.

    Channel scales are log-normal (sigma 1: a few channels 10-30x the median), and a
    rank-32 shared component correlates the channels, as in LLM activations.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + c_out * 7919 + c_in)
    scale = torch.exp(torch.randn(c_in, generator=g))
    mix = torch.randn(32, c_in, generator=g) * 0.5

    def inputs(n: int) -> torch.Tensor:
        x = torch.randn(n, c_in, generator=g)
        x.addmm_(torch.randn(n, 32, generator=g), mix)
        return x.mul_(scale)

    W = torch.randn(c_out, c_in, generator=g) / c_in**0.5
    return W, inputs(tokens), inputs(heldout)


# ----------------------------------------------------------------------------- memory


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak extra memory of a code section (bytes): CUDA allocator or process RSS."""

    def __init__(self, device: torch.device):
        self.device, self.method, self.peak = device, "", 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda.max_memory_allocated"
            return self
        self.base = _status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM"
        except OSError:
            self.method, self._stop = "RSS sampled every 2 ms", threading.Event()
            self._max = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _status("VmRSS"))
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.method == "VmHWM":
            self.peak = _status("VmHWM") - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self._max - self.base


# ----------------------------------------------------------------------------- methods


def _spec(setting: str):
    from modules.pruning.sparsity import parse_spec

    return parse_spec(pattern=setting) if ":" in setting else parse_spec(sparsity=float(setting))


def _our_stats(batches: list[torch.Tensor], gram: bool):
    """Statistics as ``modules.engine.statistics`` accumulates them (sum of squares; ``X^T X``)."""
    from modules.pruning.stats import LayerStats

    c_in = batches[0].shape[1]
    sq = torch.zeros(c_in, device=batches[0].device)
    G = torch.zeros(c_in, c_in, device=sq.device) if gram else None
    tokens = 0
    for x in batches:
        tokens += x.shape[0]
        sq += x.pow(2).sum(0)
        if G is not None:
            G.addmm_(x.T, x)
    return LayerStats(tokens, sq, G)


def method_runner(name: str, setting: str) -> tuple[Callable, Callable]:
    """``(stats_fn(batches) -> stats, prune_fn(W, stats) -> W_pruned)`` of a benchmark method."""
    from benchmarks import reference_impl as ref

    spec = _spec(setting)
    pn, pm = (spec.m - spec.n, spec.m) if spec.is_nm else (0, 0)  # the reference's prune_n = pruned count
    rate = spec.target
    if name == "magnitude":
        from modules.pruning.magnitude import prune_magnitude

        return (lambda b: None), (lambda W, s: prune_magnitude(W, s, spec)[0])
    if name == "wanda":
        from modules.pruning.wanda import prune_wanda

        return (lambda b: _our_stats(b, False)), (lambda W, s: prune_wanda(W, s, spec)[0])
    if name == "sparsegpt":
        from modules.pruning.sparsegpt import prune_sparsegpt

        return (lambda b: _our_stats(b, True)), (lambda W, s: prune_sparsegpt(W, s, spec)[0])
    if name == "admm":
        from modules.pruning.registry import get_method

        admm = get_method("admm")
        return (lambda b: _our_stats(b, True)), (lambda W, s: admm.run(W, s, spec, selector="wanda")[0])
    if name in ("admm-grad", "admm-grad/matrix", "admm-grad/fp32", "admm-grad/mixed"):
        from modules.pruning.admm import prune_admm_grad

        group = "matrix" if name.endswith("/matrix") else "row"
        precision = name.rpartition("/")[2] if name.endswith(("/fp32", "/mixed")) else "auto"

        def prune(W, s):
            return prune_admm_grad(W, s, spec, group=group, precision=precision)[0]

        return (lambda b: _our_stats(b, True)), prune
    if name == "ref-magnitude":
        return (lambda b: None), (lambda W, s: ref.ref_magnitude(W, rate, pn, pm))
    if name == "ref-wanda":
        return ref.ref_wanda_scaler, (lambda W, s: ref.ref_wanda(W, s, rate, pn, pm))
    if name == "ref-sparsegpt":
        return ref.ref_sparsegpt_hessian, (lambda W, s: ref.ref_sparsegpt(W, s, rate, pn, pm))
    if name == "ref-admm-grad":
        if spec.is_nm and (spec.n, spec.m) != (2, 4):
            raise ValueError("ref-admm-grad: the reference code only supports 2:4")
        return ref.ref_admm_gram, (lambda W, s: ref.ref_admm(W, s, rate, pn, pm))
    raise ValueError(f"method: {name!r} is not one of {', '.join(METHODS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(
    method: str, c_out: int, c_in: int, setting: str, tokens: int, heldout: int, device: str = "cpu"
) -> dict:
    """One (layer, method) measurement in this process; see the module docstring."""
    dev = torch.device(device)
    torch.set_num_threads(os.cpu_count() or 1)
    W, X, Xh = make_layer(c_out, c_in, tokens, heldout)
    W, X, Xh = W.to(dev), X.to(dev), Xh.to(dev)
    stats_fn, prune_fn = method_runner(method, setting)

    _ = X[:BATCH_TOKENS] @ W.T  # warm-up
    forward = float("inf")
    for _rep in range(FORWARD_REPEATS):  # the least noisy denominator on a shared machine
        _sync(dev)
        t = time.perf_counter()
        _ = X @ W.T
        _sync(dev)
        forward = min(forward, time.perf_counter() - t)
    del _

    batches = list(X.split(BATCH_TOKENS))
    t = time.perf_counter()
    stats = stats_fn(batches)
    _sync(dev)
    stats_s = time.perf_counter() - t
    del batches, X

    with PeakMemory(dev) as mem:
        t = time.perf_counter()
        Wp = prune_fn(W, stats)
        _sync(dev)
        prune_s = time.perf_counter() - t
    ref_out = Xh @ W.T
    err = float((Xh @ (W - Wp).T).norm() / ref_out.norm())
    return {
        "method": method,
        "shape": [c_out, c_in],
        "setting": setting,
        "tokens": tokens,
        "forward_s": forward,
        "stats_s": stats_s,
        "prune_s": prune_s,
        "peak_mb": mem.peak / 2**20,
        "memory_method": mem.method,
        "sparsity": float((Wp == 0).float().mean()),
        "error": err,
        "threads": torch.get_num_threads(),
    }


def use_mmap_for_large_allocations() -> None:
    """Make glibc ``mmap`` (and so return on free) every allocation above 64 KiB in this
    process, as ``MALLOC_MMAP_THRESHOLD_`` does for the subprocesses; else freed tensors
    stay in the heap and the resident set under-reports later peaks."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def run_case_inprocess(method: str, c_out: int, c_in: int, setting: str, args) -> dict:
    """:func:`run_case` in this process (``--quick``: no interpreter start per case)."""
    try:
        return run_case(method, c_out, c_in, setting, args.tokens, args.heldout, args.device)
    except Exception as exc:  # report and go on with the other cases
        return {"method": method, "shape": [c_out, c_in], "setting": setting, "failed": repr(exc)}


def run_case_subprocess(method: str, c_out: int, c_in: int, setting: str, args) -> dict:
    """:func:`run_case` in a fresh interpreter (clean memory accounting)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_methods",
        "--worker",
        f"{method}@{c_out}x{c_in}@{setting}",
        "--tokens",
        str(args.tokens),
        "--heldout",
        str(args.heldout),
        "--device",
        args.device,
    ]
    env = {**os.environ, **MMAP_ENV}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"method": method, "shape": [c_out, c_in], "setting": setting, "failed": tail[0]}


# ----------------------------------------------------------------------------- whole block


def bench_block(
    hidden: int = 2048,
    intermediate: int = 5504,
    nsamples: int = 8,
    seqlen: int = 2048,
    methods: tuple[str, ...] = ("magnitude", "wanda"),
    setting: str = "0.5",
    batch_size: int = 1,
) -> list[dict]:
    """Prune one random LLaMA decoder block with the in-memory oracle; time vs two dense forwards.

    The oracle's cost for a block is one forward with statistics hooks, the pruning, and
    one forward of the pruned block; the target for the data-free/cheap methods is to
    stay close to two plain dense forwards of the block on the same inputs.

    Returns:
        One dict per method: seconds of the oracle's stages, of two dense forwards, and
        the ratio ``(stats + prune + propagate) / (2 dense forwards)``.
    """
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from modules.engine.blocks import capture_inputs, find_blocks, run_block
    from modules.engine.request import PruneRequest
    from modules.engine.statistics import make_trainer
    from tests.engine.oracle import prune_block

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=512,
        max_position_embeddings=seqlen,
    )
    model = LlamaForCausalLM(cfg).eval()
    _, blocks = find_blocks(model)
    ids = torch.randint(0, cfg.vocab_size, (nsamples, seqlen))
    inputs, block_args = capture_inputs(model, ids, blocks)
    dense = blocks[0]

    with torch.no_grad():
        run_block(dense, inputs[:1], block_args)  # warm-up
        t = time.perf_counter()
        for _ in range(2):
            for i in range(0, nsamples, batch_size):
                run_block(dense, inputs[i : i + batch_size], block_args)
        two_forwards = time.perf_counter() - t

    trainer = make_trainer("cpu")
    rows = []
    for method in methods:
        request = PruneRequest(method=method, spec=_spec(setting), batch_size=batch_size)
        prune_block(copy.deepcopy(dense), inputs[:1], block_args, request, trainer=trainer)  # warm-up
        block = copy.deepcopy(dense)
        t = time.perf_counter()
        _, report = prune_block(block, inputs, block_args, request, trainer=trainer)
        total = time.perf_counter() - t
        sec = report.seconds
        rows.append(
            {
                "method": method,
                "block": f"hidden {hidden}, intermediate {intermediate}",
                "tokens": nsamples * seqlen,
                "two_forwards_s": two_forwards,
                "total_s": total,
                **{f"{k}_s": v for k, v in sec.items()},
                "ratio": total / two_forwards,
                "error": report.reconstruction_error,
            }
        )
    return rows


# ----------------------------------------------------------------------------- report


def _fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def layer_table(results: list[dict], setting: str) -> str:
    """Markdown table of the per-layer results at one setting."""
    lines = [
        f"### Sparsity {setting}",
        "",
        "| layer (out x in) | method | stats (x fwd) | prune (x fwd) | prune s | fwd s "
        "| peak extra MB | rel. error % |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r["setting"] != setting:
            continue
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        if "failed" in r:
            lines.append(f"| {shape} | {r['method']} | failed: {r['failed']} | | | | | |")
            continue
        f = r["forward_s"]
        lines.append(
            f"| {shape} | {r['method']} | {_fmt(r['stats_s'] / f)} | {_fmt(r['prune_s'] / f)} | "
            f"{_fmt(r['prune_s'])} | {_fmt(r['forward_s'])} | {_fmt(r['peak_mb'], 0)} | "
            f"{_fmt(100 * r['error'], 3)} |"
        )
    return "\n".join(lines)


def ratio_table(results: list[dict], setting: str) -> str:
    """Topiary vs reference: pruning time, peak memory and error, as ratios within this run.

    The time ratio is of pruning seconds, not of forward multiples: every case times its
    own forward, and one disturbed forward would skew a ratio of multiples.
    """
    pairs = (
        ("sparsegpt", "ref-sparsegpt"),
        ("admm-grad", "ref-admm-grad"),
        ("admm-grad/matrix", "ref-admm-grad"),
        ("admm-grad/fp32", "ref-admm-grad"),
        ("admm-grad/mixed", "ref-admm-grad"),
        ("wanda", "ref-wanda"),
    )
    ok = [r for r in results if r["setting"] == setting and "failed" not in r]
    by = {(r["method"], tuple(r["shape"])): r for r in ok}
    shapes = sorted({s for _, s in by}, key=lambda s: (s[0] * s[1], s))
    lines = [
        f"### Topiary / reference at {setting} (pruning seconds and peak memory, same run)",
        "",
        "| layer | ours / reference | time ratio | peak memory ratio | error ours % | error ref % |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for shape in shapes:
        for ours, ref in pairs:
            a, b = by.get((ours, shape)), by.get((ref, shape))
            if not a or not b:
                continue
            t = a["prune_s"] / b["prune_s"]
            m = a["peak_mb"] / b["peak_mb"] if b["peak_mb"] > 0 else float("nan")
            lines.append(
                f"| {shape[0]}x{shape[1]} | {ours} / {ref} | {_fmt(t)} | {_fmt(m)} | "
                f"{_fmt(100 * a['error'], 3)} | {_fmt(100 * b['error'], 3)} |"
            )
    return "\n".join(lines)


def block_table(rows: list[dict]) -> str:
    lines = [
        "### Whole decoder block through the in-memory oracle",
        "",
        "| block | tokens | method | stats s | prune s | propagate s | total s | 2 dense fwd s "
        "| total / 2 fwd |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['block']} | {r['tokens']} | {r['method']} | {_fmt(r['stats_s'])} | {_fmt(r['prune_s'])} | "
            f"{_fmt(r['propagate_s'])} | {_fmt(r['total_s'])} | {_fmt(r['two_forwards_s'])} | "
            f"{_fmt(r['ratio'])} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        o, _, i = part.strip().partition("x")
        out.append((int(o), int(i)))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_methods", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and token counts (seconds)")
    p.add_argument("--sizes", help="comma-separated OUTxIN layer shapes (default: the four LLaMA-like ones)")
    p.add_argument("--tokens", type=int, help="calibration tokens (default 16384; quick 2048)")
    p.add_argument("--heldout", type=int, help="held-out tokens for the error (default 4096; quick 512)")
    p.add_argument("--patterns", default="0.5,2:4", help="comma-separated settings: rates and/or N:M")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-block", action="store_true", help="skip the whole-block part")
    p.add_argument(
        "--inprocess",
        action="store_true",
        help="run every case in this process (default with --quick; else a fresh subprocess per case)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each case N times, interleaved; keep the fastest (busy machines)",
    )
    p.add_argument("--json", help="also write all results to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = args.tokens or (2048 if args.quick else 16384)
    args.heldout = args.heldout or (512 if args.quick else 4096)

    if args.worker:
        method, shape, setting = args.worker.split("@")
        ((c_out, c_in),) = _sizes(shape)
        res = run_case(method, c_out, c_in, setting, args.tokens, args.heldout, args.device)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    from modules.pruning.admm import FP32_MAX_INPUTS, resolve_precision

    sizes = _sizes(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    settings = [s.strip() for s in args.patterns.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(
        f"# Topiary pruning benchmark\n\ntorch {torch.__version__}, {os.cpu_count()} CPU threads, "
        f"device {args.device}, {args.tokens} calibration tokens, {args.heldout} held-out tokens; "
        f"ADMM precision auto = fp32 up to {FP32_MAX_INPUTS} inputs, "
        f"{resolve_precision('auto', torch.device(args.device))} above\n",
        flush=True,
    )
    inprocess = args.inprocess or args.quick
    if inprocess:
        use_mmap_for_large_allocations()
    run = run_case_inprocess if inprocess else run_case_subprocess
    results = []
    for setting in settings:
        for c_out, c_in in sizes:
            best: dict[str, dict] = {}
            for _ in range(args.repeat):  # interleaved, so a busy spell hits every method alike
                for method in methods:
                    if method == "ref-admm-grad" and ":" in setting and setting != "2:4":
                        continue
                    r = run(method, c_out, c_in, setting, args)
                    if method not in best or r.get("prune_s", float("inf")) < best[method].get(
                        "prune_s", float("inf")
                    ):
                        best[method] = r
                    state = r.get("failed") or f"prune {r['prune_s']:.2f}s err {100 * r['error']:.3f}%"
                    print(f"<!-- {setting} {c_out}x{c_in} {method}: {state} -->", flush=True)
            results.extend(best.values())
        tables = layer_table(results, setting) + "\n\n" + ratio_table(results, setting)
        print("\n" + tables + "\n", flush=True)
    mem = next((r["memory_method"] for r in results if "memory_method" in r), "n/a")
    print(f"Peak extra memory measured with {mem}; times are multiples of one dense forward.\n")

    blocks = []
    if not args.no_block:
        if args.quick:
            blocks = bench_block(hidden=256, intermediate=688, nsamples=4, seqlen=128)
        else:
            blocks = bench_block()
        print(block_table(blocks) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": results, "blocks": blocks}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
