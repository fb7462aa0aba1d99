"""Peak host memory of pruning a mixture of experts one expert group at a time against a whole
block at a time (printed, never asserted).

1. Builds, once, a random-weight Qwen3-MoE checkpoint (``AutoConfig.for_model("qwen3_moe")``,
   ``from_config`` in bfloat16, ``save_pretrained``: one matrix per expert on disk, as
   transformers writes it; default 16 blocks of 64 experts, top 8, hidden 1024, experts 512
   wide: 3.3 GB) in a process of its own, under ``--dir``. It is reused only when its
   ``build.json`` records the same sizes, seed and transformers version; it is built under a
   temporary name and renamed when complete.
2. Prunes it with ``topiary prune`` (Wanda 50%, ``--calib embedded``, bfloat16, CPU), each
   variant in a fresh process with its own empty work folder: ``whole`` (no
   ``--expert-group``) and ``group`` (``--expert-group G``). The figure is that process's
   peak resident set (its own ``VmHWM`` at exit, :mod:`benchmarks.peak_rss`, through
   :func:`benchmarks.bench_scale.run_measured`).
3. Prints a table (variant, peak RSS, the engine's own count of the tensors it held at once
   (``peak_loaded_bytes`` of ``pruning_report.json``), seconds, checkpoint and block size,
   experts per group, achieved sparsity), the commands, and how the two outputs compare: how
   many tensors are identical and the largest absolute difference, over all and for one
   expert matrix (the engine adds a group's outputs as the experts module does: on the CPU,
   the same bytes). The outputs and work folders are removed at the end unless ``--keep``.

Usage::

    python -m benchmarks.bench_moe_groups                    # 16 blocks: 3.3 GB, about 10 GB of disk
    python -m benchmarks.bench_moe_groups --layers 2         # a quick try (0.4 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from benchmarks.bench_scale import ROOT, _tail, run_measured
from modules.engine.plan import arch_from_config, read_arch

VARIANTS = ("whole", "group")
DEFAULT_DIR = ROOT / ".topiary" / "bench" / "moe-groups"


def moe_config(args: argparse.Namespace) -> dict:
    """The Qwen3-MoE config keys of the checkpoint (with the embedded tokenizer's vocabulary)."""
    from modules.engine.names import REFERENCE_DIR

    vocab = json.loads((REFERENCE_DIR / "config.json").read_text())["vocab_size"]
    return dict(
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,  # unused: every block is a mixture of experts
        moe_intermediate_size=args.expert_intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def build_key(args: argparse.Namespace) -> dict:
    """What the checkpoint is made of: a cached one is reused only when this is its ``build.json``."""
    import transformers

    return {"config": moe_config(args), "seed": args.seed, "transformers": transformers.__version__}


def build_child(folder: str, args: argparse.Namespace) -> None:
    """Write the random checkpoint into ``folder`` (this process only): bfloat16 from creation."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from modules.engine.names import REFERENCE_DIR

    torch.manual_seed(args.seed)
    config = AutoConfig.for_model("qwen3_moe", **moe_config(args))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(REFERENCE_DIR).save_pretrained(folder)


def checkpoint(args: argparse.Namespace, where: Path) -> Path:
    """The cached checkpoint of ``args`` under ``where``, built first if missing or different."""
    key = build_key(args)
    c = key["config"]
    path = where / (
        f"qwen3moe-{c['num_hidden_layers']}x{c['num_experts']}-h{c['hidden_size']}"
        f"-e{c['moe_intermediate_size']}-k{c['num_experts_per_tok']}-s{args.seed}"
    )
    record = path / "build.json"
    if record.is_file() and json.loads(record.read_text()) == key:
        print(f"checkpoint: {path} (cached, same build)", flush=True)
        return path
    shutil.rmtree(path, ignore_errors=True)
    part = path.with_name(path.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    cmd = [sys.executable, "-m", "benchmarks.bench_moe_groups", "--build-child", str(part)]
    cmd += _size_flags(args)
    res = run_measured(cmd, where / "build.log")
    if res["rc"] != 0:
        raise SystemExit(f"bench_moe_groups: building the checkpoint failed:\n{_tail(where / 'build.log')}")
    (part / "build.json").write_text(json.dumps(key, indent=1))
    os.replace(part, path)
    print(f"checkpoint: built {path} in {res['seconds']:.0f} s, builder peak RSS {res['peak'] / 1e9:.2f} GB")
    return path


def _size_flags(args: argparse.Namespace) -> list[str]:
    names = ("layers", "hidden", "expert_intermediate", "experts", "top_k", "seed")
    return [x for k in names for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def prune_command(
    ckpt: Path, out: Path, work: Path, group: int | None, args: argparse.Namespace
) -> list[str]:
    """``topiary prune`` of one variant (``group`` None: the whole block at a time)."""
    cmd = [sys.executable, "-m", "flows.cli", "prune", str(ckpt), "--method", "wanda", "--sparsity", "0.5"]
    cmd += ["--calib", "embedded", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    cmd += ["--dtype", "bfloat16", "--device", "cpu", "--output", str(out), "--work-dir", str(work)]
    return cmd + (["--expert-group", str(group)] if group else [])


def tensors(folder: Path):
    """``(name, safetensors file)`` of every tensor of a saved model, in name order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted((n, folder / f) for n, f in json.loads(index.read_text())["weight_map"].items())
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return sorted((n, folder / "model.safetensors") for n in f.keys())  # noqa: SIM118


def compare(a: Path, b: Path) -> dict:
    """Tensor by tensor (one pair in memory at a time): how many are identical, the largest
    absolute difference, and that of the first expert's ``down_proj`` of block 0."""
    from safetensors import safe_open

    names_a, names_b = tensors(a), tensors(b)
    if [n for n, _ in names_a] != [n for n, _ in names_b]:
        return {"same_names": False}
    same, worst, expert = 0, 0.0, None
    for (name, fa), (_, fb) in zip(names_a, names_b, strict=True):
        with safe_open(fa, "pt") as x, safe_open(fb, "pt") as y:
            ta, tb = x.get_tensor(name), y.get_tensor(name)
        diff = (ta.double() - tb.double()).abs().max().item() if ta.numel() else 0.0
        same += bool(ta.dtype == tb.dtype and ta.shape == tb.shape and diff == 0.0)
        worst = max(worst, diff)
        if expert is None and ".experts." in name and "down_proj" in name:
            expert = (name, diff)
    return {
        "same_names": True,
        "tensors": len(names_a),
        "identical": same,
        "max_abs": worst,
        "expert": expert,
    }


def run_variant(variant: str, ckpt: Path, args: argparse.Namespace, where: Path) -> dict:
    """Prune ``ckpt`` as ``variant`` in a fresh process with an empty work folder."""
    out, work = where / f"out-{variant}", where / f"work-{variant}"
    for folder in (out, work):
        shutil.rmtree(folder, ignore_errors=True)
    cmd = prune_command(ckpt, out, work, args.group if variant == "group" else None, args)
    print("$ python " + " ".join(cmd[1:]).replace(str(ROOT) + "/", ""), flush=True)
    res = run_measured(cmd, where / f"prune-{variant}.log")
    report = out / "pruning_report.json"
    done = json.loads(report.read_text()) if res["rc"] == 0 and report.is_file() else None
    sparsity = done["sparsity"] if done else None
    loaded = done["phases"]["streaming"]["peak_loaded_bytes"] if done else None  # the engine's own count
    if res["rc"] != 0:
        print(f"prune {variant} failed (rc {res['rc']}):\n{_tail(where / f'prune-{variant}.log')}")
    return {"variant": variant, "out": out, "work": work, "sparsity": sparsity, "loaded": loaded, **res}


def table(rows: list[dict], ckpt: Path, args: argparse.Namespace) -> str:
    """The printed table: one row per variant."""
    arch, _ = read_arch(str(ckpt))
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9
    block = arch.block_params() * 2 / 1e9
    lines = [
        f"{'variant':<8} {'peak RSS GB':>11} {'loaded GB':>9} {'seconds':>8} {'ckpt GB':>8} {'block GB':>9} "
        f"{'experts/group':>13} {'sparsity':>9}"
    ]
    for r in rows:
        group = args.group if r["variant"] == "group" else arch.experts
        sparsity = f"{r['sparsity']:.4f}" if r["sparsity"] is not None else f"rc {r['rc']}"
        loaded = f"{r['loaded'] / 1e9:.3f}" if r.get("loaded") is not None else "-"
        lines.append(
            f"{r['variant']:<8} {r['peak'] / 1e9:>11.2f} {loaded:>9} {r['seconds']:>8.1f} {size:>8.2f} "
            f"{block:>9.3f} {group:>13} {sparsity:>9}"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="checkpoint cache, outputs and logs")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024, help="a multiple of 256")
    p.add_argument("--expert-intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group", type=int, default=8, help="experts per group of the group variant")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of whole, group")
    p.add_argument("--keep", action="store_true", help="keep the outputs and work folders")
    p.add_argument("--build-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = ("layers", "hidden", "expert_intermediate", "experts", "top_k", "group", "nsamples", "seqlen")
    bad = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in sizes if getattr(args, k) < 1]
    bad += [f"--hidden {args.hidden} (not a multiple of 256)"] if args.hidden % 256 else []
    bad += [f"--variants {v}" for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        p.exit(
            2,
            f"bench_moe_groups: error: {', '.join(bad)} (expected positive sizes; variants: whole, group)\n",
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the checkpoint, prune it per variant, print the table and the comparison."""
    args = parse(argv)
    if args.build_child:
        build_child(args.build_child, args)
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    a = arch_from_config({**moe_config(args), "model_type": "qwen3_moe"})
    print(
        f"Qwen3-MoE: {a.layers} blocks of {a.experts} experts (top {a.experts_per_token}), "
        f"hidden {a.hidden}, "
        f"experts {a.expert_intermediate} wide: {a.total_params() / 1e9:.2f} B params, "
        f"{2 * a.total_params() / 1e9:.2f} GB in bfloat16, one block {2 * a.block_params() / 1e9:.3f} GB",
        flush=True,
    )
    ckpt = checkpoint(args, args.dir)
    names = [n for n, _ in tensors(ckpt)]
    experts = sum(bool(re.search(r"\.experts\.\d+\.", n)) for n in names)
    print(f"on disk: {len(names)} tensors, {experts} of them one expert's matrix each", flush=True)
    rows = [run_variant(v, ckpt, args, args.dir) for v in args.variants.split(",")]
    print(table(rows, ckpt, args))
    done = {r["variant"]: r for r in rows if r["rc"] == 0}
    if len(done) == 2:
        c = compare(done["whole"]["out"], done["group"]["out"])
        if not c["same_names"]:
            print("outputs: the two hold different tensor names")
        else:
            name, diff = c["expert"] or ("no expert tensor", 0.0)
            print(
                f"outputs: {c['identical']} of {c['tensors']} tensors identical; largest |whole - group| "
                f"{c['max_abs']:.3g}; {name}: {diff:.3g}"
            )
    if not args.keep:
        for r in rows:
            for folder in (r["out"], r["work"]):
                shutil.rmtree(folder, ignore_errors=True)
    return 0 if len(done) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
