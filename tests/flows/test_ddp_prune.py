"""``topiary prune --devices 2``: the per-block stages on two real DDP processes (gloo, CPU).

ADMM on GBLM's masks, on the embedded model, exercises each shared piece: the block-wise
gradient sweep (each rank its windows, the sums all-reduced), the statistics pass with Gram
matrices, the propagate pass (each rank's rows of the next inputs sent to the other), and
the masks and the update, which rank 0 computes alone. The result must equal a one-process
run's to fp32 rounding, rank 0 alone must speak, and a SIGKILL of rank 0 must take the rank
Lightning started with it and leave a run that resumes to the uninterrupted two-process
run's bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modules.process import free_port
from tests.helpers import output_digests, weight_digests

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["prune", "embedded", "--method", "admm", "--sparsity", "0.5", "--option", "selector=gblm",
        "--option", "iters=5", "--nsamples", "5", "--seqlen", "32", "--device", "cpu"]  # fmt: skip


CPU_2 = {"device": "cpu", "devices": 2}  # a model section: two processes on this machine


def _run(tmp: Path, name: str, devices: int, pause: str | None = None, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp / "tmp"), "OMP_NUM_THREADS": "1"}
    env.pop("TOPIARY_TEST_PAUSE_AT", None)
    if pause:
        env["TOPIARY_TEST_PAUSE_AT"] = pause
    (tmp / "tmp").mkdir(exist_ok=True)
    command = [sys.executable, "-m", "flows.cli", *ARGS, *extra, "--devices", str(devices),
               "--output", str(tmp / name / "out"), "--work-dir", str(tmp / name / "work")]  # fmt: skip
    log = open(tmp / f"{name}.log", "a")  # noqa: SIM115 - the process writes it
    return subprocess.Popen(command, cwd=tmp, env=env, stdout=log, stderr=log)


def _wait_paused(log: Path, text: str, *procs: subprocess.Popen) -> None:
    """Wait (10 min at most) for ``text`` in ``log`` while every one of ``procs`` runs."""
    deadline = time.monotonic() + 600
    while text not in log.read_text(errors="replace"):
        assert all(p.poll() is None for p in procs), log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"no {text!r} in {log}"
        time.sleep(0.3)


def _finish(proc: subprocess.Popen, log: Path) -> str:
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    return log.read_text()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_and_wait(proc: subprocess.Popen, others: list[int], why: str) -> None:
    """SIGKILL ``proc``; within 30 s every one of ``others`` must be gone too."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in others) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in others), why


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(out.glob("model*.safetensors")) + sorted((out / "masks").glob("*.safetensors"))
    return {f"{p.name}/{k}": v for p in files for k, v in load_file(str(p)).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One uninterrupted two-process run and one one-process run (run side by side)."""
    tmp = tmp_path_factory.mktemp("ddp")
    two, one = _run(tmp, "two", 2), _run(tmp, "one", 1)
    _finish(two, tmp / "two.log")
    _finish(one, tmp / "one.log")
    return tmp


@pytest.mark.slow
def test_two_processes_prune_as_one_does(runs):
    two, one = _tensors(runs / "two" / "out"), _tensors(runs / "one" / "out")
    assert set(two) == set(one) and len([k for k in two if k.startswith("block_")]) == 28
    for key, value in two.items():
        if value.dtype == torch.bool:  # the keep-masks
            assert torch.equal(value, one[key]), key
        else:
            torch.testing.assert_close(value, one[key], rtol=1e-5, atol=1e-6, msg=key)
    grads = {}
    for name in ("two", "one"):
        (folder,) = (runs / name / "work" / "gradients").iterdir()
        grads[name] = _tensors_of(folder)
    assert set(grads["two"]) == set(grads["one"]) and grads["one"]
    for key, value in grads["two"].items():
        torch.testing.assert_close(value, grads["one"][key], rtol=1e-4, atol=1e-6, msg=key)
    report = json.loads((runs / "two" / "out" / "pruning_report.json").read_text())
    report1 = json.loads((runs / "one" / "out" / "pruning_report.json").read_text())
    assert (report["world_size"], report1["world_size"]) == (2, 1)
    assert (report["strategy"], report1["strategy"]) == ("DDPStrategy", None)
    for block, block1 in zip(report["blocks"], report1["blocks"], strict=True):
        assert block["reconstruction_error"] == pytest.approx(block1["reconstruction_error"], rel=1e-5)
    log = (runs / "two.log").read_text()
    assert log.count("pruned embedded with admm") == 1  # rank 0 alone speaks
    assert log.count("block 2/4: update (admm)") == 1
    assert not any((runs / "two" / "work" / "runs").iterdir())  # the resume state is gone


def _nodes(tmp: Path, port: int, pause: str | None = None) -> list[subprocess.Popen]:
    """``topiary prune --num-nodes 2`` as README says: one ``torchrun`` per node (both here)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    env.pop("TOPIARY_TEST_PAUSE_AT", None)
    procs = []
    for node in (0, 1):
        paused = {"TOPIARY_TEST_PAUSE_AT": pause} if pause and node == 0 else {}
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "-m", "flows.cli", *ARGS, "--devices", "1", "--num-nodes", "2",
                   "--output", str(tmp / "out"), "--work-dir", str(tmp / "work")]  # fmt: skip
        log = open(tmp / f"node{node}.log", "a")  # noqa: SIM115 - the process writes it
        procs.append(subprocess.Popen(command, cwd=tmp, env={**env, **paused}, stdout=log, stderr=log))
    return procs


