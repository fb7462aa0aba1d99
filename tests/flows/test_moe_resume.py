"""Kill ``topiary prune`` inside a mixture-of-experts block and resume it: same bytes, and the
expert groups already done are not pruned again (issue 24).

A tiny Mixtral (per-expert tensors on disk) with 8 experts per block, pruned by ADMM on
Wanda's masks 2 experts at a time: block 2 has 4 pruning groups (its linears with experts 0-1,
then experts 2-3, 4-5, 6-7), each durable once its update is written (``groups/`` records).
The run is SIGKILLed when block 2's third group is recorded (the hook ``group@7``: blocks 1 and
2 have 4 groups each), then run again: it resumes at block 2, group 4 of 4, and its output
equals an uninterrupted run's, and a whole-block run's, byte for byte.
"""

from __future__ import annotations

import signal

import pytest

from tests.flows.test_resume import _run
from tests.helpers import output_digests, save_tiny, wait_for_log


@pytest.mark.slow
def test_a_prune_killed_inside_an_moe_block_resumes_at_its_next_expert_group(tmp_path):
    model = save_tiny("mixtral", tmp_path / "mixtral", num_local_experts=8)
    calib = tmp_path / "calib.txt"
    calib.write_text("Return the sum of a and b, raising TypeError for strings.\n" * 200)
    args = ["prune", str(model), "--method", "admm", "--sparsity", "0.5", "--option", "selector=wanda",
            "--option", "iters=3", "--calib", str(calib), "--nsamples", "8", "--seqlen", "64",
            "--device", "cpu"]  # fmt: skip
    grouped = [*args, "--expert-group", "2"]
    for name, argv in (("whole", args), ("base", grouped)):
        proc = _run(tmp_path, name, args=argv)
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.err").read_text()[-3000:]
    baseline = output_digests(tmp_path / "base" / "out")
    assert output_digests(tmp_path / "whole" / "out") == baseline, "expert groups changed the bytes"

    proc = _run(tmp_path, "run", "group@7", args=grouped)
    log = tmp_path / "run.err"
    wait_for_log(proc, log, f"TOPIARY_PAUSED group {proc.pid}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    again = _run(tmp_path, "run", args=grouped)
    assert again.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "resuming at block 2/2" in text and "block 2/2: resuming at group 4/4" in text, text[-3000:]
    assert output_digests(tmp_path / "run" / "out") == baseline
