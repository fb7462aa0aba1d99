"""``topiary plan``: the estimator's arithmetic, its choices, and the command's bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from modules.engine import plan as P

FIXTURE = Path(__file__).parents[1] / "fixtures" / "configs" / "llama-2-70b.json"
TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}


def tiny(**changes) -> P.Arch:
    return P.arch_from_config({**TINY, **changes})


def test_tiny_config_by_hand():
    """Every figure of a tiny GQA config, worked out by hand (k/v are 2 heads x 16 wide)."""
    a = tiny()
    assert a.head_dim == 16 and a.kv_heads == 2
    assert a.linear_params() == 64 * 64 * 2 + 32 * 64 * 2 + 160 * 64 * 3 == 43008
    assert a.block_params() == 43008 + 2 * 64
    assert a.total_params() == 3 * 43136 + 2 * 100 * 64 + 64
    plan = P.make_plan(a, method="sparsegpt", device_memory=10**9, host_memory=10**9, nsamples=4, seqlen=8)
    assert plan.block_bytes == 43136 * 2  # float16
    assert plan.activation_bytes == 4 * 8 * 64 * 4
    assert plan.statistics_bytes == 4 * (64 + 64 + 64 + 160) + 4 * (3 * 64**2 + 160**2)
    assert P.statistics_bytes(a, "wanda") == 4 * 352
    assert P.statistics_bytes(a, "gblm") == 4 * 352 + 4 * 43008
    assert P.statistics_bytes(a, "magnitude") == 0
    free = P.make_plan(a, method="magnitude", device_memory=10**9, host_memory=10**9, nsamples=4, seqlen=8)
    assert free.activations == "none" and free.stage("statistics").flops == 0 == free.stage("windows").host
    # per token: 2 hidden + q/k/v (4 + 2 * 2 heads of 16) + 3 MLP products; scores 4 heads x 8 x 8
    assert P.forward_bytes(a, 1, 8) == 4 * (8 * (128 + 128 + 480) + 4 * 64)
    assert P.forward_flops(a, 4, 8) == 2 * 43008 * 32 + 4 * 4 * 64 * 4 * 16
    assert plan.stage("statistics").flops == 3 * (P.forward_flops(a, 4, 8) + 2 * 32 * (3 * 64**2 + 160**2))
    assert plan.stage("propagate").flops == 3 * P.forward_flops(a, 4, 8)


def test_counts_match_the_transformers_model():
    """Parameter counts and linear shapes agree with LlamaForCausalLM built from the same config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    for changes in ({}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}):
        a = tiny(**changes)
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**{**TINY, **changes}))
        block = model.model.layers[0]
        assert sum(p.numel() for p in block.parameters()) == a.block_params()
        assert sum(p.numel() for p in model.parameters()) == a.total_params()
        shapes = {
            n: tuple(m.weight.shape) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)
        }
        assert shapes == a.linears()


def test_llama2_70b():
    """The published count (68,976,648,192); one block about 70e9 / 80 params in fp16."""
    a, _ = P.read_arch(str(FIXTURE))
    assert a.total_params() == 68_976_648_192
    kw = {"nsamples": 128, "seqlen": 2048}
    plan = P.make_plan(
        a, method="admm-grad", device_memory=P.parse_size("24GB"), host_memory=24 * 2**30, **kw
    )
    assert plan.block_bytes == pytest.approx(70e9 / 80 * 2, rel=0.03)
    assert plan.fits and plan.batch_size >= 1
    # 128 windows of 2048: two 8.6 GB activation buffers do not fit in half of a 24 GiB host
    assert plan.activations == "mmap"
    assert plan.admm_precision == "fp32 up to 1024 inputs, mixed above"
    # the down_proj Gram matrix dominates: 28672^2 fp32
    assert plan.statistics_bytes > 4 * 28672**2
    small = P.make_plan(
        a, method="admm-grad", device_memory=P.parse_size("8GB"), host_memory=24 * 2**30, **kw
    )
    assert not small.fits
    big_host = P.make_plan(a, method="wanda", device_memory=24 * 10**9, host_memory=256 * 2**30, **kw)
    assert big_host.activations == "memory" and big_host.statistics_bytes < 10**6


def test_activations_threshold_and_batch_size():
    a = tiny()
    acts = 4 * 8 * 64 * 4
    host = int(2 * acts / P.HOST_SHARE)

    def plan(device: int, host: int) -> P.Plan:
        return P.make_plan(a, method="wanda", device_memory=device, host_memory=host, nsamples=4, seqlen=8)

    at, below = plan(10**9, host), plan(10**9, host - 1)
    assert (at.activations, below.activations) == ("memory", "mmap")
    assert below.stage("windows").disk == 2 * acts and at.stage("windows").host == 2 * acts

    def need(batch: int) -> int:  # block + Wanda's statistics + the forward of ``batch`` windows
        return int((2 * 43136 + 4 * 352 + P.forward_bytes(a, batch, 8)) / (1 - P.DEVICE_RESERVE)) + 1

    assert plan(need(2), 10**9).batch_size == 2
    assert plan(need(4), 10**9).batch_size == 4


