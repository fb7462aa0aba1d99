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
    assert (
        "activations: mmap" in out
        and "batch size:" in out
        and "topiary prune --batch-size" in out
        and "50 TFLOP/s" in out
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["embedded", "--device-memory", "24XB"], "--device-memory: '24XB' is not a size"),
        (["embedded", "--device-memory", "24"], "is not a size"),
        (["embedded", "--device-memory", "0GB"], "is not a size"),
        (["embedded", "--device-memory", "1GB", "--host-memory", "lots"], "--host-memory"),
        (["embedded", "--device-memory", "1GB", "--method", "nope"], "method"),
        (["embedded", "--device-memory", "1GB", "--nsamples", "0"], "nsamples"),
        (["embedded", "--device-memory", "1GB", "--expert-group", "0"], "expert_group: 0 must be positive"),
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


MOE = {
    **TINY,
    "model_type": "qwen3_moe",
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "torch_dtype": "bfloat16",
}


def test_expert_group_by_hand():
    """One group of 2 of 4 experts, SparseGPT: the trunk and two experts held, statistics for two
    (twice under ``routed``: the routed sums and every token's), the experts read once per batch;
    the second group's statistics come from a pass of their own (the trunk run again)."""
    a = P.arch_from_config(MOE)
    expert = 3 * 32 * 64
    trunk = a.block_params() - 4 * expert
    assert trunk == 64 * 64 * 2 + 32 * 64 * 2 + 4 * 64 + 2 * 64 + 2 * 16  # q/o, k/v, router, norms, q/k norms
    # distinct inputs: q_proj's and o_proj's (64 each); each expert's gate_proj (64) and down_proj (32)
    trunk_stats = 4 * (64 + 64) + 4 * (64**2 + 64**2)
    expert_stats = 4 * (64 + 32) + 4 * (64**2 + 32**2)
    held = 2 * (trunk + 2 * expert)  # bfloat16
    work = 9 * 64 * 64 + 8 * 64 * 64  # the update of the largest linear (q_proj, o_proj or gate_proj)
    budget = held + trunk_stats + 4 * expert_stats + P.forward_bytes(a, 1, 8)
    plan = P.make_plan(
        a, method="sparsegpt", device_memory=int(budget / 0.9) + 1, host_memory=10**9, nsamples=4, seqlen=8,
        expert_group=2,
    )  # fmt: skip
    assert plan.batch_size == 1 and plan.expert_group == 2 and plan.loaded_bytes == held
    assert plan.statistics_bytes == trunk_stats + 2 * 2 * expert_stats
    assert plan.stage("statistics").device == held + trunk_stats + 4 * expert_stats + P.forward_bytes(a, 1, 8)
    assert plan.stage("update").device == held + trunk_stats + 2 * expert_stats + work
    assert plan.stage("propagate").device == held + P.forward_bytes(a, 1, 8)
    reads = 2 * (2 * a.block_params() + 3 * 2 * 4 * expert)  # 2 blocks: each, and its experts 3 more times
    assert plan.stage("propagate").read == reads
    # the second group's statistics pass: the trunk again, that group's 2 experts once per batch (4)
    assert plan.stage("statistics").read == reads + 2 * (2 * trunk + 4 * 2 * 2 * expert)
    tokens = 4 * 8
    trunk_forward = 2 * tokens * (2 * 64 * 64 + 2 * 32 * 64) + 4 * 4 * 8**2 * 4 * 16  # linears, scores
    routed = 2 * tokens * 2 * expert  # each token through its top 2 experts
    gram = 2 * tokens * (2 * 64**2 + 4 * (64**2 + 32**2))
    flops = 2 * (trunk_forward + routed + gram) + 2 * (trunk_forward + routed / 2)
    assert plan.stage("statistics").flops == pytest.approx(flops, rel=1e-12)
    assert plan.stage("statistics").note.endswith("then a pass per later expert group (1)")
    assert plan.stage("update").read == 2 * 2 * a.block_params()  # each group once
    assert plan.stage("propagate").seconds == pytest.approx(
        plan.stage("propagate").flops / 50e12 + reads / 1e9
    )
    one = P.make_plan(
        a, method="sparsegpt", device_memory=10**9, host_memory=10**9, nsamples=4, seqlen=8,
        moe_calibration="all",
    )  # fmt: skip
    assert one.statistics_bytes == trunk_stats + 4 * expert_stats


