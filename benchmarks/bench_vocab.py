"""Peak host memory of perplexity with a large vocabulary: the whole logits tensor against the chunked head.

``python -m benchmarks.bench_vocab`` writes a random-weight LLaMA with a large vocabulary
(:mod:`benchmarks.make_checkpoint`, fp32) and a token file of the embedded corpus's first
windows into a temporary folder, then evaluates it three times, each in a fresh process
whose peak resident set (``VmHWM``, :mod:`benchmarks.peak_rss`) is printed:

* ``load``: the model loaded and the windows read, nothing evaluated (the floor);
* ``full``: each batch's whole logits tensor and the token NLLs from it, the path
  :func:`modules.evaluation.perplexity.perplexity` took before its head was chunked;
* ``chunked``: :func:`modules.evaluation.perplexity.perplexity` as it is, which is what
  ``topiary eval ppl`` runs;
* ``zs-upstream`` / ``zs-topiary``: the embedded zero-shot suite (``--zs-limit`` items a
  task, batch 16) scored by lm-eval's own ``HFLM`` / by Topiary's
  (:func:`modules.evaluation.zeroshot.continuation_scores`).

Each child prints its result (summed NLL, or the sum of every request's log-likelihood);
the two of a kind must agree. ``--variants`` picks some. Printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("load", "full", "chunked", "zs-upstream", "zs-topiary")


def full_logits_window_nll(model, windows: torch.Tensor, batch_size: int) -> list[float]:
    """Each window's summed NLL from each batch's whole ``(batch, seq, vocab)`` logits: fp32
    token NLLs, each window's sum in fp64 (the tests' oracle for the chunked head)."""
    out: list[float] = []
    with torch.no_grad():
        for s in range(0, windows.shape[0], batch_size):
            batch = windows[s : s + batch_size]
            logits = model(input_ids=batch).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            )
            out += nll.view(batch.shape[0], -1).double().sum(dim=1).tolist()
    return out


def embedded_samples(model, tok, hflm, limit: int, batch_size: int = 16) -> dict[str, list[dict]]:
    """lm-eval's logged samples of the embedded suite's first ``limit`` items a task, scored by
    the ``hflm`` class, per task in item order."""
    import lm_eval

    from modules.evaluation.zeroshot import check_tasks, task_manager

    plan = check_tasks(["embedded"])
    lm = hflm(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")
    with tempfile.TemporaryDirectory() as work:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=plan.requested,
            num_fewshot=0,
            limit=limit,
            log_samples=True,
            task_manager=task_manager(plan, work),
            bootstrap_iters=0,
        )
    return {name: sorted(out["samples"][name], key=lambda s: s["doc_id"]) for name in plan.leaves}


def zeroshot_loglik(model, tok, hflm, limit: int) -> float:
    """Sum of every request's log-likelihood over the embedded suite's first ``limit`` items a task."""
    samples = embedded_samples(model, tok, hflm, limit)
    return sum(r[0] for task in samples.values() for s in task for r in s["filtered_resps"])


def child(variant: str, model_dir: str, tokens: str, batch_size: int, zs_limit: int) -> None:
    """Load the model and windows, run ``variant``, print ``{"variant", "result"}``."""
    import math

    from modules.data.windows import eval_windows
    from modules.engine.models import load_model
    from modules.evaluation.perplexity import perplexity

    model, tok = load_model(model_dir, "float32", "cpu")
    windows = eval_windows(tokens, tok, None)
    per_window: list[float] = []
    if variant == "full":
        per_window = full_logits_window_nll(model, windows, batch_size)
    elif variant == "chunked":
        per_window = perplexity(model, windows, batch_size=batch_size, progress=False)["window_nll"]
    elif variant == "zs-upstream":
        from lm_eval.models.huggingface import HFLM

        per_window = [zeroshot_loglik(model, tok, HFLM, zs_limit)]
    elif variant == "zs-topiary":
        from modules.evaluation.zeroshot import memo_hflm

        per_window = [zeroshot_loglik(model, tok, memo_hflm(), zs_limit)]
    print(json.dumps({"variant": variant, "result": math.fsum(per_window)}))


def measure(variant: str, model_dir: Path, tokens: Path, args: argparse.Namespace, work: Path) -> dict:
    """Run ``variant`` in a fresh process; its peak RSS, wall time and summed NLL."""
    out = work / f"{variant}.rss"
    cmd = [sys.executable, "-m", "benchmarks.peak_rss", str(out), "-m", "benchmarks.bench_vocab"]
    cmd += ["--child", variant, "--model", str(model_dir), "--tokens", str(tokens)]
    cmd += ["--batch-size", str(args.batch_size), "--zs-limit", str(args.zs_limit)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "peak_gb": int(out.read_text()) / 1e9, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """Build the checkpoint and token file, measure each variant, print a table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=131_072)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--zs-limit", type=int, default=5, help="zero-shot items a task")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS)
    )
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.model, args.tokens, args.batch_size, args.zs_limit)
        return 0
    from transformers import AutoTokenizer

    from modules.data.windows import eval_windows
    from modules.engine.names import REFERENCE_DIR

    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        print(
            f"bench_vocab: error: variants: unknown {', '.join(unknown)} (valid: {', '.join(VARIANTS)})",
            file=sys.stderr,
        )
        return 2

    from .make_checkpoint import make_checkpoint

    with tempfile.TemporaryDirectory(prefix="topiary-bench-vocab-") as tmp:
        work = Path(tmp)
        info = make_checkpoint(
            work / "model",
            blocks=args.blocks,
            hidden=args.hidden,
            intermediate=2 * args.hidden,
            heads=max(1, args.hidden // 64),
            dtype="float32",
            vocab=args.vocab,
        )
        windows = eval_windows("embedded", AutoTokenizer.from_pretrained(REFERENCE_DIR), args.seqlen)[
            : args.windows
        ]
        torch.save({"input_ids": windows.clone()}, work / "tokens.pt")
        print(
            f"random LLaMA: vocab {args.vocab}, hidden {args.hidden}, {args.blocks} blocks, "
            f"{info['bytes'] / 1e9:.2f} GB fp32; {windows.shape[0]} windows x {args.seqlen}, "
            f"batch {args.batch_size}"
        )
        print(f"{'variant':<11} {'peak RSS GB':>11} {'time s':>7} {'result':>20}")
        for variant in variants:
            r = measure(variant, work / "model", work / "tokens.pt", args, work)
            print(f"{variant:<11} {r['peak_gb']:>11.2f} {r['seconds']:>7.1f} {r['result']:>20.10f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
