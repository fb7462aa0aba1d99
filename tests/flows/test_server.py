"""``topiary server start|stop|status``: a real long-lived Prefect server, reused by a flow, then gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import psutil
import pytest

from flows import server

ROOT = Path(__file__).resolve().parents[2]

# A flow run in a process of its own, through the same entry as the pipeline's
# (temporary_server): it prints the API it ran against and its flow run's id.
FLOW = textwrap.dedent(
    """
    from prefect import flow
    from prefect.runtime import flow_run
    from flows.server import temporary_server

    @flow(name="topiary-server-probe")
    def probe():
        return str(flow_run.id)

    with temporary_server() as url:
        print(url, probe())
    """
)


def _env(home: Path) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    return env


def _topiary(env: dict, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_stale_state_file_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    start = round(psutil.Process(dead.pid).create_time() * 100)
    dead.wait()
    path = server.state_file()
    url = "http://127.0.0.1:9/api"
    path.write_text(json.dumps({"pid": dead.pid, "start": start, "port": 9, "url": url, "ui": url}))
    assert server.running_server() is None
    assert not path.exists(), "a state file naming a dead process was kept"
    path.write_text("{not json")
    assert server.running_server() is None and not path.exists()
    assert server.stop_lasting_server() is None


@pytest.mark.slow
def test_server_starts_is_reused_by_a_flow_and_stops(tmp_path):
    env = _env(tmp_path / "prefect-home")
    assert _topiary(env, "server", "status") == "not running"
    started = _topiary(env, "server", "start")
    state = json.loads((tmp_path / "prefect-home" / server.STATE_NAME).read_text())
    pid = state["pid"]
    try:
        assert started.startswith("started: ") and f"pid {pid}" in started
        assert _topiary(env, "server", "start").startswith(f"already running: {state['url']}")
        assert _topiary(env, "server", "status") == f"running: {state['url']} (UI {state['ui']}, pid {pid})"
        with urllib.request.urlopen(state["ui"], timeout=30) as page:  # the UI, for the per-block view
            assert b"<html" in page.read(4096).lower()

        done = subprocess.run(
            [sys.executable, "-c", FLOW], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        url, run_id = done.stdout.split()[-2:]
        assert url == state["url"], "the flow did not use the running server"
        with urllib.request.urlopen(f"{state['url']}/flow_runs/{run_id}", timeout=30) as response:
            assert json.loads(response.read())["state_type"] == "COMPLETED"
        assert psutil.pid_exists(pid), "the server did not outlive the flow's process"
    finally:
        stopped = _topiary(env, "server", "stop")
        group = _live_group(pid)
        if group:  # a broken stop must not leave the server running after the test
            os.killpg(pid, signal.SIGKILL)
    assert stopped == f"stopped pid {pid} ({state['url']})"
    assert not group, f"left behind: {group}"
    assert _topiary(env, "server", "status") == "not running"
    assert not (tmp_path / "prefect-home" / server.STATE_NAME).exists()


def _live_group(pgid: int) -> list[psutil.Process]:
    """The processes of session/group ``pgid`` that still run (zombies awaiting a reaper do not)."""
    live = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return live
