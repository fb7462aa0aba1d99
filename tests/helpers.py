"""Tiny random models shared by the tests, built offline from Hugging Face config classes; a small disk."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
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
    """A ``modules.engine.launch`` target that holds its ranks (a test kills the flow meanwhile);
    ``work_dir`` is where ``modules.engine.launch.on_nodes`` keeps its files."""
    import time

    print("TOPIARY_SPAWNED_WAITING", flush=True)
    time.sleep(seconds)
    return {}


def spawned_strategy() -> dict:
    """A ``modules.engine.launch`` target that says which strategy its ranks joined, and how many they are."""
    from modules.engine.ranks import rank_and_world
    from modules.engine.statistics import joined

    return {"strategy": type(joined().strategy).__name__, "world": rank_and_world()[1]}


def spawned_failure(message: str) -> dict:
    """A ``modules.engine.launch`` target that fails as a step does on bad input."""
    from modules.errors import TopiaryError

    raise TopiaryError(message)


def weight_digests(out: Path) -> dict[str, str]:
    """sha256 of each weight file of a saved model (its shards and index), by name."""
    import hashlib

    files = sorted(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def text_windows(n: int, seqlen: int) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens of real text (this repository's Python) in the
    embedded model's vocabulary."""
    from transformers import AutoTokenizer

    from modules.engine.names import REFERENCE_DIR

    root = Path(__file__).resolve().parents[1]
    tok = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    text = "\n".join((root / f).read_text() for f in ("modules/process.py", "modules/engine/blocks.py"))
    stream = tok(text, return_tensors="pt").input_ids.reshape(-1)
    return stream[: n * seqlen].view(n, seqlen)


# Tiny random checkpoints of the issue-24 matrix: 2 blocks, 4 experts, hidden 64, the reference
# tokenizer's vocabulary. model_type -> config keys beyond SMALL (DeepSeek-V3's first block dense;
# qwen3 and those after it are dense).
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
TINY_ARCHS = {
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        head_dim=8,  # its rotary width: qk_rope_head_dim, as in the published config
    ),
    "qwen3": {},
    "gemma2": dict(sliding_window=16),  # soft-capped logits and attention, sliding and full layers
    "gemma3_text": dict(sliding_window=16),
    "phi3": {},  # fused qkv_proj and gate_up_proj Linears
    "olmo2": {},
    "granite": dict(logits_scaling=4.0),  # logits divided after the head
}


def tiny_config(model_type: str):
    """The config of a tiny random ``model_type`` model (one of :data:`TINY_ARCHS`)."""
    from transformers import AutoConfig, AutoTokenizer

    from modules.engine.names import REFERENCE_DIR

    vocab = len(AutoTokenizer.from_pretrained(REFERENCE_DIR))
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return AutoConfig.for_model(model_type, **{**SMALL, **TINY_ARCHS[model_type]}, vocab_size=vocab, **ids)


def save_tiny(model_type: str, folder: Path, seed: int = 0, **sizes) -> Path:
    """A tiny random ``model_type`` checkpoint written by ``save_pretrained`` (float32), with the
    reference model's tokenizer, in ``folder``; ``sizes`` override config keys."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modules.engine.names import REFERENCE_DIR

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    for key, value in sizes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(REFERENCE_DIR).save_pretrained(folder)
    return folder


def output_digests(out: Path) -> dict[str, str]:
    """:func:`weight_digests` and the sha256 of each keep-mask file under ``masks/``, by relative name."""
    import hashlib

    masks = {
        f"masks/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("masks/*"))
    }
    return {**weight_digests(out), **masks}


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


def gemma2_capped(vocab: int, max_positions: int):
    """A tiny Gemma-2 whose logits are soft-capped hard (cap 0.5): its forward post-processes
    the head's output, which a chunked head must keep."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=max_positions,
        final_logit_softcapping=0.5,
    )
    torch.manual_seed(0)
    return Gemma2ForCausalLM(cfg).eval()


def wait_for_log(
    proc: subprocess.Popen, log: Path, text: str, timeout: float = 600, poll: float = 0.3
) -> None:
    """Wait until ``text`` is in ``proc``'s log file ``log``; fail if the process ends first or
    ``timeout`` seconds pass (the log's end in the message)."""
    deadline = time.monotonic() + timeout
    while text not in (seen := log.read_text(errors="replace")):
        assert proc.poll() is None, f"ended ({proc.returncode}) before {text!r}:\n{seen[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{seen[-3000:]}"
        time.sleep(poll)
