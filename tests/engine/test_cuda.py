"""The streamed prune on CUDA: the same result as on the CPU, and half-precision checkpoints.

Skipped without CUDA; ``make gpu-check`` (benchmarks/gpu_check.py) runs them on a GPU
machine and reports each case. The model is the embedded one (4 blocks, hidden 128), the
windows those of tests/engine/test_streaming.py (real text, 4 x 32 tokens).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modules.engine.loop import prune_checkpoint
from modules.engine.models import load_model
from modules.engine.names import REFERENCE_DIR
from modules.evaluation.perplexity import perplexity_streamed
from tests import helpers
from tests.engine.test_streaming import SEQLEN, N, assert_same_tensors, request_of, tensors

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return helpers.text_windows(N, SEQLEN)


# SparseGPT and ADMM sweep columns and iterate on Gram matrices: a rounding difference in
# the statistics moves their weights, and later blocks see the moved outputs. On the CPU,
# summing the same windows in another order (batches of 1 and 3 instead of 8) moved the
# weights by at most 2.2e-6 (SparseGPT) and 7e-7 (ADMM) relative to each matrix's norm
# and flipped no mask entry of 802,816. CUDA's kernels round every product differently,
# not only the order of sums: 50 times that, and at most one mask entry in 10,000.
WEIGHT_RTOL = 1e-4
MASK_FLIPS = 1e-4
# Half precision against the CPU's fp32 prune of the same checkpoint: on the CPU, bf16 and
# fp16 prunes (Wanda, SparseGPT) gave perplexities within 2.6% of fp32's (523-630 on
# these windows); twice that leaves room for CUDA's half-precision kernels, while an
# overflow or a lost conversion is off by far more (or not finite).
HALF_PPL_RTOL = 0.052


def masks(out: Path) -> dict[str, torch.Tensor]:
    """Every block's keep-masks of a pruned output (``masks/block_*.safetensors``)."""
    found: dict[str, torch.Tensor] = {}
    for path in sorted((out / "masks").glob("block_*.safetensors")):
        found.update(load_file(str(path)))
    return found


def prune_on(device: str, model: str | Path, out: Path, method: str, ids, dtype=torch.float32):
    p = request_of(method, iters=5) if method == "admm" else request_of(method)  # 5 ADMM steps keep it fast
    prune_checkpoint(model, out, p, ids, device=device, dtype=dtype)
    return out


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_selecting_methods_give_the_same_bits_on_cuda_and_cpu(tmp_path, ids, method):
    """A mask from |W| (and ||X||): the same keep-masks, so the same weights, bit for bit."""
    cpu = prune_on("cpu", "embedded", tmp_path / "cpu", method, ids)
    gpu = prune_on(DEVICE, "embedded", tmp_path / "gpu", method, ids)
    assert len(masks(cpu)) == 28  # 4 blocks x 7 linears
    assert_same_tensors(masks(cpu), masks(gpu))
    assert_same_tensors(tensors(cpu), tensors(gpu))


@pytest.mark.parametrize("method", ["sparsegpt", "admm"])
def test_updating_methods_agree_on_cuda_and_cpu_within_rounding(tmp_path, ids, method):
    cpu = prune_on("cpu", "embedded", tmp_path / "cpu", method, ids)
    gpu = prune_on(DEVICE, "embedded", tmp_path / "gpu", method, ids)
    keep_cpu, keep_gpu = masks(cpu), masks(gpu)
    assert sorted(keep_cpu) == sorted(keep_gpu) and len(keep_cpu) == 28
    flips = sum(int((keep_cpu[k] != keep_gpu[k]).sum()) for k in keep_cpu)
    total = sum(m.numel() for m in keep_cpu.values())
    assert flips <= MASK_FLIPS * total, f"{flips} of {total} mask entries differ"
    w_cpu, w_gpu = tensors(cpu), tensors(gpu)
    assert sorted(w_cpu) == sorted(w_gpu)
    for name, w in w_cpu.items():
        if name in keep_cpu:
            rel = float((w_gpu[name] - w).norm() / w.norm())
            assert rel <= WEIGHT_RTOL, f"{name}: relative difference {rel:.2e}"
        else:  # embeddings and norms are not pruned: copied bit for bit
            assert torch.equal(w_gpu[name], w), name


@pytest.fixture(scope="module")
def half_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The embedded model saved as fp32, bf16 and fp16 checkpoints (weights cast once)."""
    root = tmp_path_factory.mktemp("half")
    for dtype in ("float32", "bfloat16", "float16"):
        net, _ = load_model("embedded", dtype, "cpu")
        net.save_pretrained(root / dtype)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(REFERENCE_DIR / name, root / dtype / name)
    return {d: root / d for d in ("float32", "bfloat16", "float16")}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_prune_and_evaluate_on_cuda(
    tmp_path,
    half_checkpoints,
    ids,
    dtype,
    method,
):
    """Pruned in the checkpoint's dtype on CUDA, written in it, exactly half of each linear
    zero, and a finite streamed perplexity on CUDA close to the CPU's fp32 prune's."""
    torch_dtype = getattr(torch, dtype)
    out = prune_on(DEVICE, half_checkpoints[dtype], tmp_path / "gpu", method, ids, torch_dtype)
    keep = masks(out)
    weights = tensors(out)
    assert len(keep) == 28 and all(w.dtype == torch_dtype for w in weights.values())
    for name, mask in keep.items():
        assert int(mask.sum()) * 2 == mask.numel(), name
        assert not weights[name][~mask].any(), name
    ppl = perplexity_streamed(out, ids, DEVICE, dtype=torch_dtype)["ppl"]
    ref = prune_on("cpu", half_checkpoints["float32"], tmp_path / "cpu", method, ids)
    ppl_cpu = perplexity_streamed(ref, ids, "cpu", dtype=torch.float32)["ppl"]
    assert math.isfinite(ppl) and ppl == pytest.approx(ppl_cpu, rel=HALF_PPL_RTOL)
