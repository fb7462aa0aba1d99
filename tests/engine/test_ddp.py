"""2 processes (gloo on CPU): statistics (per-expert ones too), gradients and masks equal a single process.

The test runs this file as a script; Lightning's launcher starts the second rank by
running it again. Each rank accumulates over its share of the calibration windows (7
windows: 4 and 3, batches of 3) and the sums are all-reduced. It runs under each Lightning
strategy that runs on CPU: DDP, and ModelParallelStrategy, whose sampler and reduce are
its own. FSDP and DeepSpeed run on CUDA only: on a GPU machine the same test runs them on
two GPUs, or on one (a world of one, through the strategy's wrapper all the same).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
VOCAB, N, SEQLEN = 97, 7, 16


def _workload(trainer, out: Path, device: str = "cpu") -> None:
    """Block-0 statistics, GBLM gradients and a Wanda run with masks, written under ``out``."""
    from safetensors.torch import save_file

    from modules.engine.blocks import block_linears, capture_inputs, find_blocks
    from modules.engine.gradients import compute_gradients
    from modules.engine.request import PruneRequest
    from modules.engine.statistics import run_pass
    from modules.pruning.sparsity import parse_spec
    from tests.engine.oracle import prune_model

    ids = torch.randint(0, VOCAB, (N, SEQLEN), generator=torch.Generator().manual_seed(1))
    model = tiny_llama(VOCAB, kv_heads=2).to(device)
    _, blocks = find_blocks(model)
    inputs, block_args = capture_inputs(model, ids, blocks)
    names = set(block_linears(blocks[0]))
    res = run_pass(trainer, blocks[0], inputs, block_args, collect=names, gram=True, batch_size=3)
    compute_gradients(model, ids, out / "grads", trainer=trainer)
    report = prune_model(
        model,
        ids,
        PruneRequest("wanda", parse_spec(0.5), batch_size=3),
        mask_dir=out / "masks",
        trainer=trainer,
    )
    experts = _expert_pass(trainer, device)
    if trainer.global_rank == 0:
        tensors = {f"experts/{k}": v.cpu().clone() for k, v in experts.items()}
        for name, s in res.stats.items():
            tensors[f"{name}.sq_norm"] = s.sq_norm.cpu().clone()
            tensors[f"{name}.gram"] = s.gram.cpu().clone()
            tensors[f"{name}.tokens"] = torch.tensor(s.tokens)
        save_file(tensors, str(out / "stats.safetensors"))
        (out / "report.json").write_text(json.dumps(report.to_dict()))


def _expert_pass(trainer, device: str) -> dict:
    """Per-expert statistics of a tiny gpt-oss block (modules/engine/experts.py), summed over ranks."""
    from transformers import AutoModelForCausalLM

    from modules.engine.blocks import BlockArgs, find_blocks
    from modules.engine.statistics import run_pass
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt_oss"), dtype=torch.float32).to(device)
    block = find_blocks(model)[1][0]
    inputs = torch.randn(N, SEQLEN, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(
        device
    )
    pos = torch.arange(SEQLEN, device=device)[None]
    args = BlockArgs((), {"position_embeddings": model.model.rotary_emb(inputs, pos), "position_ids": pos})
    return run_pass(trainer, block, inputs, args, gram=True, batch_size=3, experts="routed").experts


def _load(out: Path) -> tuple[dict, dict, dict, dict]:
    from safetensors.torch import load_file

    def folder(d: Path) -> dict:
        return {f"{p.name}/{k}": v for p in sorted(d.iterdir()) for k, v in load_file(str(p)).items()}

    stats = load_file(str(out / "stats.safetensors"))
    return stats, folder(out / "grads"), folder(out / "masks"), json.loads((out / "report.json").read_text())


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning runs it on CUDA only")
NO_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="no deepspeed")


@pytest.mark.slow
@pytest.mark.parametrize(
    "device,strategy",
    [
        ("cpu", "ddp"),
        ("cpu", "model_parallel"),
        pytest.param("cuda", "fsdp", marks=CUDA),
        pytest.param("cuda", "deepspeed", marks=[CUDA, NO_DEEPSPEED]),
    ],
)
def test_two_processes_match_one(tmp_path, device, strategy):
    from modules.engine.statistics import make_trainer

    devices = 2 if device == "cpu" else min(2, torch.cuda.device_count())
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # keeps carried wheels
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    script = [str(Path(__file__).resolve()), str(tmp_path / "ddp"), strategy, device, str(devices)]
    proc = subprocess.run(
        [sys.executable, *script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    _workload(make_trainer(device), tmp_path / "single", device)
    stats, grads, masks, report = _load(tmp_path / "ddp")
    stats1, grads1, masks1, report1 = _load(tmp_path / "single")

    assert report["world_size"] == devices and report1["world_size"] == 1
    named = {"ddp": "DDP", "model_parallel": "ModelParallel", "fsdp": "FSDP", "deepspeed": "DeepSpeed"}
    assert (report["strategy"], report1["strategy"]) == (
        f"{named[strategy]}Strategy" if devices > 1 else None,
        None,
    )
    assert set(stats) == set(stats1) and int(stats["mlp.down_proj.tokens"]) == N * SEQLEN
    for key, value in stats.items():
        torch.testing.assert_close(value, stats1[key], rtol=1e-5, atol=1e-4, msg=key)
    assert set(grads) == set(grads1) and len(grads) == 14
    for key, value in grads.items():
        torch.testing.assert_close(value, grads1[key], rtol=1e-4, atol=1e-6, msg=key)
    assert set(masks) == set(masks1) and len(masks) == 14
    for key, value in masks.items():
        assert torch.equal(value, masks1[key]), key
    for block, block1 in zip(report["blocks"], report1["blocks"], strict=True):
        assert block["reconstruction_error"] == pytest.approx(block1["reconstruction_error"], rel=1e-4)
    assert report["sparsity"] == report1["sparsity"]


def main(out: Path, strategy: str, device: str, devices: int) -> None:
    """One rank of the run (Lightning starts the other by running this file again)."""
    from modules.engine.statistics import make_trainer, pass_strategy

    accelerator = "gpu" if device == "cuda" else "cpu"
    trainer = make_trainer(
        accelerator=accelerator, devices=devices, strategy=pass_strategy(strategy, devices)
    )
    _workload(trainer, out, f"cuda:{trainer.local_rank}" if device == "cuda" else device)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
