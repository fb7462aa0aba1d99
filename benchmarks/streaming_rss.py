"""Peak memory of a prune: the whole-model path against the streamed one, as the depth grows.

``python -m benchmarks.streaming_rss [--hidden 1024] [--blocks 6 12] [--method wanda]``
saves a random-weight fp16 LLaMA checkpoint per depth (with the embedded model's
tokenizer), then prunes each in a fresh process twice: ``load_model`` + ``prune_model`` +
``save_pretrained`` (today's path) and :func:`modules.engine.streaming.prune_checkpoint`.
Each process reports its resident memory after imports (baseline: torch, transformers,
Lightning, the model and tokenizer classes) and its peak from
then on (``VmHWM`` after a reset, Linux only); the table prints both with the
checkpoint's and one block's size.
Streaming should keep the peak flat in the depth; the whole-model path grows by the weights.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 2**20


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> float:
    """Reset the peak resident memory (Linux ``clear_refs`` 5) and return the current one, in MB.

    Imports alone peak above what they leave resident, so the process's own ``ru_maxrss``
    would hide the prune's peak; after the reset, ``VmHWM`` is the prune's.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def build(folder: Path, hidden: int, blocks: int) -> int:
    """Save a random fp16 LLaMA of ``blocks`` blocks of width ``hidden``; returns its weight bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modules.engine.names import REFERENCE_DIR

    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=blocks,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE_DIR / name, folder / name)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def child(mode: str, model_dir: str, out: str, method: str, nsamples: int, seqlen: int) -> None:
    """Prune in this process and print a JSON line of its memory figures."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported lazily by the first load)
    from transformers import AutoTokenizer

    import modules.engine.statistics  # noqa: F401  (Lightning: imported by the first pass, counted in the baseline)
    from modules.engine.driver import PrunePlan, prune_model
    from modules.engine.models import load_model
    from modules.engine.stages import prune_checkpoint
    from modules.pruning.sparsity import parse_spec

    AutoTokenizer.from_pretrained(model_dir)  # the tokenizer classes import on first load (~150 MB)
    ids = torch.randint(0, 4096, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    plan = PrunePlan(method, parse_spec(0.5, None))
    baseline = _reset_peak()
    extra = {}
    if mode == "whole":
        net, tok = load_model(model_dir, "float16", "cpu")
        prune_model(net, ids, plan)
        net.save_pretrained(out)
        tok.save_pretrained(out)
    else:
        report = prune_checkpoint(model_dir, out, plan, ids, dtype=torch.float16, activations="memory")
        extra = {"block_mb": report["streaming"]["largest_block_bytes"] / MB}
    print(json.dumps({"baseline_mb": baseline, "peak_mb": _status_mb("VmHWM"), **extra}))


def main() -> None:
    """Print, per depth and path, the baseline and peak resident memory."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--blocks", type=int, nargs="+", default=[6, 12])
    p.add_argument("--method", default="wanda")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--child", nargs=3, metavar=("MODE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, args.method, args.nsamples, args.seqlen)
        return
    print(f"{'blocks':>6} {'ckpt MB':>8} {'block MB':>8} {'path':>9} {'baseline MB':>11} {'peak MB':>8}")
    with tempfile.TemporaryDirectory(prefix="topiary-bench-rss-") as root:
        for n in args.blocks:
            model_dir = Path(root) / f"llama-{n}"
            size = build(model_dir, args.hidden, n) / MB
            for mode in ("whole", "streamed"):
                out = Path(root) / f"out-{n}-{mode}"
                cmd = [sys.executable, "-m", "benchmarks.streaming_rss", "--method", args.method]
                cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
                res = subprocess.run(
                    [*cmd, "--child", mode, str(model_dir), str(out)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                fig = json.loads(res.stdout.strip().splitlines()[-1])
                block = f"{fig['block_mb']:.1f}" if "block_mb" in fig else ""
                rss = f"{fig['baseline_mb']:>11.0f} {fig['peak_mb']:>8.0f}"
                print(f"{n:>6} {size:>8.1f} {block:>8} {mode:>9} {rss}")
                shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
