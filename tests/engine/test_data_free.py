"""Data-free methods (magnitude) run through the driver without any forward pass."""

from __future__ import annotations

import copy

import torch

from configs.schema import PruneCfg
from modules.engine.blocks import find_blocks
from modules.engine.request import PruneRequest
from modules.pruning.registry import METHOD_NAMES, get_method
from modules.pruning.sparsity import parse_spec
from tests.engine.oracle import prune_model
from tests.helpers import tiny_llama


def _count_forwards(model: torch.nn.Module) -> list[int]:
    """Count calls of the embeddings and of every decoder block (pre-hooks, so a capture counts too)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    _, blocks = find_blocks(model)
    for module in [model.get_input_embeddings(), *blocks]:
        module.register_forward_pre_hook(hook)
    return calls


def test_only_magnitude_is_data_free():
    assert [m for m in METHOD_NAMES if get_method(m).data_free] == ["magnitude"]


def test_magnitude_runs_no_forward_and_prunes_as_the_measured_path(tmp_path):
    model = tiny_llama(64, layers=2, hidden=32)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    measured = copy.deepcopy(model)
    for spec in (parse_spec(0.5), parse_spec(pattern="2:4")):
        fast, slow = copy.deepcopy(model), copy.deepcopy(measured)
        fast_calls, slow_calls = _count_forwards(fast), _count_forwards(slow)
        masks = tmp_path / str(spec).replace(":", "-")
        report = prune_model(fast, ids, PruneRequest(method="magnitude", spec=spec), mask_dir=masks)
        slow_report = prune_model(slow, ids, PruneRequest(method="magnitude", spec=spec, report_error=True))
        assert fast_calls[0] == 0
        assert slow_calls[0] > 0
        assert [b.reconstruction_error for b in report.blocks] == [None, None]
        assert all(0.0 < b.reconstruction_error < 1.0 for b in slow_report.blocks)
        assert report.sparsity == slow_report.sparsity
        assert sorted(p.name for p in masks.iterdir()) == ["block_0000.safetensors", "block_0001.safetensors"]
        for (name, p), (_, q) in zip(fast.named_parameters(), slow.named_parameters(), strict=True):
            assert torch.equal(p, q), name


def test_report_error_and_owl_bring_the_data_passes_back():
    assert PruneRequest(method="magnitude", spec=parse_spec(0.5)).data_free()
    assert not PruneRequest(method="magnitude", spec=parse_spec(0.5), owl=True).data_free()
    assert not PruneCfg(method="magnitude", report_error=True).request().data_free()
    assert not PruneRequest(method="wanda", spec=parse_spec(0.5)).data_free()