@pytest.fixture
def nodes():
    """``_nodes``, and on the way out every process they started killed (a failed test's too:
    torchrun's workers are not in its process group)."""
    started: list[subprocess.Popen] = []

    def start(*args, **kwargs) -> list[subprocess.Popen]:
        started.extend(_nodes(*args, **kwargs))
        return started[-2:]

    yield start
    for proc in started:
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_two_nodes_launched_by_torchrun_prune_as_two_processes_of_one_node(runs, tmp_path, nodes):
    """``--num-nodes 2`` gives the bytes of ``--devices 2``, rank 0's node alone speaking."""
    for node, proc in enumerate(nodes(tmp_path, free_port())):
        _finish(proc, tmp_path / f"node{node}.log")
    assert output_digests(tmp_path / "out") == output_digests(runs / "two" / "out")  # masks too
    assert "pruned embedded with admm" in (tmp_path / "node0.log").read_text()
    assert "pruned embedded" not in (tmp_path / "node1.log").read_text()


@pytest.mark.slow
def test_a_killed_rank_zero_takes_the_other_node_and_the_two_nodes_resume(runs, tmp_path, nodes):
    """No PR_SET_PDEATHSIG across machines: node 1's rank, waiting on rank 0 in block 2's
    update, must still end (its collective fails when rank 0's connection closes), and so
    must both torchruns; the same two commands then resume to the uninterrupted bytes."""
    procs = nodes(tmp_path, free_port(), "update@2")
    log = tmp_path / "node0.log"
    _wait_paused(log, "TOPIARY_PAUSED update", *procs)
    rank0 = int(log.read_text().split("TOPIARY_PAUSED update ")[1].split()[0])
    os.kill(rank0, signal.SIGKILL)
    for proc in procs:
        assert proc.wait(timeout=60) != 0  # node 1 included: nothing waits on the dead rank
    for node, proc in enumerate(nodes(tmp_path, free_port())):
        _finish(proc, tmp_path / f"node{node}.log")
    assert "resuming at block 2/4" in log.read_text()
    assert output_digests(tmp_path / "out") == output_digests(runs / "two" / "out")  # masks too


@pytest.mark.slow
def test_model_parallel_prunes_to_the_bytes_of_ddp(runs, tmp_path):
    """``--strategy model_parallel`` (Lightning's ModelParallelStrategy: its own sampler, mesh
    and reduce) runs the same per-block stages: the bytes of ``--devices 2`` under DDP."""
    _finish(_run(tmp_path, "mp", 2, None, "--strategy", "model_parallel"), tmp_path / "mp.log")
    assert weight_digests(tmp_path / "mp" / "out") == weight_digests(runs / "two" / "out")
    two = _tensors(runs / "two" / "out")  # the keep-masks too
    assert all(torch.equal(v, two[k]) for k, v in _tensors(tmp_path / "mp" / "out").items())
    report = json.loads((tmp_path / "mp" / "out" / "pruning_report.json").read_text())
    assert (report["world_size"], report["strategy"]) == (2, "ModelParallelStrategy")


def _tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{p.name}/{k}": v for p in sorted(folder.iterdir()) for k, v in load_file(str(p)).items()}


