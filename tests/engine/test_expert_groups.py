"""Fused experts a few at a time (``prune.expert_group``, :mod:`modules.engine.expert_groups`).

A run that holds a block's experts a group at a time writes the bytes of a run that holds
them all at once, on the CPU: the block's forward, the per-expert statistics, the masks,
the updates and the output shard (in the checkpoint's own layout: fused on disk for gpt-oss
and Llama-4, one tensor per expert for Mixtral, Qwen3-MoE and DeepSeek-V3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modules.engine.blocks import find_blocks
from modules.engine.expert_groups import GroupedExperts, expert_count, expert_params, ranges
from modules.engine.loop import prune_checkpoint
from modules.engine.request import PruneRequest
from modules.pruning.sparsity import parse_spec
from tests import helpers


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "llama4_text", "deepseek_v3"])
def test_a_grouped_block_forward_equals_the_whole_one(arch):
    """Three of six experts routed per token, groups of 4 (the last one short): each token's
    experts fall in different groups, and their outputs are still added in the module's order."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = helpers.tiny_config(arch)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if hasattr(config, key) and getattr(config, key):
            setattr(config, key, 6)
    if arch != "llama4_text":  # Llama-4's experts take every token for every expert
        config.num_experts_per_tok = 3
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    block = find_blocks(model)[1][-1]
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k), with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(0, 100, (3, 17)), use_cache=False)
    handle.remove()
    params = expert_params(block)
    held = {n: block.get_parameter(n).detach().clone() for n in params}
    with torch.no_grad():
        whole = block(*seen["a"], **seen["k"])
        for name, module in params.items():  # the experts leave the block: a group is read at a time
            module._parameters[name.rpartition(".")[2]] = torch.nn.Parameter(held[name].to("meta"))
        for size in (1, 4):
            load = lambda n, a, b: held[n][a:b].clone()  # noqa: E731
            with GroupedExperts(block, load, ranges(expert_count(block), size)):
                grouped = block(*seen["a"], **seen["k"])
            assert torch.equal(grouped[0] if isinstance(grouped, tuple) else grouped,
                               whole[0] if isinstance(whole, tuple) else whole), (arch, size)  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "method", "options"),
    [("mixtral", "sparsegpt", {}), ("gpt_oss", "admm", {"iters": 3}), ("deepseek_v3", "magnitude", {})],
)
def test_a_prune_by_expert_groups_writes_the_bytes_of_a_whole_block_prune(tmp_path, arch, method, options):
    src = helpers.save_tiny(arch, tmp_path / "src")
    ids = helpers.text_windows(4, 32)
    outputs = {}
    for group in (None, 3):
        request = PruneRequest(method, parse_spec(0.5, None), options=options, expert_group=group,
                               report_error=True)  # fmt: skip
        report = prune_checkpoint(src, tmp_path / f"out-{group}", request, ids, activations="memory")
        outputs[group] = (_tensors(tmp_path / f"out-{group}"), report.to_dict())
    (whole, whole_report), (grouped, grouped_report) = outputs[None], outputs[3]
    assert whole.keys() == grouped.keys() == _tensors(src).keys(), "the checkpoint's layout, both ways"
    for name, t in whole.items():
        assert torch.equal(t, grouped[name]), name
    experts = [n for n in grouped_report["blocks"][-1]["linears"] if ".experts." in n]
    assert len(experts) == 8 and all(grouped_report["blocks"][-1]["linears"][n]["pruned"] for n in experts)
    for key in ("sparsity", "model_zeros"):
        assert grouped_report.get(key) == whole_report.get(key), key
    assert [b["experts"] for b in grouped_report["blocks"]] == [b["experts"] for b in whole_report["blocks"]]


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_the_peak_loaded_bytes_are_the_trunk_and_one_expert_group(tmp_path, method):
    """A Qwen3-MoE whose 8 experts (2048 wide) outweigh its embeddings: a whole-block run holds the
    whole block at its peak; a run by groups of 2 holds the trunk and 2 experts' rows, never more
    (the capture loads the first block without its experts; it never runs)."""
    src = helpers.save_tiny("qwen3_moe", tmp_path / "src", num_experts=8, moe_intermediate_size=2048)
    experts = sum(t.nbytes for k, t in _tensors(src).items() if ".layers.1.mlp.experts." in k)
    streaming = {}
    for group in (None, 2):
        request = PruneRequest(method, parse_spec(0.5, None), expert_group=group)
        windows = helpers.text_windows(4, 32)
        report = prune_checkpoint(src, tmp_path / f"out-{group}", request, windows, activations="memory")
        streaming[group] = report.phases["streaming"]
    block = streaming[None]["largest_block_bytes"]
    assert experts > 0.9 * block  # the experts, not the embeddings, set a whole-block run's peak
    assert streaming[None]["peak_loaded_bytes"] == block
    assert streaming[2]["peak_loaded_bytes"] == block - experts + experts * 2 // 8
