"""The routers table and the classification of every weight matrix of a block (issue 24).

Each architecture of :data:`tests.helpers.TINY_ARCHS` is built on the meta device from its
tiny config: its routers are where the table says, left out of the pruned linears, and
its fused experts are found with their orientation, and every other matrix is pruned.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from modules.engine.blocks import (
    EXPERTS as EXPERTS_KIND,
)
from modules.engine.blocks import (
    PRUNED,
    ROUTER,
    block_experts,
    block_linears,
    block_matrices,
    check_supported,
    expert_matrix,
    find_blocks,
    left_dense,
    unsupported_matrices,
)
from modules.engine.report import BlockReport, LinearReport, PruneReport
from modules.engine.routers import ROUTERS
from tests.helpers import tiny_config

# Fused 3-D experts of each block with experts, by mixture-of-experts architecture.
EXPERTS = {
    "gpt_oss": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "llama4_text": ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
    "mixtral": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "qwen3_moe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "olmoe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "deepseek_v3": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
}
MOE = list(EXPERTS)


def skeleton(model_type: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(model_type))


@pytest.mark.parametrize("model_type", MOE)
def test_each_router_is_where_the_table_says_and_is_left_dense(model_type):
    model = skeleton(model_type)
    _, blocks = find_blocks(model)
    block = blocks[-1]  # DeepSeek-V3's first block is dense
    paths = ROUTERS[type(block).__name__]
    experts = 4
    for path in paths:
        weight = block.get_submodule(path).weight
        assert tuple(weight.shape) == (experts, model.config.hidden_size), path
        assert block_matrices(block)[f"{path}.weight"] == ROUTER
        assert path not in block_linears(block), f"{path} must not be pruned"


@pytest.mark.parametrize("model_type", MOE)
def test_the_fused_experts_are_found_and_pruned(model_type):
    model = skeleton(model_type)
    prefix, blocks = find_blocks(model)
    first = 1 if model_type == "deepseek_v3" else 0  # first_k_dense_replace=1
    expected = [f"{prefix}.{i}.{name}" for i in range(first, 2) for name in EXPERTS[model_type]]
    assert unsupported_matrices(prefix, blocks) == []
    assert sorted(unsupported_matrices(prefix, blocks, (EXPERTS_KIND,))) == sorted(expected)
    check_supported(prefix, blocks)  # every method prunes them
    kinds = block_matrices(blocks[1])
    linears = {f"{n}.weight" for n in block_linears(blocks[1])}
    assert {n for n, k in kinds.items() if k == PRUNED} == linears
    assert not any(n.endswith("bias") for n in kinds), "gpt-oss's (experts, out) biases are not matrices"


@pytest.mark.parametrize("model_type", MOE)
def test_each_expert_matrix_is_out_by_in(model_type):
    """gpt-oss and Llama-4 store (experts, in, out), the others (experts, out, in) like a Linear."""
    model = skeleton(model_type)
    block = find_blocks(model)[1][1]
    experts = block_experts(block)
    hidden, width = model.config.hidden_size, getattr(model.config, "moe_intermediate_size", None)
    width = width or model.config.intermediate_size
    assert set(experts) == set(EXPERTS[model_type])
    assert set(experts.values()) == {model_type in ("gpt_oss", "llama4_text")}
    gate_up, down = (block.get_parameter(n) for n in EXPERTS[model_type])
    transposed = experts[EXPERTS[model_type][0]]
    assert tuple(expert_matrix(gate_up, 3, transposed).shape) == (2 * width, hidden)
    assert tuple(expert_matrix(down, 3, transposed).shape) == (hidden, width)


def test_a_dense_model_has_every_matrix_pruned():
    model = skeleton("qwen3")
    prefix, blocks = find_blocks(model)
    assert unsupported_matrices(prefix, blocks) == []
    assert set(block_matrices(blocks[0]).values()) == {PRUNED}
    dense = left_dense(model, prefix)
    assert set(dense) == {"outside blocks", "vectors"}
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    assert dense["outside blocks"]["params"] == embed + head + model.config.hidden_size


def test_left_dense_counts_routers_and_biases_of_gpt_oss():
    model = skeleton("gpt_oss")
    dense = left_dense(model, find_blocks(model)[0])
    hidden, experts = model.config.hidden_size, 4
    assert dense["routers"] == {"why": dense["routers"]["why"], "tensors": 2, "params": 2 * experts * hidden}
    assert dense["biases"]["tensors"] == 2 * (4 + 1 + 2)  # q k v o, router, the experts' two


def test_achieved_sparsity_counts_matrices_left_dense():
    """A router of 100 weights left dense with 0 zeros beside a linear of 100 weights pruned to 50."""
    block = BlockReport(
        0,
        "model.layers.0",
        0.5,
        "0.5",
        {"mlp.up_proj": LinearReport([10, 10], 50)},
        dense={"mlp.gate.weight": LinearReport([4, 25], 0)},
    )
    report = PruneReport("wanda", "0.5", 0.5, {}, 8, 16, "model.layers", [block])
    assert report.sparsity == 0.25
    again = PruneReport.from_dict(report.to_dict())
    assert again.sparsity == 0.25 and again.blocks[0].dense == block.dense


@pytest.mark.parametrize("model_type", MOE)
def test_each_experts_call_convention_is_the_table_s(model_type):
    """PRESCALED lists the experts modules called with the hidden states alone (every token for
    every expert, pre-scaled); every other one takes transformers' (hidden, top_k_index,
    top_k_weights), and each fused tensor's input is known (modules/engine/experts.py)."""
    import inspect

    from modules.engine.experts import experts_of, unknown_tensors
    from modules.engine.routers import PRESCALED

    block = find_blocks(skeleton(model_type))[1][-1]
    fused = block_experts(block)
    assert unknown_tensors(fused) == []
    for module in experts_of(block, fused).values():
        forward = getattr(type(module).forward, "__wrapped__", type(module).forward)
        params = list(inspect.signature(forward).parameters)[1:]
        assert (len(params) == 1) == (type(module).__name__ in PRESCALED), (type(module).__name__, params)


