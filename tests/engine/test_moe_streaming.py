"""Streamed equals in-memory, tensor for tensor, on mixtures of experts (issue 24).

The oracle is the whole-model path, ``load_model`` -> :func:`tests.engine.oracle.prune_model`
(which prunes fused experts with the same per-expert rule,
:func:`modules.engine.experts.each_expert`, on statistics from its own passes) ->
``save_pretrained``; the streamed prune reads one tensor (Mixtral: one expert's tensors) at a
time. gpt-oss is fused on disk, ``(experts, in, out)``; Mixtral per expert, written back so.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modules.engine.gradients import compute_gradients
from modules.engine.loop import prune_checkpoint
from modules.engine.models import load_model
from modules.engine.request import PruneRequest
from modules.pruning.sparsity import parse_spec
from tests import helpers
from tests.engine.oracle import prune_model


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize(
    ("arch", "method", "setting", "options"),
    [
        ("gpt_oss", "sparsegpt", (0.5, None), {}),
        ("gpt_oss", "gblm", (None, "2:4"), {}),
        ("mixtral", "wanda", (0.5, None), {}),
        ("mixtral", "admm", (None, "2:4"), {"iters": 4, "selector": "gblm"}),
    ],
    ids=["gpt_oss-sparsegpt", "gpt_oss-gblm-2:4", "mixtral-wanda", "mixtral-admm-gblm-2:4"],
)
def test_streamed_moe_prune_equals_in_memory(tmp_path, arch, method, setting, options):
    src = helpers.save_tiny(arch, tmp_path / "src")
    ids = helpers.text_windows(4, 32)
    request = PruneRequest(method, parse_spec(*setting), options=options)
    grads = None
    if "grad" in request.needs():
        net, _ = load_model(str(src), "float32", "cpu")
        grads = compute_gradients(net, ids, tmp_path / "grads")
    net, tok = load_model(str(src), "float32", "cpu")
    report = prune_model(net, ids, request, grads_dir=grads)
    net.save_pretrained(tmp_path / "mem")
    prune_checkpoint(src, tmp_path / "streamed", request, ids, grads_dir=grads, activations="memory")
    mem, streamed = _tensors(tmp_path / "mem"), _tensors(tmp_path / "streamed")
    assert mem.keys() == streamed.keys() == _tensors(src).keys(), "the checkpoint's layout, both ways"
    for name, t in mem.items():
        assert t.dtype == streamed[name].dtype and torch.equal(t, streamed[name]), name
    experts = [n for n in report.blocks[0].linears if ".experts." in n]
    assert len(experts) == 2 and all(report.blocks[0].linears[n].pruned for n in experts)


def test_streamed_router_prune_equals_in_memory(tmp_path):
    """``routers="prune"`` with ``true_sequential``: Llama-4's router shares its statistics group
    with the shared expert's gate and up; both paths prune it there, to the same bytes."""
    src = helpers.save_tiny("llama4_text", tmp_path / "src")
    ids = helpers.text_windows(4, 32)
    request = PruneRequest("sparsegpt", parse_spec(0.5, None), true_sequential=True, routers="prune")
    net, _ = load_model(str(src), "float32", "cpu")
    report = prune_model(net, ids, request)
    net.save_pretrained(tmp_path / "mem")
    prune_checkpoint(src, tmp_path / "streamed", request, ids, activations="memory")
    mem, streamed = _tensors(tmp_path / "mem"), _tensors(tmp_path / "streamed")
    assert mem.keys() == streamed.keys()
    for name, t in mem.items():
        assert torch.equal(t, streamed[name]), name
    assert ["feed_forward.router", "feed_forward.shared_expert.gate_proj"] == report.blocks[0].stats_groups[
        2
    ][:2]
    assert report.blocks[0].linears["feed_forward.router"].sparsity == 0.5


@pytest.mark.parametrize(
    ("arch", "calibration", "routers"), [("gpt_oss", "routed", "dense"), ("mixtral", "all", "prune")]
)
def test_streamed_owl_on_experts_equals_in_memory(tmp_path, arch, calibration, routers):
    """OWL's ratio of a block takes every matrix it prunes (each expert's, scored on its own
    statistics; the router's with ``routers="prune"``): streamed (two sweeps over the expert
    groups) and in memory (all scores at once) give the same ratios, rates and bytes; one expert
    at a time gives the whole block's."""
    src = helpers.save_tiny(arch, tmp_path / "src")
    ids = helpers.text_windows(4, 32)
    request = PruneRequest("wanda", parse_spec(0.5, None), owl=True, owl_m=2.0, owl_lambda=0.2,
                           moe_calibration=calibration, routers=routers)  # fmt: skip
    net, _ = load_model(str(src), "float32", "cpu")
    mem_report = prune_model(net, ids, request)
    net.save_pretrained(tmp_path / "mem")
    ratios = mem_report.owl["ratios"]
    assert all(r > 0 for r in ratios) and len(set(ratios)) == len(ratios), ratios
    mem = _tensors(tmp_path / "mem")
    for group in (None, 1):
        out = tmp_path / f"streamed-{group}"
        report = prune_checkpoint(src, out, replace(request, expert_group=group), ids, activations="memory")
        assert report.owl == mem_report.owl, group
        streamed = _tensors(out)
        assert mem.keys() == streamed.keys()
        for name, t in mem.items():
            assert torch.equal(t, streamed[name]), (group, name)
