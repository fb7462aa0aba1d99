"""Kills of a real ``topiary pipeline``: nothing outlives the run, the next run finishes the job.

Every run is a real ``python -m flows.cli pipeline`` process on the embedded model (zero-shot
off, 16 calibration windows). The test hook ``TOPIARY_TEST_PAUSE_AT=<stage>``
(``modules.process.pause_point``) makes a run print ``TOPIARY_PAUSED <stage> <pid>`` and
sleep at that stage, so the kill lands exactly there. The kills share one work folder
and its cache, each run going one stage further than the one before; one uninterrupted
baseline run (its own folder) gives the model bytes to compare with:

1. SIGKILL during the prune, at the statistics of block 3 (blocks 1-2 durable);
2. SIGKILL during the model's assembly, while a second run waits for the work-folder lock;
3. that second run: SIGKILL during tracking (its MLflow run RUNNING);
4. SIGKILL during promotion (the version registered, the gate not applied);
5. an uninterrupted run, then SIGTERM during promotion.

After each kill no process of the run is left (the temporary Prefect server included);
the next run removes the dead runs' temporary folders and ends their MLflow runs as
FAILED; the last one gives the baseline's bytes, one registered version, a champion whose
files exist, and no temporary entry anywhere.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import wait_for_log

ROOT = Path(__file__).resolve().parents[2]
SETS = ["zeroshot.enabled=false", "data.nsamples=16"]
MODEL = "topiary-embedded"
TEMP_GLOBS = (".*.tmp-*", ".*.old-*")


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _nothing_left_running():
    """Whatever happens in the test, no run (or a server it started) outlives it."""
    yield
    for proc in _STARTED:
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in tree:
            p.kill()
        psutil.wait_procs(tree, timeout=10)


class Run:
    """One ``topiary pipeline`` process in ``cwd``, its stderr in a file."""

    def __init__(self, cwd: Path, name: str, pause: str | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(cwd.parent / "tmp")}
        env.pop("PREFECT_API_URL", None)
        env.pop("TOPIARY_TEST_PAUSE_AT", None)
        env["PREFECT_HOME"] = str(cwd.parent / "prefect-home")
        if pause:
            env["TOPIARY_TEST_PAUSE_AT"] = pause
        self.stderr = cwd / f"{name}.err"
        command = [
            sys.executable,
            "-m",
            "flows.cli",
            "pipeline",
            "--config",
            str(ROOT / "configs/pipeline.yaml"),
        ]
        for item in SETS:
            command += ["--set", item]
        with open(self.stderr, "w") as err, open(cwd / f"{name}.out", "w") as out:
            self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)
        _STARTED.append(self.proc)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 600) -> None:
        wait_for_log(self.proc, self.stderr, text, timeout, poll=0.5)

    def pause_reached(self, stage: str) -> list[psutil.Process]:
        """Wait for the pause marker; return the run's descendants (the Prefect server among them)."""
        self.wait_for(f"TOPIARY_PAUSED {stage} {self.pid}")
        tree = psutil.Process(self.pid).children(recursive=True)
        assert any("flows.server" in " ".join(p.cmdline()) for p in tree), "no temporary Prefect server"
        return tree

    def kill(self, tree: list[psutil.Process], sig: int = signal.SIGKILL) -> int:
        """Send ``sig``; return the exit status once the run *and every descendant* are gone."""
        self.proc.send_signal(sig)
        status = self.proc.wait(timeout=120)
        _, alive = psutil.wait_procs(tree, timeout=30)
        left = [p.cmdline() for p in alive]
        for p in alive:  # the test fails, and leaves nothing running either
            p.kill()
        assert not left, f"left running after {signal.Signals(sig).name}: {left}"
        return status

    def finish(self) -> None:
        status = self.proc.wait(timeout=900)
        assert status == 0, self.log()[-3000:]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors(folder: Path) -> str:
    """sha256 over every tensor's name and bytes in a model folder's safetensors files (shards or one)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    tensors = {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(str(f)).items()}
    for name in sorted(tensors):
        h.update(
            name.encode()
            + tensors[name].contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
        )
    return h.hexdigest()


def _weights(cwd: Path) -> str:
    (folder,) = (cwd / ".topiary" / "models").glob("*/")
    return _tensors(folder)


def _temps(root: Path, pid: int | None = None) -> list[Path]:
    found = [p for pattern in TEMP_GLOBS for p in root.rglob(pattern)]
    return [p for p in found if pid is None or f"-{pid}-" in p.name]


def _client(cwd: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _runs(cwd: Path) -> list:
    mc = _client(cwd)
    return mc.search_runs([mc.get_experiment_by_name("topiary").experiment_id])


@pytest.mark.slow
def test_kills_leave_nothing_behind_and_the_next_run_finishes(tmp_path):
    from tracking.runs import ENDED_BY_TAG, OWNER_TAG, STALE_CLEANUP

    (tmp_path / "tmp").mkdir()
    base, work = tmp_path / "base", tmp_path / "kill"
    base.mkdir()
    work.mkdir()

    # 1. prune: blocks 1-2 durable, block 3's statistics written; the run's state stays.
    first = Run(work, "1-prune", pause="statistics@3")
    first.kill(first.pause_reached("statistics"))
    assert list((work / ".topiary" / "runs").glob("*/blocks/0001.json")), "no durable block to resume from"

    # 2. save, with a second run waiting for the lock; 3. that run is killed while tracking.
    second = Run(work, "2-save", pause="save")
    tree = second.pause_reached("save")
    assert "resuming at block 3/4" in second.log()
    assert _temps(work, second.pid), "the model is not being assembled in a temporary folder"
    third = Run(work, "3-track", pause="track")
    third.wait_for(f"is in use by pid {second.pid} (")
    second.kill(tree)
    tree = third.pause_reached("track")
    assert not _temps(work, second.pid)
    (running,) = [r for r in _runs(work) if r.info.status == "RUNNING"]
    assert f"/{third.pid}-" in running.data.tags[OWNER_TAG]
    third.kill(tree)

    # 4. promotion: the killed tracking run has been ended by this one.
    fourth = Run(work, "4-promote", pause="promote")
    tree = fourth.pause_reached("promote")
    stale = _client(work).get_run(running.info.run_id)
    assert stale.info.status == "FAILED" and stale.data.tags[ENDED_BY_TAG] == STALE_CLEANUP
    fourth.kill(tree)

    # 5. uninterrupted: the baseline's bytes, one version, the champion's files, no temporaries.
    Run(work, "5-done").finish()
    Run(base, "baseline").finish()  # last, so that a failure above costs no baseline
    assert _weights(work) == _weights(base)
    assert not [r.info.run_id for r in _runs(work) if r.info.status == "RUNNING"]
    mc = _client(work)
    versions = mc.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1, "the same model was registered twice"
    champion = mc.get_model_version_by_alias(MODEL, "champion")
    logged = mc.get_logged_model(champion.source.removeprefix("models:/"))
    files = list(Path(logged.artifact_location.removeprefix("file://")).rglob("model*.safetensors"))
    assert files, f"champion v{champion.version} has no weights"
    assert _tensors(files[0].parent) == _weights(base), "the champion is not the pruned model"
    assert not _temps(tmp_path), _temps(tmp_path)

    # SIGTERM ends the run cleanly too: exit 143, server stopped, champion unchanged.
    last = Run(work, "6-term", pause="promote")
    assert last.kill(last.pause_reached("promote"), signal.SIGTERM) == 128 + signal.SIGTERM
    assert "topiary: terminated" in last.log()
    assert mc.get_model_version_by_alias(MODEL, "champion").version == champion.version
    assert not _temps(tmp_path), _temps(tmp_path)
