"""The temporary Prefect server of one ``topiary`` run, which cannot outlive the run.

Without ``PREFECT_API_URL``, Prefect starts a temporary API server (uvicorn) as a child
process and stops it at exit; a killed parent (SIGKILL, or SIGTERM without a handler)
never gets there, and the child, re-parented to PID 1, keeps listening. So Topiary
starts that server itself (:func:`temporary_server`, the same app, on a free loopback
port), points the run at it (``PREFECT_API_URL``) and stops it when the run ends. The
child makes sure it dies with its parent, however the parent dies:

1. ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (Linux): the kernel sends SIGTERM when the
   parent exits. It fires when the *thread* that started the child ends, so
   :func:`temporary_server` starts it from the main thread (which lives as long as the
   process).
2. A watchdog thread in the child polls its parent pid every 0.5 s (other systems, or a
   child started from another thread) and sends itself SIGTERM when it changes.
3. After a SIGTERM, uvicorn shuts down; if that takes more than 10 s, the watchdog ends
   the process with ``os._exit``.

The child runs in its own session, so a Ctrl-C in a terminal reaches ``topiary`` only,
which reports the crash to the server and then stops it. A server the user runs
(``PREFECT_API_URL`` set, e.g. ``prefect server start``) is used as it is and left alone.
Prefect's own temporary server is not used at all: its child has none of the above.

A long-lived server (``topiary server start``: :func:`start_lasting_server`, ``prefect
server start`` with its UI, detached in a session of its own, its pid, port and URL in
:func:`state_file`) is used instead of a temporary one while it runs; it outlives runs
and is ended by ``topiary server stop`` (:func:`stop_lasting_server`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from modules.errors import TopiaryError
from modules.process import (
    die_with_parent,
    free_port,
    owner_alive,
    owner_tag,
    start_time,
    tag_alive,
    write_file,
)

# prefect and uvicorn load inside the functions that use them: the CLI imports this module
# for commands (server status) that never start a server.
POLL_SECONDS = 0.5
GRACE_SECONDS = 10.0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def configured_api_url() -> str | None:
    """The Prefect API this process is already pointed at (a user's server, a test harness), if any."""
    from prefect.settings import get_current_settings

    return os.environ.get("PREFECT_API_URL") or get_current_settings().api.url


def start_server(
    timeout: float | None = None, meanwhile: Callable[[], object] | None = None
) -> tuple[subprocess.Popen, str]:
    """Start the temporary server as a child of this process and wait until it answers.

    Args:
        timeout: seconds to wait for it; default
            ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (120, set by ``flows``).
        meanwhile: called once while the child starts (its own start-up takes 3 s here),
            e.g. the flow's imports; an exception from it stops the child and propagates.

    Returns:
        The child process and its API URL (``http://127.0.0.1:<port>/api``).

    Raises:
        TopiaryError: the server exited, or did not answer in time (it is stopped then).
    """
    if timeout is None:
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
    # What Prefect's own temporary server runs with: no UI, ephemeral mode.
    server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env = {**os.environ, **server_env}
    env.pop("PREFECT_API_URL", None)
    for _attempt in range(3):  # another process may take the free port before uvicorn binds it
        port = free_port()
        command = [sys.executable, "-m", "flows.server", "--parent", str(os.getpid()), "--port", str(port)]
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}/api"
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                stop_server(proc)
                raise
            meanwhile = None
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _healthy(url):
                return proc, url
            time.sleep(0.1)
        if proc.poll() is None:
            stop_server(proc)
            raise TopiaryError(
                f"the temporary Prefect server did not answer within {timeout:.0f} s; raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL"
            )
    raise TopiaryError(f"the temporary Prefect server exited with status {proc.returncode} at start-up")


