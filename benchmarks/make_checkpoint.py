"""Random-weight LLaMA checkpoints of any depth, written without holding the model in memory.

The architecture is transformers' own (``LlamaConfig`` and ``LlamaForCausalLM`` built on the
meta device, which gives every tensor's name and shape without allocating it). Each tensor
is then generated alone (normal with the config's ``initializer_range``, norms at one),
seeded by ``(seed, its position)`` so a checkpoint is the same byte for byte on every run,
and written straight into its safetensors shard: a shard's header is computed from the
shapes before any data, so peak memory is one tensor. The folder gets
``model-0000k-of-0000n.safetensors`` shards, ``model.safetensors.index.json``,
``config.json`` and the embedded model's tokenizer (its vocabulary size is the model's,
unless ``--vocab`` asks for a larger head and embedding).
The folder is built under a temporary name and renamed when complete.

Usage::

    python -m benchmarks.make_checkpoint OUT --blocks 24 --hidden 3584 --intermediate 7168 --heads 28
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import torch

from modules.errors import TopiaryError

REFERENCE = Path(__file__).resolve().parents[1] / "modules" / "assets" / "reference"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SAFE_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def llama_config(
    blocks: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    dtype: str,
    vocab: int | None = None,
):
    """A ``LlamaConfig`` with the embedded tokenizer's special tokens and vocabulary (or ``vocab``
    entries, at least the tokenizer's, for a larger head and embedding)."""
    from transformers import LlamaConfig

    ref = json.loads((REFERENCE / "config.json").read_text())
    if hidden % heads or heads % kv_heads:
        raise TopiaryError(f"heads: {heads} heads of {hidden} with {kv_heads} KV heads do not divide evenly")
    if vocab is not None and vocab < ref["vocab_size"]:
        raise TopiaryError(f"vocab: {vocab} is below the tokenizer's {ref['vocab_size']} tokens")
    return LlamaConfig(
        vocab_size=vocab or ref["vocab_size"],
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=ref["bos_token_id"],
        eos_token_id=ref["eos_token_id"],
        pad_token_id=ref["pad_token_id"],
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every tensor of the model, in state-dict order (meta device: no memory)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def make_tensor(name: str, shape: tuple[int, ...], index: int, seed: int, std: float, dtype) -> torch.Tensor:
    """Tensor ``index`` of the checkpoint: ones for a norm, else normal(0, std); seeded alone."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int) -> list[list[int]]:
    """Group tensor indices into shards of at most ``shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(specs):
        nbytes = itemsize * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_shard(path: Path, items: list[tuple[str, tuple[int, ...]]], dtype, produce) -> int:
    """Write one safetensors file tensor by tensor; ``produce(k)`` gives item ``k``'s tensor.

    The header (names, dtypes, shapes, offsets) is known from the shapes, so it is written
    first and each tensor's bytes follow as soon as the tensor exists. Returns the bytes written.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in items:
        nbytes = itemsize * _numel(shape)
        header[name] = {
            "dtype": SAFE_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k, (_, shape) in enumerate(items):
            tensor = produce(k).contiguous()
            assert tuple(tensor.shape) == shape and tensor.dtype == dtype
            f.write(tensor.view(torch.uint8).numpy().tobytes())
            del tensor
    return 8 + len(blob) + offset


def make_checkpoint(
    out: str | Path,
    *,
    blocks: int,
    hidden: int = 3584,
    intermediate: int = 7168,
    heads: int = 28,
    kv_heads: int | None = None,
    dtype: str = "float16",
    seed: int = 0,
    shard_bytes: int = 2 * 10**9,
    vocab: int | None = None,
) -> dict:
    """Build a random-weight LLaMA checkpoint in folder ``out`` (which must not exist).

    Returns:
        ``{"path", "bytes", "params", "block_params", "shards"}`` of what was written.
    """
    from modules.process import building

    out = Path(out)
    if out.exists():
        raise TopiaryError(f"output: {out} exists; give a new folder")
    torch_dtype = DTYPES[dtype]
    config = llama_config(blocks, hidden, intermediate, heads, kv_heads or heads, dtype, vocab)
    specs = tensor_specs(config)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = plan_shards(specs, itemsize, shard_bytes)
    std = config.initializer_range
    total = 0
    weight_map = {}
    with building(out) as tmp:
        tmp.mkdir(parents=True)
        for k, indices in enumerate(shards):
            name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            items = [specs[i] for i in indices]

            def produce(j: int, indices=indices) -> torch.Tensor:
                i = indices[j]
                return make_tensor(specs[i][0], specs[i][1], i, seed, std, torch_dtype)

            total += write_shard(tmp / name, items, torch_dtype, produce)
            weight_map.update(dict.fromkeys((n for n, _ in items), name))
        params = sum(_numel(s) for _, s in specs)
        index = {"metadata": {"total_size": params * itemsize}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(tmp)
        for file in TOKENIZER_FILES:
            shutil.copy(REFERENCE / file, tmp / file)
    block = sum(_numel(s) for n, s in specs if n.startswith("model.layers.0."))
    return {"path": str(out), "bytes": total, "params": params, "block_params": block, "shards": len(shards)}


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.make_checkpoint OUT --blocks N [...]``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--blocks", type=int, required=True)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--intermediate", type=int, default=7168)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--dtype", default="float16", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the tokenizer's)")
    p.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GB (1e9 bytes)")
    args = p.parse_args(argv)
    try:
        info = make_checkpoint(
            args.out,
            blocks=args.blocks,
            hidden=args.hidden,
            intermediate=args.intermediate,
            heads=args.heads,
            kv_heads=args.kv_heads,
            dtype=args.dtype,
            seed=args.seed,
            shard_bytes=int(args.shard_gb * 1e9),
            vocab=args.vocab,
        )
    except TopiaryError as err:
        print(f"make_checkpoint: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
