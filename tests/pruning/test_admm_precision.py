"""ADMM's default precision: fp32 up to FP32_MAX_INPUTS inputs, bf16 products only wider."""

from __future__ import annotations

import pytest
import torch

from modules.pruning.admm import FP32_MAX_INPUTS, prune_admm_grad, resolve_precision
from modules.pruning.registry import get_method
from modules.pruning.sparsity import SparsitySpec
from modules.pruning.stats import LayerStats

CPU = torch.device("cpu")
NATIVE_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _layer(c_out: int = 16, c_in: int = 64, tokens: int = 256):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(tokens, c_in, generator=g) * torch.exp(torch.randn(c_in, generator=g))
    W = torch.randn(c_out, c_in, generator=g)
    return W, LayerStats(tokens=tokens, sq_norm=X.pow(2).sum(0), gram=X.T @ X)


def test_auto_is_fp32_up_to_the_width_limit():
    assert resolve_precision("auto", CPU, FP32_MAX_INPUTS) == "fp32"
    assert resolve_precision("auto", CPU, FP32_MAX_INPUTS + 1) == ("mixed" if NATIVE_BF16 else "fp32")
    assert resolve_precision("mixed", CPU, 64) == "mixed"  # an explicit choice is kept


@pytest.mark.skipif(not NATIVE_BF16, reason="without native bf16, auto and mixed are fp32 anyway")
@pytest.mark.parametrize("fn", [get_method("admm").run, prune_admm_grad])
def test_default_equals_fp32_on_a_narrow_layer(fn):
    W, stats = _layer()
    spec = SparsitySpec(rate=0.5)
    default, keep = fn(W, stats, spec)
    fp32, keep32 = fn(W, stats, spec, precision="fp32")
    mixed, _ = fn(W, stats, spec, precision="mixed")
    assert torch.equal(keep, keep32)
    assert torch.equal(default, fp32)
    assert not torch.equal(mixed, fp32)  # the check above could tell the two apart
