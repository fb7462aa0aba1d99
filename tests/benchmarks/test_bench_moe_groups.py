"""The expert-group benchmark's own parts: its checkpoint cache, its output comparison, its bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import bench_moe_groups as B

TINY = ["--layers", "1", "--hidden", "256", "--expert-intermediate", "32", "--experts", "4", "--top-k", "2"]


def test_compare_counts_the_tensors_that_differ(tmp_path):
    """One element of one expert matrix changed by 0.5: one tensor of three differs, by 0.5."""
    tensors = {
        "model.embed_tokens.weight": torch.randn(8, 4),
        "model.layers.0.mlp.experts.0.down_proj.weight": torch.randn(4, 6),
        "model.layers.0.mlp.experts.1.down_proj.weight": torch.randn(4, 6),
    }
    for name, change in (("a", 0.0), ("b", 0.5)):
        (tmp_path / name).mkdir()
        mine = {k: v.clone() for k, v in tensors.items()}
        mine["model.layers.0.mlp.experts.0.down_proj.weight"][1, 2] += change
        save_file(mine, tmp_path / name / "model.safetensors")
    c = B.compare(tmp_path / "a", tmp_path / "b")
    assert (c["tensors"], c["identical"]) == (3, 2)
    assert c["max_abs"] == pytest.approx(0.5, abs=1e-6)
    assert c["expert"][0] == "model.layers.0.mlp.experts.0.down_proj.weight"
    assert c["expert"][1] == pytest.approx(0.5, abs=1e-6)
    assert B.compare(tmp_path / "a", tmp_path / "a")["identical"] == 3


@pytest.mark.slow
def test_the_checkpoint_is_built_per_expert_and_reused_only_for_the_same_build(tmp_path, capsys):
    args = B.parse(TINY)
    path = B.checkpoint(args, tmp_path)
    assert "built" in capsys.readouterr().out
    names = [n for n, _ in B.tensors(path)]
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names  # one matrix per expert on disk
    assert not list(tmp_path.glob("*.partial"))
    record = path / "build.json"
    assert json.loads(record.read_text()) == B.build_key(args)
    assert B.checkpoint(args, tmp_path) == path and "cached" in capsys.readouterr().out
    record.write_text(json.dumps({**B.build_key(args), "transformers": "0.0"}))
    assert B.checkpoint(args, tmp_path) == path and "built" in capsys.readouterr().out
    assert json.loads(record.read_text()) == B.build_key(args)
    other = B.checkpoint(B.parse([*TINY, "--seed", "1"]), tmp_path)
    assert other != path


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--layers", "0"], "--layers 0"),
        (["--group", "0"], "--group 0"),
        (["--hidden", "300"], "--hidden 300 (not a multiple of 256)"),
        (["--variants", "whole,half"], "--variants half"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        B.parse(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and needle in err[0]