def test_the_registry_is_built_from_the_traits_the_estimate_reads():
    """What each method reads, its steps and its defaults: the registry's entries (torch) say
    what the torch-free :data:`modules.pruning.traits.TRAITS` that ``topiary plan`` reads says."""
    from modules.pruning import admm
    from modules.pruning.registry import METHODS, get_method, method_options
    from modules.pruning.traits import TRAITS

    assert set(TRAITS) == set(METHODS)
    for name in METHODS:
        method = get_method(name)
        assert TRAITS[name].reads - {"sq_norm"} == method.needs, name
        assert ("sq_norm" not in TRAITS[name].reads) == method.data_free, name
        assert TRAITS[name].masks_step == method.mask_stage({}), name
        assert TRAITS[name].update_step == method.update_stage(), name
    assert method_options("admm")["iters"] == P.ADMM_ITERS
    assert method_options("admm-grad")["ks"] == P.ADMM_KS
    assert admm.FP32_MAX_INPUTS == P.FP32_MAX_INPUTS


@pytest.mark.parametrize(
    ("text", "size"),
    [("24GB", 24 * 10**9), ("80GiB", 80 * 2**30), ("512MB", 512 * 10**6), ("1.5 tib", 1.5 * 2**40)],
)
def test_parse_size(text, size):
    assert P.parse_size(text) == size


def test_import_is_light():
    """The command answers in well under a second: no torch behind ``modules.engine.plan``."""
    heavy = "{'torch', 'transformers', 'prefect'}"
    code = f"import sys, modules.engine.plan; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("topiary: error: "), err
    return err[0]


def test_cli_prints_every_stage(capsys):
    argv = [
        "plan",
        str(FIXTURE),
        "--device-memory",
        "24GB",
        "--method",
        "sparsegpt",
        "--host-memory",
        "24GiB",
    ]
    assert main([*argv, "--nsamples", "128", "--seqlen", "2048"]) == 0
    out = capsys.readouterr().out
    for stage in P.STAGES:
        assert f"\n  {stage} " in out
    assert "activations: mmap" in out and "batch size:" in out and "50 TFLOP/s" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["embedded", "--device-memory", "24XB"], "--device-memory: '24XB' is not a size"),
        (["embedded", "--device-memory", "24"], "is not a size"),
        (["embedded", "--device-memory", "0GB"], "is not a size"),
        (["embedded", "--device-memory", "1GB", "--host-memory", "lots"], "--host-memory"),
        (["embedded", "--device-memory", "1GB", "--method", "nope"], "method"),
        (["embedded", "--device-memory", "1GB", "--nsamples", "0"], "nsamples"),
        (["no/such/dir/", "--device-memory", "1GB"], "does not exist"),
        (["org/not-cached", "--device-memory", "1GB"], "local Hugging Face cache has no config.json"),
        (["README.md", "--device-memory", "1GB"], "not readable JSON"),
    ],
)
def test_cli_bad_input(capsys, argv, needle):
    assert main(["plan", *argv]) == 2
    assert needle in _error_line(capsys)


def test_cli_bad_config(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "hidden_size": "wide"}))
    assert main(["plan", str(tmp_path), "--device-memory", "1GB"]) == 2
    assert "hidden_size='wide'" in _error_line(capsys)


def test_cli_hub_id_from_the_local_cache(tmp_path):
    """A Hub id is read from the real cache layout (refs/main -> snapshots/<commit>/config.json)."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text(json.dumps(TINY))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "plan", "org/tiny", "--device-memory", "1GB"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 blocks, hidden 64, intermediate 160, heads 4 (kv 2" in proc.stdout


# Published totals of mixtures of experts (their model cards; DeepSeek-V3 without its 14 B
# multi-token-prediction module, which transformers does not build).
PUBLISHED = {
    "mixtral-8x7b.json": 46.7e9,
    "qwen3-235b-a22b.json": 235e9,
    "deepseek-v3.json": 671e9,
    "gpt-oss-120b.json": 116.83e9,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_mixtures_of_experts_count_their_experts(name):
    a, _ = P.read_arch(str(FIXTURE.parent / name))
    assert a.total_params() == pytest.approx(PUBLISHED[name], rel=0.01)
    assert a.experts and a.active_params() < a.linear_params()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_moe_counts_match_the_transformers_model(model_type):
    """Exact counts on tiny configs: every block (DeepSeek-V3's first one dense) and the model."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_config

    config = tiny_config(model_type)
    a = P.arch_from_config(config.to_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = model.model.layers
    first_dense = a.dense_blocks == 1
    assert a.dense_blocks == (1 if model_type == "deepseek_v3" else 0)
    assert sum(p.numel() for p in blocks[0].parameters()) == a.block_params(moe=not first_dense)
    assert sum(p.numel() for p in blocks[1].parameters()) == a.block_params()
    assert sum(p.numel() for p in model.parameters()) == a.total_params()
