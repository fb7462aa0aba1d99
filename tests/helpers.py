"""Tiny random models shared by the tests, built offline from Hugging Face config classes; a small disk."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch


def tiny_opt(vocab: int, seed: int = 0, max_positions: int = 64) -> torch.nn.Module:
    """A 2-block OPT (width 32): learned positions, ``final_layer_norm``, head tied to the embeddings."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=vocab,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        word_embed_proj_dim=32,
        dropout=0.0,
    )
    torch.manual_seed(seed)
    return OPTForCausalLM(cfg).eval()


def tiny_llama(
    vocab: int,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    max_positions: int = 64,
    tie: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A LLaMA with ``layers`` blocks of width ``hidden`` (MLP ``2 * hidden``), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def report_dict(
    sparsities: list[float], errors: list[float | None] | None = None, method: str = "sparsegpt", **extra
) -> dict:
    """A pruning report as ``PruneReport.to_dict`` writes it: block ``i`` has one linear of 100
    weights with ``round(100 * sparsities[i])`` pruned and error ``errors[i]``."""
    from modules.engine.report import BlockReport, LinearReport, PruneReport

    errors = errors or [None] * len(sparsities)
    blocks = []
    for i, (s, e) in enumerate(zip(sparsities, errors, strict=True)):
        linears = {"mlp.up_proj": LinearReport([10, 10], round(100 * s))}
        blocks.append(BlockReport(i, f"model.layers.{i}", 0.5, "0.5", linears, reconstruction_error=e))
    report = PruneReport(method, "0.5", 0.5, {}, 8, 16, "model.layers", blocks, **extra)
    return report.to_dict()


def toy_method(calls: list):
    """A method that is not in the registry, as a registry entry; each call appends its ``power``.

    Per row it keeps the top ``|W| * sq_norm**power``; ``power`` must be > 0 (its ``check``).
    """
    from modules.pruning.registry import Method
    from modules.pruning.sparsity import keep_mask

    def prune_toy(W: torch.Tensor, stats, spec, power: float = 1.0):
        calls.append(power)
        keep = keep_mask(W.abs() * stats.sq_norm.pow(power), spec, group="row")
        return W.masked_fill(~keep, 0), keep

    def check(options) -> list[str]:
        return [] if options["power"] > 0 else [f"power={options['power']} must be > 0"]

    return Method("toy", prune_toy, "a test's method: |W| * ||X||^(2 power)", check=check)


def spawned_wait(seconds: float, work_dir: str | None = None) -> dict:
    """A ``tasks.spawn`` target that holds its ranks (a test kills the flow meanwhile);
    ``work_dir`` is where ``tasks.spawn.on_nodes`` keeps its files."""
    import time

    print("TOPIARY_SPAWNED_WAITING", flush=True)
    time.sleep(seconds)
    return {}


def spawned_strategy() -> dict:
    """A ``tasks.spawn`` target that says which strategy its ranks joined, and how many they are."""
    from modules.engine.ranks import rank_and_world
    from modules.engine.statistics import joined

    return {"strategy": type(joined().strategy).__name__, "world": rank_and_world()[1]}


def spawned_failure(message: str) -> dict:
    """A ``tasks.spawn`` target that fails as a step does on bad input."""
    from modules.errors import TopiaryError

    raise TopiaryError(message)


def weight_digests(out: Path) -> dict[str, str]:
    """sha256 of each weight file of a saved model (its shards and index), by name."""
    import hashlib

    files = sorted(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@contextlib.contextmanager
def small_disk(path: Path, size: str = "2m"):
    """A real file system of ``size`` mounted at ``path`` (tmpfs) for the block; skips the test
    where this process may not mount one (not root, or in a container without the right)."""
    path.mkdir(parents=True, exist_ok=True)
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
