"""Owner-named temporaries, their clean-up, the work-folder lock and the temporary Prefect server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from modules.errors import TopiaryError
from modules.process import (
    building,
    owner_alive,
    owner_id,
    remove_stale,
    tag_alive,
    temp_sibling,
    write_file,
)
from tasks.cache import HOLDER_FILE, work_lock

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_names_carry_pid_start_and_thread(tmp_path):
    names = {}
    together = threading.Barrier(2)  # both alive at once (an ended thread's id is re-used)

    def name() -> None:
        names[threading.get_ident()] = temp_sibling(tmp_path / "model").name
        together.wait()

    threads = [threading.Thread(target=name) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names.values())) == 2, "two threads got the same temporary name"
    assert all(n.startswith(f".model.tmp-{owner_id()}-") for n in names.values())


def test_owner_alive_sees_pid_reuse():
    me, start = (int(x) for x in owner_id().split("-"))
    assert owner_alive(me, start)
    assert not owner_alive(me, start - 500), "a re-used pid (other start time) counted as the old owner"
    assert not owner_alive(_dead_pid(), start)
    assert tag_alive(f"another-host/{_dead_pid()}-1"), "a run of another host was judged from here"


def test_a_wall_clock_step_leaves_a_live_owner_alive(tmp_path, monkeypatch):
    """CI's virtual machine was resumed mid-run: the kernel's boot time moved by seconds, so an
    epoch start time no longer matched this process's own names and a thread's clean-up
    removed its sibling's calibration folder. Start times since boot do not move."""
    import psutil._pslinux as pslinux

    models = tmp_path / "models"
    models.mkdir()
    mine = models / f".m.tmp-{owner_id()}-7"
    mine.mkdir()
    boot = pslinux.boot_time()
    monkeypatch.setattr(pslinux, "boot_time", lambda: boot + 30.0)
    me, start = (int(x) for x in owner_id().split("-"))
    assert owner_alive(me, start), "a step of the wall clock made this live process look dead"
    assert remove_stale([models]) == [] and mine.exists()


def test_remove_stale_removes_only_dead_owners_entries(tmp_path):
    dead = f"{_dead_pid()}-{round(time.time() * 100)}"
    reused = f"{os.getpid()}-1"  # our pid, another start time: a dead process whose pid we got
    models, tmp = tmp_path / "work" / "models", tmp_path / "tmpdir"
    models.mkdir(parents=True)
    tmp.mkdir()
    stale = [models / f".m.tmp-{dead}-7", models / f".m.old-{reused}-7", tmp / f"topiary-grads-{dead}-x1"]
    stale.append(tmp / f"topiary-stream-{dead}-x3")
    kept = [
        models / f".m.tmp-{owner_id()}-7",  # ours, alive
        models / "m",  # a finished artefact
        models / ".m.tmp",  # not ours to judge
        tmp / f"topiary-grads-{owner_id()}-x2",
        tmp / f"topiary-stream-{owner_id()}-x4",
        tmp / f"topiary-other-{dead}-x5",  # not a kind Topiary writes
        tmp / f".m.tmp-{dead}-7",  # $TMPDIR is searched for Topiary's own folders only
    ]
    for path in stale + kept:
        path.mkdir()
    (models / f".m.tmp-{dead}-7" / "config.json").write_text("")
    removed = remove_stale([tmp_path / "work"], depth=2, tmp_dir=tmp)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


