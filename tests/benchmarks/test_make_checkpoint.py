"""Random LLaMA checkpoints for ``make bench-scale``: loadable, reproducible, one tensor at a time."""

from __future__ import annotations

import argparse
import json
import math
import sys
import weakref

import pytest
import torch

from benchmarks import bench_scale
from benchmarks import make_checkpoint as mc

TINY = {"blocks": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "shard_bytes": 40_000}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    return path, mc.make_checkpoint(path, seed=3, **TINY)


def test_loads_with_every_tensor_as_generated(tiny_ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modules.engine.models import inspect_model

    path, info = tiny_ckpt
    assert info["shards"] > 1 and info["block_params"] == 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64
    model, loading = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    assert model.dtype == torch.float16 and model.config.num_key_value_heads == 2
    assert len(AutoTokenizer.from_pretrained(path)) == model.config.vocab_size
    assert inspect_model(str(path)) is not None  # the prune's preflight accepts it
    index = json.loads((path / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == 2 * info["params"] == 2 * sum(t.numel() for t in state.values())
    for i, (name, shape) in enumerate(mc.tensor_specs(model.config)):
        expected = mc.make_tensor(name, shape, i, 3, model.config.initializer_range, torch.float16)
        assert torch.equal(state[name], expected), name
    assert float(state["model.layers.1.mlp.down_proj.weight"].float().std()) == pytest.approx(0.02, rel=0.05)


def test_reproducible_by_seed(tmp_path, tiny_ckpt):
    path, _ = tiny_ckpt
    again = tmp_path / "again"
    other = tmp_path / "other"
    mc.make_checkpoint(again, seed=3, **TINY)
    mc.make_checkpoint(other, seed=4, **TINY)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert all((path / s).read_bytes() == (again / s).read_bytes() for s in shards)
    assert any((path / s).read_bytes() != (other / s).read_bytes() for s in shards)
    with pytest.raises(mc.TopiaryError, match="exists"):
        mc.make_checkpoint(again, seed=3, **TINY)


def test_one_tensor_alive_at_a_time(tmp_path):
    """The writer drops each tensor before it asks for the next: memory is one tensor, not a shard."""
    items = [(f"t{k}", (256, 256)) for k in range(4)]
    alive: list[weakref.ref] = []

    def produce(k: int) -> torch.Tensor:
        assert all(ref() is None for ref in alive), "a previous tensor is still held"
        tensor = torch.full((256, 256), float(k), dtype=torch.float16)
        alive.append(weakref.ref(tensor))
        return tensor

    mc.write_shard(tmp_path / "x.safetensors", items, torch.float16, produce)
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "x.safetensors")
    assert [float(loaded[f"t{k}"][0, 0]) for k in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_run_measured_peak_is_the_childs(tmp_path):
    """Peak RSS is that child's own high-water mark, in bytes: not inherited from this (big) process."""
    small = bench_scale.run_measured([sys.executable, "-c", "pass"], tmp_path / "a.log")
    code = "import numpy as np; a = np.ones(300 * 2**20 // 8); print(a.sum())"
    big = bench_scale.run_measured([sys.executable, "-c", code], tmp_path / "b.log")
    assert small["rc"] == big["rc"] == 0
    assert big["peak"] - small["peak"] > 250 * 2**20 and small["peak"] < 200 * 2**20
    assert (
        bench_scale.run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "c.log")["rc"] == 3
    )


def test_prune_command_is_a_valid_topiary_prune(tmp_path):
    from flows.cli import parser

    args = argparse.Namespace(nsamples=8, seqlen=128, dtype="float16", admm_iters=2)
    for method in ("wanda", "admm-grad"):
        cmd = bench_scale.prune_command(tmp_path / "ckpt", method, tmp_path / "out", args)
        assert cmd[1:3] == ["-m", "flows.cli"]
        parsed = parser().parse_args(cmd[3:])
        assert parsed.method == method and parsed.nsamples == 8 and parsed.dtype == "float16"


def test_vocab_sets_the_head_and_embedding_rows(tmp_path):
    from safetensors import safe_open

    info = mc.make_checkpoint(tmp_path / "big", seed=3, vocab=50_000, **TINY)
    assert json.loads((tmp_path / "big" / "config.json").read_text())["vocab_size"] == 50_000
    shapes = {}
    for shard in (tmp_path / "big").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    assert shapes["lm_head.weight"] == shapes["model.embed_tokens.weight"] == (50_000, 64)
    assert info["params"] == sum(math.prod(s) for s in shapes.values())
    with pytest.raises(mc.TopiaryError, match="vocab: 100 is below"):
        mc.make_checkpoint(tmp_path / "small", vocab=100, **TINY)
