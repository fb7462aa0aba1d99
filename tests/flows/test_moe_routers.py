"""``topiary prune --routers prune`` (issue 24): the routers of mixtures of experts pruned like the
block's linears, by the method, counted from the saved tensors.

The default (``dense``: routers byte-identical, reported as left dense) is held by
``tests/flows/test_moe.py`` and ``tests/flows/test_moe_matrix.py``. Here, tiny random checkpoints
(2 blocks, 4 experts, hidden 64): Mixtral (a router module with a ``weight``, GBLM: its gradient
from the block-wise backward), Llama-4 (an ``nn.Linear`` router reading the shared expert's
input; SparseGPT at 2:4) and gpt-oss (a router with a bias; magnitude, data-free).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.cli import main
from tests.helpers import save_tiny

ROUTER = re.compile(r"^model\.layers\.\d+\..*\b(gate|router)\.weight$")
CASES = [("mixtral", "gblm", "0.5"), ("llama4_text", "sparsegpt", "2:4"), ("gpt_oss", "magnitude", "0.5")]


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("routers-data") / "calib.txt"
    path.write_text(Path("modules/process.py").read_text())
    return path


def _at_target(name: str, W: torch.Tensor, setting: str) -> None:
    zeros = W == 0
    if setting == "2:4":
        assert bool((zeros.reshape(W.shape[0], -1, 4).sum(-1) == 2).all()), f"{name}: not 2:4"
    else:
        assert int(zeros.sum()) * 2 == W.numel(), f"{name}: {int(zeros.sum())} zeros of {W.numel()}"


@pytest.mark.parametrize(("arch", "method", "setting"), CASES, ids=[c[0] for c in CASES])
def test_routers_prune_prunes_every_router_to_the_target(arch, method, setting, calib, tmp_path, capsys):
    src, out = save_tiny(arch, tmp_path / "src"), tmp_path / "out"
    flag = ("--pattern", setting) if ":" in setting else ("--sparsity", setting)
    argv = ["prune", str(src), "--method", method, *flag, "--calib", str(calib), "--routers", "prune"]
    argv += ["--nsamples", "4", "--seqlen", "32", "--output", str(out), "--work-dir", str(tmp_path / "work")]
    assert main(argv) == 0
    printed = float(re.search(r"achieved sparsity (\d\.\d+)", capsys.readouterr().out).group(1))
    saved = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    routers = sorted(k for k in saved if ROUTER.match(k))
    assert len(routers) == 2, routers  # one per block
    for name in routers:
        _at_target(name, saved[name], setting)
    matrices = [
        t for k, t in saved.items() if k.startswith("model.layers.") and t.dim() >= 2 and "bias" not in k
    ]
    zeros = sum(t.numel() - int(torch.count_nonzero(t)) for t in matrices)
    assert zeros * 2 == sum(t.numel() for t in matrices), "every block matrix, routers included, at 50%"
    assert printed == 0.5
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["plan"]["routers"] == "prune" and "routers" not in report["left_dense"]
    for block in report["blocks"]:
        assert block["dense"] == {}
        listed = [n for n in block["linears"] if n.endswith(("gate", "router"))]
        assert len(listed) == 1 and block["linears"][listed[0]]["sparsity"] == 0.5, block["linears"].keys()