@pytest.mark.slow
def test_a_killed_rank_zero_takes_the_other_and_the_run_resumes(runs, tmp_path):
    proc = _run(tmp_path, "run", 2, "update@2")  # rank 0 in block 2's update, rank 1 waiting on it
    log = tmp_path / "run.log"
    _wait_paused(log, f"TOPIARY_PAUSED update {proc.pid}", proc)
    ranks = _children(proc.pid)
    assert ranks, "no second rank was started"
    _kill_and_wait(proc, ranks, "rank 1 outlived the killed rank 0")
    text = _finish(_run(tmp_path, "run", 2), log)
    assert "resuming at block 2/4" in text
    assert output_digests(tmp_path / "run" / "out") == output_digests(runs / "two" / "out")  # masks too


@pytest.mark.slow
def test_a_ddp_gradient_step_killed_in_its_backward_resumes_on_both_ranks(runs, tmp_path):
    """Each rank keeps its own state (its windows' block inputs and upstream gradient); the
    re-run's ranks agree on where to resume and give the uninterrupted run's bytes."""
    proc = _run(tmp_path, "run", 2, "gradients-backward@2")  # after the top segment (blocks 3-4)
    log = tmp_path / "run.log"
    _wait_paused(log, f"TOPIARY_PAUSED gradients-backward {proc.pid}", proc)
    ranks = _children(proc.pid)
    _kill_and_wait(proc, ranks, "rank 1 outlived the killed rank 0")
    (state,) = (tmp_path / "run" / "work" / "runs").iterdir()
    assert sorted(p.name for p in state.glob("*-rank*")) == ["cpu-of-2-rank0", "cpu-of-2-rank1"]
    text = _finish(_run(tmp_path, "run", 2), log)
    assert "gradients: resuming the backward at block 2/4" in text
    assert output_digests(tmp_path / "run" / "out") == output_digests(runs / "two" / "out")  # masks too
    (folder,) = (tmp_path / "run" / "work" / "gradients").iterdir()
    (expected,) = (runs / "two" / "work" / "gradients").iterdir()
    assert all(torch.equal(v, _tensors_of(expected)[k]) for k, v in _tensors_of(folder).items())


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = _children(todo.pop())
        found += children
        todo += children
    return found


@pytest.mark.slow
def test_a_flows_step_joins_the_strategy_of_its_model_section():
    """``model.strategy`` of a pipeline reaches the ranks of its step's child (``modules.engine.launch``)."""
    from modules.engine.launch import Ranks, on_ranks

    parallel = Ranks.of({**CPU_2, "strategy": "model_parallel"})
    result = on_ranks("tests.helpers:spawned_strategy", {}, parallel)
    assert result == {"strategy": "ModelParallelStrategy", "world": 2}
    assert on_ranks("tests.helpers:spawned_strategy", {}, Ranks.of(CPU_2))["strategy"] == "DDPStrategy"


@pytest.mark.slow
def test_a_flows_ddp_step_fails_with_its_childs_error():
    """A step of the pipeline on two processes (``modules.engine.launch``) that fails on rank 0 raises
    one TopiaryError in the flow, with the child's message."""
    from modules.engine.launch import Ranks, on_ranks
    from modules.errors import TopiaryError

    with pytest.raises(TopiaryError, match="(?s)on 2 processes failed.*planted: bad calibration"):
        on_ranks("tests.helpers:spawned_failure", {"message": "planted: bad calibration"}, Ranks.of(CPU_2))


@pytest.mark.slow
def test_a_killed_flow_takes_its_ddp_step_and_its_ranks(tmp_path):
    """SIGKILL of the flow's process while a two-process step runs: the child and the rank it
    started go too, and nothing of the step is left in $TMPDIR once the next step starts."""
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from modules.engine.launch import Ranks, on_ranks\n"
        "on_ranks('tests.helpers:spawned_wait', {'seconds': 600}, Ranks('cpu', devices=2))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "flow.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 300
    while log.read_text().count("TOPIARY_SPAWNED_WAITING") < 2:  # both ranks hold
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.3)
    spawned = _descendants(proc.pid)
    try:
        assert len(spawned) >= 2, "no child with a second rank"
        assert any(p.name.startswith("topiary-spawn-") for p in tmp_path.iterdir())
        _kill_and_wait(proc, spawned, "the step's processes outlived the flow")
    finally:  # a failed test leaves no process behind
        for pid in [proc.pid, *spawned]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    from modules.process import remove_stale

    remove_stale([], tmp_dir=tmp_path)
    assert not any(p.name.startswith("topiary-spawn-") for p in tmp_path.iterdir())