STAGED = ("statistics", "masks", "update", "propagate")


@pytest.mark.parametrize("name", list(PUBLISHED))
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "gblm"])
def test_expert_group_falls_with_n_and_is_the_whole_block_at_every_expert(name, method):
    """With a device large enough for the whole batch, every stage's device and host memory grow
    with the group; a group of every expert (or more) is the whole block, figure for figure."""
    a, _ = P.read_arch(str(FIXTURE.parent / name))
    kw = {"method": method, "host_memory": 10**12, "nsamples": 128, "seqlen": 2048}
    groups = (a.experts // 4, a.experts // 2, a.experts - 1)  # DeepSeek-V3's dense blocks are larger below 9
    plans = {n: P.make_plan(a, device_memory=10**13, expert_group=n, **kw) for n in groups}
    assert len({p.batch_size for p in plans.values()}) == 1
    for stage in STAGED:
        small, mid, most = (plans[n].stage(stage) for n in sorted(plans))
        if small.device:
            assert small.device < mid.device < most.device, stage
            assert small.host < mid.host < most.host, stage
    for device in (24 * 10**9, 80 * 10**9):
        whole = P.make_plan(a, device_memory=device, **kw)
        assert whole.expert_group is None
        for n in (a.experts, a.experts + 1):
            grouped = P.make_plan(a, device_memory=device, expert_group=n, **kw)
            assert grouped.stages == whole.stages and grouped.loaded_bytes == whole.loaded_bytes
            assert grouped.expert_group is None and grouped.fits == whole.fits


def test_the_largest_block_of_deepseek_is_its_dense_one_for_small_groups():
    """DeepSeek-V3's first three blocks have a dense MLP (18432 wide): with one expert at a time
    it is the largest block held, and the largest statistics."""
    a, _ = P.read_arch(str(FIXTURE.parent / "deepseek-v3.json"))
    plan = P.make_plan(
        a, method="sparsegpt", device_memory=10**11, host_memory=10**12, nsamples=8, seqlen=64, expert_group=1
    )
    assert plan.loaded_bytes == 2 * a.block_params(moe=False) > 2 * a.block_params(group=1)
    assert plan.statistics_bytes == P.statistics_bytes(a, "sparsegpt", moe=False)


# The papers' calibration (128 windows of 2048 tokens), on 24 GB and 80 GB devices.
@pytest.mark.parametrize("name", list(PUBLISHED))
@pytest.mark.parametrize("device", ["24GB", "80GB"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_the_group_plan_proposes_fits_and_one_more_expert_does_not(name, device, method):
    a, _ = P.read_arch(str(FIXTURE.parent / name))
    size = P.parse_size(device)
    kw = {
        "method": method,
        "device_memory": size,
        "host_memory": 256 * 10**9,
        "nsamples": 128,
        "seqlen": 2048,
    }
    best = P.make_plan(a, **kw).largest_group
    assert best is not None  # every fixture has a group that fits both devices
    peak = max(s.device for s in P.make_plan(a, expert_group=best, **kw).stages if s.name != "eval")
    assert peak <= 0.9 * size
    if best < a.experts:
        assert not P.make_plan(a, expert_group=best + 1, **kw).fits


def test_cli_states_the_expert_group(capsys):
    mixtral = str(FIXTURE.parent / "mixtral-8x7b.json")
    common = ["--method", "sparsegpt", "--nsamples", "128", "--seqlen", "2048", "--host-memory", "256GB"]
    assert main(["plan", mixtral, "--device-memory", "8GB", *common]) == 0
    out = capsys.readouterr().out
    assert "the whole block held at a time (2.90 GB)" in out and "block on the device: DOES NOT FIT" in out
    best = P.make_plan(
        P.read_arch(mixtral)[0], method="sparsegpt", device_memory=8 * 10**9, host_memory=256 * 10**9,
        nsamples=128, seqlen=2048,
    ).largest_group  # fmt: skip
    assert best and f"the whole block does not fit; fits with --expert-group {best} (batch" in out
    assert main(["plan", mixtral, "--device-memory", "8GB", *common, "--expert-group", str(best)]) == 0
    out = capsys.readouterr().out
    assert (
        f"expert group {best}: the trunk and {best} experts" in out
        and "expert group on the device: fits" in out
        and "ignored" not in out
    )


def test_cli_says_an_expert_group_of_a_dense_model_is_ignored(capsys):
    """A dense model has no experts: the plan is the one without the flag, and it says so."""
    argv = ["plan", "embedded", "--device-memory", "1GB", "--method", "wanda"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--expert-group", "2"]) == 0
    out = capsys.readouterr().out
    note = "  expert groups: --expert-group 2 ignored (a dense model has no experts)"
    assert note not in plain and out.splitlines() == [*plain.splitlines(), note]


def test_the_fastest_group_is_the_largest_at_the_largest_batch():
    """The experts are read once per batch, so a smaller group that leaves room for a larger batch
    is faster: DeepSeek-V3 with Wanda on 24 GB fits 206 experts at batch 1, 108 at batch 4."""
    a, _ = P.read_arch(str(FIXTURE.parent / "deepseek-v3.json"))
    kw = {"method": "wanda", "device_memory": 24 * 10**9, "host_memory": 256 * 10**9, "nsamples": 128}
    plan = P.make_plan(a, seqlen=2048, **kw)

    def at(n: int) -> P.Plan:
        return P.make_plan(a, seqlen=2048, expert_group=n, **kw)

    largest, fastest = plan.group_choices
    assert largest == plan.largest_group and fastest < largest
    assert at(fastest).batch_size == at(1).batch_size > at(fastest + 1).batch_size
    assert plan.group_choices[fastest] == (at(fastest).batch_size, P.prune_seconds(at(fastest)))
    assert plan.group_choices[fastest][1] < plan.group_choices[largest][1]
    reads = at(fastest).stage("propagate").read
    assert reads == 61 * (
        plan.block_bytes + (128 // at(fastest).batch_size - 1) * 256 * 2 * a.expert_params()
    )


DOC_CONFIGS = {
    "Mixtral-8x7B": "mixtral-8x7b.json",
    "Qwen3-235B-A22B": "qwen3-235b-a22b.json",
    "DeepSeek-V3": "deepseek-v3.json",
    "gpt-oss-120b": "gpt-oss-120b.json",
}


def test_the_expert_group_table_of_the_docs_is_what_plan_prints():
    """docs/moe.md's table of the four mixtures of experts at 24 and 80 GB, row by row."""
    doc = (Path(__file__).parents[2] / "docs" / "moe.md").read_text()
    rows = [line.split(" | ") for line in doc.splitlines() if line.startswith("| ") and " | 24GB | " in line]
    rows += [line.split(" | ") for line in doc.splitlines() if line.startswith("| ") and " | 80GB | " in line]
    assert len(rows) == 16

    def cell(plan: P.Plan) -> str:
        peak = max(s.device for s in plan.stages if s.name != "eval")
        return f"{P.fmt_bytes(peak)}, {P._time(P.prune_seconds(plan))}"

    for name, method, device, whole, groups in rows:
        a, _ = P.read_arch(str(FIXTURE.parent / DOC_CONFIGS[name.lstrip("| ")]))
        kw = {"method": method, "device_memory": P.parse_size(device), "host_memory": 256 * 10**9}
        plan = P.make_plan(a, nsamples=128, seqlen=2048, **kw)
        expect = cell(plan) if plan.fits else f"{cell(plan).split(',')[0]} (does not fit)"
        assert whole == expect, (name, method, device)
        named = [
            f"`--expert-group {n}`: {cell(P.make_plan(a, nsamples=128, seqlen=2048, expert_group=n, **kw))} "
            f"({batch})"
            for n, (batch, _) in plan.group_choices.items()
        ]
        assert groups.rstrip(" |") == (
            "the whole block" if plan.largest_group == a.experts else "; ".join(named)
        )
