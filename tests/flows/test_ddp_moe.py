"""Two processes (DDP on the CPU) prune a mixture of experts by expert groups as one process
prunes it by whole blocks (issue 24).

Each rank runs its share of the windows through the grouped passes; the per-expert sums are
reduced over the ranks after each pass, the later groups' statistics passes included. The
keep-masks (every expert's) are the one-process run's, and the weights equal it to the fp32
rounding of a sum taken in another order (as in tests/flows/test_ddp_prune.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.flows.test_ddp_prune import _tensors
from tests.flows.test_resume import _run
from tests.helpers import save_tiny


@pytest.mark.slow
def test_two_processes_prune_an_moe_by_expert_groups_as_one_does_by_blocks(tmp_path):
    model = save_tiny("mixtral", tmp_path / "mixtral", num_local_experts=8)
    calib = tmp_path / "calib.txt"
    calib.write_text("Return the sum of a and b, raising TypeError for strings.\n" * 200)
    args = ["prune", str(model), "--method", "wanda", "--sparsity", "0.5", "--calib", str(calib),
            "--nsamples", "8", "--seqlen", "64", "--device", "cpu"]  # fmt: skip
    procs = {"two": _run(tmp_path, "two", args=[*args, "--expert-group", "3", "--devices", "2"]),
             "one": _run(tmp_path, "one", args=args)}  # fmt: skip
    for name, proc in procs.items():
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.err").read_text()[-3000:]
    two, one = _tensors(tmp_path / "two" / "out"), _tensors(tmp_path / "one" / "out")
    assert set(two) == set(one) and any(".experts.7." in k for k in two)
    for key, value in two.items():
        if value.dtype == torch.bool:
            assert torch.equal(value, one[key]), key
        else:
            torch.testing.assert_close(value, one[key], rtol=1e-5, atol=1e-6, msg=key)
    reports = [json.loads((tmp_path / n / "out" / "pruning_report.json").read_text()) for n in ("two", "one")]
    assert reports[0]["world_size"] == 2 and reports[0]["sparsity"] == reports[1]["sparsity"]
    experts = [[b["experts"] for b in r["blocks"]] for r in reports]
    assert experts[0] == experts[1], "the tokens each expert saw, over both ranks"