def stop_server(proc: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the server, wait up to ``grace`` seconds, then SIGKILL; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


@contextmanager
def temporary_server(meanwhile: Callable[[], object] | None = None) -> Iterator[str | None]:
    """Run the body against a temporary Prefect server that lives exactly as long as this process.

    When an API is already configured, nothing is started and its URL is yielded. Else
    the server is started (:func:`start_server`), ``PREFECT_API_URL`` points at it (in the
    environment, which threads and child processes read, and in Prefect's settings
    context), and it is stopped on exit, also on an exception or a signal. ``meanwhile``
    runs before the body in every case: while the temporary server starts, if one does.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    existing = configured_api_url()
    lasting = None if existing else running_server()
    if (existing or lasting) and meanwhile is not None:
        meanwhile()
    if existing:
        yield existing
        return
    if lasting is not None:  # ``topiary server start``: use it, leave it running
        try:
            os.environ["PREFECT_API_URL"] = lasting["url"]
            with temporary_settings(updates={PREFECT_API_URL: lasting["url"]}):
                yield lasting["url"]
        finally:
            _drain_clients()
            os.environ.pop("PREFECT_API_URL", None)
        return
    if threading.current_thread() is not threading.main_thread():
        # PR_SET_PDEATHSIG would fire when this thread ends: the watchdog still covers a kill.
        print("topiary: the temporary Prefect server is started off the main thread", file=sys.stderr)
    proc, url = start_server(meanwhile=meanwhile)
    try:
        os.environ["PREFECT_API_URL"] = url
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_clients()
        os.environ.pop("PREFECT_API_URL", None)
        stop_server(proc)


# --- The long-lived server (``topiary server start|stop|status``) ------------------------

STATE_NAME = "topiary-server.json"
LOG_NAME = "topiary-server.log"


def state_file() -> Path:
    """Where the long-lived server's pid, port and URL are kept: ``$PREFECT_HOME/topiary-server.json``.

    Beside the SQLite database it serves, so a work folder's server and its database go together.
    """
    home = os.environ.get("PREFECT_HOME")  # set by ``import flows`` unless PREFECT_API_URL is
    if not home:
        from prefect.settings import get_current_settings

        home = str(get_current_settings().home)
    return Path(home).expanduser() / STATE_NAME


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        int(state["pid"]), int(state["start"]), str(state["url"])
        return state
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # unreadable: stale


def running_server(check_health: bool = True) -> dict | None:
    """The long-lived server's state (``pid``, ``port``, ``url``, ``ui``) when it runs, else None.

    A state file whose process is gone (or unreadable) is stale and removed. With
    ``check_health``, a live process must also answer on its URL.
    """
    path = state_file()
    state = _read_state(path)
    if state is None:
        return None
    if not state or not owner_alive(int(state["pid"]), int(state["start"])):
        path.unlink(missing_ok=True)
        return None
    if check_health and not _healthy(state["url"]):
        return None
    return state


def start_lasting_server(port: int | None = None, timeout: float | None = None) -> tuple[dict, bool]:
    """Start the long-lived server (``prefect server start``, UI included), detached, or find it running.

    It runs in its own session (a Ctrl-C or the end of this process leaves it alone), logs
    to ``$PREFECT_HOME/topiary-server.log`` and is found again through :func:`state_file`.

    Returns:
        Its state and whether this call started it.

    Raises:
        TopiaryError: it exited, or did not answer within ``timeout`` seconds (it is stopped then).
    """
    found = running_server(check_health=False)
    if found is not None:
        return found, False
    if timeout is None:
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
    port = port or free_port()
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "true"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(path.parent / LOG_NAME, "ab") as log_file:
        proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    state = {
        "pid": proc.pid,
        "start": start_time(proc.pid) or 0,
        "port": port,
        "url": f"{base}/api",
        "ui": base,
    }
    write_file(path, json.dumps(state, indent=2))
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if _healthy(state["url"]):
            return state, True
        time.sleep(0.2)
    stop_lasting_server()
    if proc.poll() is not None:
        raise TopiaryError(
            f"the Prefect server exited with status {proc.returncode} at start-up "
            f"(its log: {path.parent / LOG_NAME})"
        )
    raise TopiaryError(
        f"the Prefect server did not answer within {timeout:.0f} s; raise "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    )


def stop_lasting_server(grace: float = GRACE_SECONDS) -> dict | None:
    """Stop the long-lived server and everything in its session (SIGTERM, then SIGKILL after ``grace`` s).

    Returns:
        The state of the server that was stopped, or None when none ran (a stale state
        file is removed all the same).
    """
    state = running_server(check_health=False)
    if state is None:
        return None
    pid = int(state["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while owner_alive(pid, int(state["start"])) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid, block=True)
    state_file().unlink(missing_ok=True)
    return state


def _reap(pid: int, block: bool = False) -> None:
    """Collect ``pid``'s exit status if it is our child (started by this process), so it is no zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0 if block else os.WNOHANG)


OWNER_PREFIX = "topiary.owner:"


def owner_tags() -> list[str]:
    """The tag a flow run carries to name the process that runs it (``with prefect.tags(*owner_tags())``)."""
    return [f"{OWNER_PREFIX}{owner_tag()}"]


def crash_stale_runs() -> list[str]:
    """Mark flow runs left RUNNING (or PENDING) by a killed Topiary process as CRASHED.

    A flow run names its process in a tag (:func:`owner_tags`); one whose process is gone
    (on this host) can never finish, so the next run on the same Prefect database sets it
    to Crashed instead of leaving it RUNNING forever. Returns the runs' names.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.states import Crashed

    live = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))
    crashed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=live), limit=200, sort=FlowRunSort.ID_DESC
        )
        for run in runs:
            owners = [t.removeprefix(OWNER_PREFIX) for t in run.tags if t.startswith(OWNER_PREFIX)]
            if owners and not tag_alive(owners[0]):
                message = f"its process ({owners[0]}) was killed; marked by the next run"
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                crashed.append(run.name)
    return crashed


def _drain_clients(timeout: float = 10.0) -> None:
    """Send the run's queued logs and events while the server still listens (as Prefect's harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


def _die_with_parent(parent: int) -> None:
    """In the server: end when ``parent`` ends (PDEATHSIG, and a watchdog thread as fallback)."""
    die_with_parent(parent, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(GRACE_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="topiary-parent-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """``python -m flows.server --parent PID --port N``: serve Prefect's API until the parent ends."""
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m flows.server", description=main.__doc__)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    _die_with_parent(args.parent)
    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
