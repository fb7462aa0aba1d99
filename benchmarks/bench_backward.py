"""Peak memory of GBLM's gradient step: the whole-model pass against the block-wise backward.

Writes a random-weight LLaMA checkpoint to a temporary folder, then runs each variant in a
fresh process and prints its peak RSS (printed, not asserted):

- ``whole``: the checkpoint loaded whole, :func:`modules.engine.gradients.compute_gradients`.
- ``blocks``: a skeleton with its parameters on the meta device, only the embeddings,
  final norm and head read from the checkpoint, and
  :func:`modules.engine.backward.blockwise_gradients` with a loader that reads one block's
  tensors from the safetensors file per call; every block's inputs held in memory.
- ``disk``: the same with ``in_memory=False``: each segment's first block inputs kept in
  a resume folder, the others recomputed by the backward (one more forward); it also
  prints the most the folder held.

``blocks`` is compared with ``whole`` (max relative difference) and ``disk`` with
``blocks`` (bit for bit), and each variant's seconds with ``blocks``'. Run::

    python -m benchmarks.bench_backward [--layers 8] [--hidden 1024] [--samples 8] [--seqlen 128]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def build(folder: Path, layers: int, hidden: int, samples: int, seqlen: int) -> None:
    """A random LLaMA (MLP 2.75x hidden, vocab 4096) and random calibration ids in ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=seqlen,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    ids = torch.randint(0, cfg.vocab_size, (samples, seqlen), generator=torch.Generator().manual_seed(1))
    torch.save(ids, folder / "ids.pt")


def _skeleton(folder: Path):
    """The model with meta parameters (buffers real), embeddings/norm/head read from disk."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as sf:
        outside = {k: sf.get_tensor(k) for k in sf.keys() if ".layers." not in k}
    model.load_state_dict(outside, strict=False, assign=True)
    return model.eval()


def child(mode: str, folder: Path, out: Path) -> dict:
    """Run one variant in this process; return its figures."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import modules.engine.backward as backward
    from modules.engine.backward import blockwise_gradients
    from modules.engine.blocks import find_blocks
    from modules.engine.gradients import compute_gradients
    from modules.engine.statistics import make_trainer

    baseline = _peak_mb()
    ids = torch.load(folder / "ids.pt")
    state, most = out.with_name(f"{out.name}-state"), [0]
    write = backward._write_raw

    def measured(tensor, path):  # the resume folder's size after each write
        write(tensor, path)
        most[0] = max(most[0], sum(f.stat().st_size for f in state.iterdir()))

    backward._write_raw = measured
    start = time.perf_counter()
    if mode == "whole":
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        compute_gradients(model, ids, out, trainer=make_trainer("cpu"))
    else:
        model = _skeleton(folder)
        prefix, blocks = find_blocks(model)

        def load_block(i: int) -> torch.nn.Module:
            block = copy.deepcopy(blocks[i])
            key = f"{prefix}.{i}."
            with safe_open(str(folder / "model.safetensors"), framework="pt") as sf:
                state = {k[len(key) :]: sf.get_tensor(k) for k in sf.keys() if k.startswith(key)}
            block.load_state_dict(state, assign=True)
            return block

        kept = {"state": state, "in_memory": False} if mode == "disk" else {}
        blockwise_gradients(model, ids, out, load_block=load_block, **kept)
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "baseline_mb": baseline,
        "peak_mb": _peak_mb(),
        "seconds": seconds,
        "disk_mb": most[0] / MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, folder, out = args.child
        print(json.dumps(child(mode, Path(folder), Path(out))))
        return
    import torch

    from modules.engine.gradients import load_block_grads

    with tempfile.TemporaryDirectory(prefix="bench-backward-") as tmp:
        folder = Path(tmp) / "model"
        build(folder, args.layers, args.hidden, args.samples, args.seqlen)
        figures = {}
        for mode in ("whole", "blocks", "disk"):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.bench_backward",
                "--child",
                mode,
                str(folder),
                f"{tmp}/{mode}",
            ]
            figures[mode] = json.loads(
                subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            )
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), framework="pt") as sf:
            sizes = {k: sf.get_slice(k).get_shape() for k in sf.keys()}
        numel = {k: torch.Size(s).numel() * 4 / MB for k, s in sizes.items()}
        block_mb = sum(v for k, v in numel.items() if ".layers.0." in k)
        acts_mb = args.layers * args.samples * args.seqlen * args.hidden * 4 / MB
        worst = max(
            ((a - b).abs().max() / b.abs().max()).item()
            for i in range(args.layers)
            for a, b in zip(
                load_block_grads(f"{tmp}/blocks", i).values(),
                load_block_grads(f"{tmp}/whole", i).values(),
                strict=True,
            )
        )
        equal = all(
            torch.equal(a, b)
            for i in range(args.layers)
            for a, b in zip(
                load_block_grads(f"{tmp}/disk", i).values(),
                load_block_grads(f"{tmp}/blocks", i).values(),
                strict=True,
            )
        )
    total = sum(numel.values())
    print(
        f"random LLaMA: {args.layers} blocks, hidden {args.hidden}, fp32; "
        f"{args.samples} x {args.seqlen} tokens"
    )
    print(
        f"checkpoint {total:.0f} MB; one block {block_mb:.0f} MB; outside the blocks "
        f"{total - args.layers * block_mb:.0f} MB; stored block inputs {acts_mb:.0f} MB"
    )
    for mode, fig in figures.items():
        grown = fig["peak_mb"] - fig["baseline_mb"]
        ratio = fig["seconds"] / figures["blocks"]["seconds"]
        disk = f"; resume folder at most {fig['disk_mb']:.0f} MB" if mode == "disk" else ""
        print(
            f"{mode:>6}: peak RSS {fig['peak_mb']:.0f} MB "
            f"({fig['baseline_mb']:.0f} MB after imports, +{grown:.0f} MB); "
            f"{fig['seconds']:.1f} s, {ratio:.2f}x blocks'{disk}"
        )
    print(f"max relative difference of the aggregates, blocks vs whole: {worst:.1e}")
    print(f"disk vs blocks, bit for bit equal: {'yes' if equal else 'NO'}")


if __name__ == "__main__":
    main()