@pytest.mark.parametrize("model_type", MOE)
def test_routers_prune_makes_each_router_a_pruned_linear_of_its_block(model_type):
    """With ``routers="prune"`` the routers, and only they, join the block's linears; the report
    no longer lists them as left dense."""
    model = skeleton(model_type)
    prefix, blocks = find_blocks(model)
    block = blocks[-1]
    paths = ROUTERS[type(block).__name__]
    assert set(block_linears(block, routers="prune")) - set(block_linears(block)) == set(paths)
    kinds = block_matrices(block, "prune")
    assert all(kinds[f"{path}.weight"] == PRUNED for path in paths)
    assert ROUTER not in kinds.values()
    assert "routers" in left_dense(model, prefix)
    assert "routers" not in left_dense(model, prefix, routers="prune")
    with pytest.raises(ValueError, match="routers: 'sparse' is not one of dense, prune"):
        block_linears(block, routers="sparse")


def test_the_routers_choices_are_the_config_s():
    from typing import get_args

    from configs.schema import PruneCfg
    from modules.engine.routers import ROUTER_CHOICES

    assert get_args(PruneCfg.model_fields["routers"].annotation) == ROUTER_CHOICES


@pytest.mark.parametrize(("arch", "method"), [("mixtral", "wanda"), ("llama4_text", "sparsegpt")])
def test_a_pruned_router_is_the_method_on_its_own_input(tmp_path, arch, method):
    """Block 0's router, streamed with ``routers="prune"``, equals the method applied to the dense
    router on the statistics of the tensor entering the mixture-of-experts module of the whole
    dense model (a hook on that module, not on the router)."""
    from transformers import AutoModelForCausalLM

    from modules.engine.loop import prune_checkpoint
    from modules.engine.request import PruneRequest
    from modules.engine.weight_stages import method_options
    from modules.pruning.registry import Context, get_method
    from modules.pruning.sparsity import parse_spec
    from modules.pruning.stats import LayerStats
    from tests import helpers

    src = helpers.save_tiny(arch, tmp_path / "src")
    ids = helpers.text_windows(4, 32)
    request = PruneRequest(method, parse_spec(0.5, None), routers="prune")
    prune_checkpoint(src, tmp_path / "out", request, ids, activations="memory")

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    block = model.model.layers[0]
    path = ROUTERS[type(block).__name__][0]
    moe = block.get_submodule(path.rpartition(".")[0])
    seen, hidden = [], model.config.hidden_size
    handle = moe.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().reshape(-1, hidden)))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    X = torch.cat(seen).float()
    stats = LayerStats(X.shape[0], X.pow(2).sum(0), X.T @ X)
    opts, _ = method_options(request, Context(nsamples=4, device=torch.device("cpu")))
    W = block.get_submodule(path).weight.detach().clone()
    expected, keep = get_method(method).fn(W, stats, request.spec, **opts)
    saved = {k: v for f in (tmp_path / "out").glob("*.safetensors") for k, v in load_file(f).items()}
    name = [
        k for k in saved if k.startswith("model.layers.0.") and k.endswith(("gate.weight", "router.weight"))
    ]
    assert len(name) == 1, name  # Mixtral's is written back as block_sparse_moe.gate
    got = saved[name[0]]
    assert torch.equal(got != 0, keep), "the method's mask, on the router's own input"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # statistics summed batch by batch
