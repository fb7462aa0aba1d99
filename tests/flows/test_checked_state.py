"""Damaged resume state is found, discarded and recomputed: never a dead end, never a wrong model.

A real ``topiary prune`` (ADMM on Wanda's mask, embedded model, 4 blocks) is killed during the
statistics of block 3, after blocks 1-2 are durable. Its work folder is then damaged in one
way per case and the same command is run again; it must succeed, say in one line what it
discarded and why, and write the bytes of an uninterrupted run (the weight shards and the
``masks/`` folder):

1. ``blocks/0001.json`` truncated (the issue's case): block 2 is recomputed from block 1;
2. the file under ``acts/`` that block 2's record names (block 3's inputs) truncated (the
   issue's case): the inputs are recomputed through the verified blocks 1-2;
3. a byte of block 1's shard changed, its size kept: the first block is damaged, so the run
   starts from scratch.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from tests.flows.test_resume import ROOT, _run
from tests.helpers import output_digests, wait_for_log


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("checked-baseline")
    proc = _run(tmp, "base")
    assert proc.wait(timeout=900) == 0, (tmp / "base.err").read_text()[-3000:]
    return output_digests(tmp / "base" / "out")


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A copy of the work folder of a prune killed in the statistics of block 3."""
    tmp = tmp_path_factory.mktemp("checked-killed")
    proc = _run(tmp, "run", "statistics@3")
    wait_for_log(proc, tmp / "run.err", f"TOPIARY_PAUSED statistics {proc.pid}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    (run,) = (tmp / "run" / "work" / "runs").iterdir()
    assert sorted(p.name for p in (run / "blocks").iterdir()) == ["0000.json", "0001.json"]
    shutil.copytree(tmp / "run" / "work", tmp / "work.bak")
    return tmp


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


CASES = {
    "record-truncated": (
        lambda run: _truncate(run / "blocks" / "0001.json"),
        "resume state: blocks/0001.json is not valid JSON (truncated?); discarded blocks 2-2, "
        "recomputed from block 2 on",
        "resuming at block 2/4",
    ),
    "inputs-truncated": (
        lambda run: _truncate(run / "acts" / "inputs-0002.safetensors"),
        "resume state: acts/inputs-0002.safetensors has ",
        "resuming at block 3/4",
    ),
    "first-shard-changed": (
        lambda run: _flip_last_byte(run / "shards" / "model-00001-of-00005.safetensors"),
        "resume state: blocks/0000.json: shards/model-00001-of-00005.safetensors has changed "
        "(its sha256 is not its record's); discarded blocks 1-2, recomputed from scratch",
        None,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_damaged_resume_state_is_recomputed_to_the_uninterrupted_bytes(baseline, killed, tmp_path, case):
    damage, said, resumes = CASES[case]
    work = killed / "run" / "work"
    shutil.rmtree(work)
    shutil.copytree(killed / "work.bak", work)  # the records name this folder's files
    (run,) = (work / "runs").iterdir()
    damage(run)
    (killed / "run.err").write_text("")
    shutil.rmtree(killed / "run" / "out", ignore_errors=True)  # an earlier case's
    again = _run(killed, "run")
    log = (killed / "run.err").read_text()
    assert again.wait(timeout=900) == 0, log[-3000:]
    log = (killed / "run.err").read_text()
    lines = [line for line in log.splitlines() if "resume state:" in line]
    assert len(lines) == 1 and said in lines[0], log[-3000:]
    assert (resumes in log) if resumes else ("resuming at" not in log), log[-3000:]
    assert output_digests(killed / "run" / "out") == baseline
    assert not any((work / "runs").iterdir()), "the resume state outlived the run"


PIPELINE_SETS = {  # the prune of ARGS (tests/flows/test_resume.py) as a pipeline, no zero-shot
    "prune.method": "admm", "prune.sparsity": "0.5", "prune.options.selector": "wanda",
    "prune.options.iters": "5", "data.nsamples": "4", "data.seqlen": "32", "model.device": "cpu",
    "zeroshot.enabled": "false",
}  # fmt: skip


def _pipeline(tmp: Path, pause: str | None = None):
    sets = {**PIPELINE_SETS, "work_dir": str(tmp / "work"), "tracking.uri": f"sqlite:///{tmp}/mlflow.db"}
    args = ["pipeline", "--config", str(ROOT / "configs" / "pipeline.yaml")]
    args += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return _run(tmp, "pipe", pause, args=args, paths=False)


@pytest.mark.slow
def test_a_pipeline_recomputes_the_stages_of_its_unfinished_block(baseline, tmp_path):
    """Killed in block 3's update, after its statistics were written: that statistics file is
    replaced by a valid one of other norms, and the re-run must recompute it (no stage of an
    unfinished block is served by its file's existence, through Prefect's cache or otherwise)
    and write the bytes of ``topiary prune``'s uninterrupted run of the same prune."""
    proc = _pipeline(tmp_path, "update@3")
    wait_for_log(proc, tmp_path / "pipe.err", f"TOPIARY_PAUSED update {proc.pid}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    (run,) = (tmp_path / "work" / "runs").iterdir()
    (stats,) = (run / "stats").glob("0002-*.safetensors")
    with safe_open(str(stats), framework="pt") as f:  # other input norms: other Wanda masks
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k).flip(0) if k.endswith("sq_norm") else f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(stats), metadata=metadata)
    again = _pipeline(tmp_path)
    assert again.wait(timeout=900) == 0, (tmp_path / "pipe.err").read_text()[-3000:]
    (model,) = (tmp_path / "work" / "models").iterdir()
    assert output_digests(model) == baseline