def test_building_a_killed_writer_leaves_an_owner_named_temp(tmp_path):
    """What a kill leaves is exactly what remove_stale recognises (here: a writer that never finished)."""
    script = (
        "import sys, os; from pathlib import Path; from modules.process import building\n"
        "with building(Path(sys.argv[1])) as tmp:\n"
        "    tmp.mkdir(); print('ready', flush=True); os.kill(os.getpid(), 9)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    (left,) = list(tmp_path.iterdir())
    assert remove_stale([tmp_path]) == [left]
    with building(tmp_path / "out") as tmp:
        tmp.mkdir()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_second_run_waits_for_the_work_folder_lock_and_says_who_holds_it(tmp_path, capsys):
    order = []

    def second_run() -> None:
        with work_lock(tmp_path):
            order.append("second")

    with work_lock(tmp_path):
        record = json.loads((tmp_path / HOLDER_FILE).read_text())
        assert record["pid"] == os.getpid() and record["since"].endswith("UTC")
        second = threading.Thread(target=second_run)
        second.start()
        second.join(timeout=2)
        assert second.is_alive() and not order, "the second holder did not wait"
        order.append("first released")
    second.join(timeout=10)
    assert order == ["first released", "second"]
    waited = capsys.readouterr().err
    assert f"work folder {tmp_path} is in use by pid {os.getpid()} ({record['command']}) since" in waited
    assert "waiting for it to end" in waited
    assert not (tmp_path / HOLDER_FILE).exists(), "the holder record outlived the hold"


def test_no_wait_refuses_at_once_with_the_holder(tmp_path):
    with work_lock(tmp_path):
        start = time.monotonic()
        with pytest.raises(TopiaryError, match=rf"is in use by pid {os.getpid()} \(.*\) since .* UTC"):
            with work_lock(tmp_path, wait=False):
                pass
        assert time.monotonic() - start < 5
    with work_lock(tmp_path, wait=False):  # free again
        pass


def test_a_dead_holders_record_is_no_lock(tmp_path, capsys):
    """The record only informs: a run killed before it could remove its record holds nothing."""
    dead = _dead_pid()
    stale = {
        "owner": f"{socket.gethostname()}/{dead}-1",
        "pid": dead,
        "command": "topiary prune",
        "since": "x",
    }
    (tmp_path / HOLDER_FILE).write_text(json.dumps(stale))
    start = time.monotonic()
    with work_lock(tmp_path, wait=False):
        assert json.loads((tmp_path / HOLDER_FILE).read_text())["pid"] == os.getpid()
    assert time.monotonic() - start < 5 and "in use" not in capsys.readouterr().err


def test_write_file_readers_see_the_old_or_the_new_file_never_a_part(tmp_path):
    """A reader racing a writer that replaces a file again and again reads one whole version each time."""
    path = tmp_path / "state.json"
    versions = [b"a" * (4 << 20), b"b" * (4 << 20)]
    write_file(path, versions[0])
    stop = threading.Event()

    def writer() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            write_file(path, versions[k % 2])

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            seen.append(path.read_bytes())
    finally:
        stop.set()
        thread.join()
    partial = [len(s) for s in seen if s not in versions]
    assert not partial, f"{len(partial)} of {len(seen)} reads saw part of a file (sizes {partial[:5]})"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"], "a temporary file was left"


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_building_removes_its_temporary_when_the_body_raises(tmp_path, kind):
    final = tmp_path / "artefact"
    with pytest.raises(ValueError, match="half-way"):
        with building(final) as tmp:
            if kind == "file":
                tmp.write_text("half")
            else:
                tmp.mkdir()
                (tmp / "part").write_text("half")
            raise ValueError("failed half-way")
    assert list(tmp_path.iterdir()) == [], "a failed build left its temporary (or a final) entry"


def test_a_configured_api_is_used_as_it_is(monkeypatch):
    from flows.server import temporary_server

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with temporary_server() as url:
        assert url == "http://127.0.0.1:9/api"
        assert {p.pid for p in psutil.Process().children(recursive=True)} == before


SERVER_SCRIPT = """
import time, flows
from flows.server import temporary_server
with temporary_server() as url:
    print(url, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_the_temporary_server_dies_with_a_killed_parent(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    parent = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT], env=env, stdout=subprocess.PIPE, text=True
    )
    url = parent.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), url
    (server,) = psutil.Process(parent.pid).children(recursive=True)
    parent.kill()
    parent.wait()
    gone, alive = psutil.wait_procs([server], timeout=20)
    assert not alive, f"the server outlived its SIGKILLed parent: {server.cmdline()}"


def test_the_temporary_server_starts_in_a_prefect_home_whose_parents_are_missing(tmp_path):
    home = tmp_path / "a" / "b" / "prefect-home"  # Prefect alone fails: "unable to open database file"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    script = (
        "import flows\nfrom flows.server import temporary_server\nwith temporary_server() as url: print(url)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("http://127.0.0.1:") and home.is_dir()


CHILD_SCRIPT = (
    "import time; "
    "from modules.process import die_with_parent as d; d(); print(1, flush=True); time.sleep(600)"
)
ORPHAN_SCRIPT = f"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {CHILD_SCRIPT!r}], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_process_set_to_die_with_its_parent_does(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT], env=env, stdout=subprocess.PIPE, text=True
    )
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    gone, alive = psutil.wait_procs([child], timeout=20)
    for proc in alive:
        proc.kill()
    assert not alive, "the child outlived its SIGKILLed parent"


ALLOC_SCRIPT = """
import resource, sys, torch
from flows.cli import main
from modules.process import large_allocations_mapped

def faults():  # page faults of 20 allocations of 16 MB, as a zero-shot batch's logits
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(4 << 20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with large_allocations_mapped():
    with large_allocations_mapped():
        pass
    inside = faults()  # still held by the outer holder
out, work = sys.argv[1:]
assert main(["prune", "embedded", "--method", "magnitude", "--output", out, "--work-dir", work]) == 0
faults()
print("FAULTS", inside, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_allocations_are_mapped_only_while_a_streamed_prune_runs(tmp_path):
    """Held, every large allocation is a fresh map (a streamed prune's flat memory); after the
    prune, in the same process (the pipeline's evaluations), they come from the heap again."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", ALLOC_SCRIPT, str(tmp_path / "out"), str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    inside, after = map(int, done.stdout.split("FAULTS")[1].split())
    pages = 20 * (16 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert inside > 0.9 * pages, inside
    assert after < 0.1 * pages, f"{after} page faults for 20 allocations after the prune"


def test_a_full_disk_names_the_file_being_written(tmp_path):
    """``No space left on device`` from a write names no file; ``building`` names the artefact."""
    import errno

    from modules.process import write_file
    from tests.helpers import small_disk

    with small_disk(tmp_path / "small", "1m") as small:
        target = small / "state" / "big.bin"
        target.parent.mkdir()
        with pytest.raises(OSError) as err:
            write_file(target, b"x" * (2 << 20))
        assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
        assert list(target.parent.iterdir()) == []  # no temporary file left
