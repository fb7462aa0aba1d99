"""DDP on 2 CPU processes (gloo): statistics, gradients and masks equal a single process.

The test runs this file as a script; Lightning's DDP launcher starts the second rank by
running it again. Each rank accumulates over its share of the calibration windows (7
windows: 4 and 3, batches of 3) and the sums are all-reduced.
"""

from __future__ import annotations

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


def _workload(trainer, out: Path) -> None:
    """Block-0 statistics, GBLM gradients and a Wanda run with masks, written under ``out``."""
    from safetensors.torch import save_file

    from modules.engine.blocks import block_linears, capture_inputs, find_blocks
    from modules.engine.driver import PrunePlan, prune_model
    from modules.engine.gradients import compute_gradients
    from modules.engine.statistics import run_pass
    from modules.pruning.sparsity import parse_spec

    ids = torch.randint(0, VOCAB, (N, SEQLEN), generator=torch.Generator().manual_seed(1))
    model = tiny_llama(VOCAB, kv_heads=2)
    _, blocks = find_blocks(model)
    inputs, block_args = capture_inputs(model, ids, blocks)
    names = set(block_linears(blocks[0]))
    res = run_pass(trainer, blocks[0], inputs, block_args, collect=names, gram=True, batch_size=3)
    compute_gradients(model, ids, out / "grads", trainer=trainer)
    report = prune_model(
        model, ids, PrunePlan("wanda", parse_spec(0.5), batch_size=3), mask_dir=out / "masks", trainer=trainer
    )
    if trainer.global_rank == 0:
        tensors = {}
        for name, s in res.stats.items():
            tensors[f"{name}.sq_norm"] = s.sq_norm.cpu().clone()
            tensors[f"{name}.gram"] = s.gram.cpu().clone()
            tensors[f"{name}.tokens"] = torch.tensor(s.tokens)
        save_file(tensors, str(out / "stats.safetensors"))
        (out / "report.json").write_text(json.dumps(report.to_dict()))


def _load(out: Path) -> tuple[dict, dict, dict, dict]:
    from safetensors.torch import load_file

    def folder(d: Path) -> dict:
        return {f"{p.name}/{k}": v for p in sorted(d.iterdir()) for k, v in load_file(str(p)).items()}

    stats = load_file(str(out / "stats.safetensors"))
    return stats, folder(out / "grads"), folder(out / "masks"), json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tmp_path):
    from modules.engine.statistics import make_trainer

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(tmp_path / "ddp")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    _workload(make_trainer("cpu"), tmp_path / "single")
    stats, grads, masks, report = _load(tmp_path / "ddp")
    stats1, grads1, masks1, report1 = _load(tmp_path / "single")

    assert report["world_size"] == 2 and report1["world_size"] == 1
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


def main(out: Path) -> None:
    """One rank of the DDP run (Lightning starts the other by running this file again)."""
    from modules.engine.statistics import make_trainer

    trainer = make_trainer(accelerator="cpu", devices=2, strategy="ddp")
    _workload(trainer, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
