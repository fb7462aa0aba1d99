"""A flow's step on several DDP processes: the gradients or the prune with ``model.devices > 1``
(on this machine) or ``model.num_nodes > 1`` (on the machines of a Dask cluster).

Lightning starts a DDP run's other ranks by running the current command again; inside
``topiary pipeline`` or a sweep that would run the whole flow again. So such a step runs its
function in a child, ``python -m tasks.spawn <request.json>``, which joins the DDP run (its
other ranks are that child's command again), calls the function on every rank, and rank 0
writes the result, which the step returns. The child's log lines go to the step's log; it
dies with the flow's process, and its ranks with it. The per-block stages of such a step run
inside the child, so they show in the step's log, not as Prefect task runs.

Several nodes (:func:`on_nodes`): the same child is started on ``num_nodes`` workers of the
Dask scheduler at ``model.nodes_address`` (one worker per machine), node ``k`` with
``NODE_RANK=k`` and the first worker's host and a free port there as ``MASTER_ADDR`` and
``MASTER_PORT`` (Lightning's own cluster environment, as a ``torchrun`` per node would
give). The request, the result and each node's log are files in the work folder, which
every machine must share, with the checkpoint and this code at the same paths. A node's
child dies with its Dask worker; and the flow beats a counter on the scheduler
(a Dask ``Variable``), so when the flow dies, each node kills its child within
:data:`STALE_S` seconds.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("topiary")
RESULT = "result.json"
ROOT = str(Path(__file__).resolve().parents[1])
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK")
STALE_S = 10.0  # a node kills its child when the flow's beat has not moved for this long


def processes(model: dict) -> int:
    """DDP processes of a step: ``model.devices`` on each of ``model.num_nodes`` machines."""
    return model.get("devices", 1) * model.get("num_nodes", 1)


def run_logger() -> logging.Logger:
    """The Prefect run's logger inside a flow or task run, else the ``topiary`` logger."""
    if "prefect" not in sys.modules:  # no run without it (and topiary prune never imports it)
        return log
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run: the topiary logger
        return log


def _child_env(**extra: str) -> dict[str, str]:
    """This environment for a child whose DDP run is its own (plus ``extra``), Topiary importable."""
    env = {k: v for k, v in os.environ.items() if k not in _DDP_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return env | extra


def _request(folder: Path, target: str, kwargs: dict, model: dict) -> Path:
    request = folder / "request.json"
    ranks = {
        "device": model["device"],
        "devices": model.get("devices", 1),
        "num_nodes": model.get("num_nodes", 1),
        "strategy": model.get("strategy", "ddp"),
    }
    request.write_text(json.dumps({"target": target, "kwargs": kwargs, **ranks}))
    return request


def on_ranks(target: str, kwargs: dict, model: dict) -> dict:
    """``target(**kwargs)`` (``"module:function"``) run by the DDP processes of ``model``
    (``device``, ``devices`` and, on several machines, ``num_nodes`` and ``nodes_address``);
    rank 0's result.

    Raises:
        TopiaryError: the child failed; its last log lines are in the message.
    """
    from modules.errors import TopiaryError
    from modules.process import remove_stale, temp_prefix

    if model.get("num_nodes", 1) > 1:
        return on_nodes(target, kwargs, model)
    devices = model["devices"]
    tmp = Path(tempfile.gettempdir())
    remove_stale([], tmp_dir=tmp)  # what killed children left
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix("spawn"), dir=tmp))
    request = _request(folder, target, kwargs, model)
    env = _child_env()
    command = [sys.executable, "-m", "tasks.spawn", str(request), str(os.getpid())]
    tail: deque[str] = deque(maxlen=30)
    logger = run_logger()
    try:
        with subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            try:
                for line in proc.stdout:
                    tail.append(line.rstrip())
                    logger.info("%s", tail[-1])
            except BaseException:  # interrupted: the child (and so its ranks) goes too
                proc.kill()
                raise
        if proc.returncode != 0:
            lines = "\n".join(tail)
            raise TopiaryError(f"{target} on {devices} processes failed (exit {proc.returncode}):\n{lines}")
        return json.loads((folder / RESULT).read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _node(command: list[str], env: dict, log_path: str, beat: str) -> int:
    """On a Dask worker: one node's child, with its output in ``log_path``; its exit status.

    The child dies with this worker (``die_with_parent``); it is killed when the flow's
    beat (the Dask ``Variable`` ``beat``) has not moved for :data:`STALE_S` seconds.
    """
    import time

    from distributed import Variable

    counter = Variable(beat)
    last, seen = None, time.monotonic()
    with open(log_path, "a") as out:
        proc = subprocess.Popen(
            [*command, str(os.getpid())],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        while proc.poll() is None:
            try:
                value = counter.get(timeout=2)
            except Exception:  # noqa: BLE001 - the scheduler is gone: nobody waits for us
                value = last
            if value != last:
                last, seen = value, time.monotonic()
            elif time.monotonic() - seen > STALE_S:
                proc.kill()
            time.sleep(0.5)
    return proc.returncode


@contextmanager
def node_workers(address: str, num_nodes: int, timeout: str = "20s") -> Iterator[tuple[Client, list[str]]]:
    """A client of the Dask scheduler at ``address`` and its first ``num_nodes`` workers
    (in address order), while the body runs.

    Raises:
        TopiaryError: nothing answers there, or it has fewer workers than nodes.
    """
    from distributed import Client

    from modules.errors import TopiaryError

    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except OSError as err:
        raise TopiaryError(
            f"no Dask scheduler answers at {address!r} ({err})", key="model.nodes_address"
        ) from err
    with client:
        workers = sorted(client.scheduler_info()["workers"])
        if len(workers) < num_nodes:
            found = len(workers)
            raise TopiaryError(
                f"{num_nodes}, but the Dask scheduler at {address} has {found} worker(s)",
                key="model.num_nodes",
            )
        yield client, workers[:num_nodes]


def on_nodes(target: str, kwargs: dict, model: dict) -> dict:
    """:func:`on_ranks` on ``model.num_nodes`` workers of the Dask scheduler at ``model.nodes_address``.

    Raises:
        TopiaryError: no scheduler there, fewer workers than nodes, or a node's child
            failed (the message holds the last lines of each failed node's log).
    """
    import time
    import uuid
    from urllib.parse import urlparse

    from distributed import Variable

    from modules.errors import TopiaryError
    from modules.process import free_port, temp_sibling

    nodes, address = model["num_nodes"], model.get("nodes_address")
    folder = temp_sibling(Path(kwargs["work_dir"]) / "nodes")  # shared; a killed flow's: remove_stale
    folder.mkdir()
    logger = run_logger()
    try:
        request = _request(folder, target, kwargs, model)
        with node_workers(address, nodes) as (client, workers):
            pin = {"allow_other_workers": False, "pure": False}  # each call on the worker named
            port = client.submit(free_port, "", workers=workers[:1], **pin).result()
            beat = Variable(f"topiary-beat-{uuid.uuid4().hex}", client=client)
            beat.set(0)
            master = {"MASTER_ADDR": urlparse(workers[0]).hostname, "MASTER_PORT": str(port)}
            command = [sys.executable, "-m", "tasks.spawn", str(request)]  # + the worker's pid
            futures = [
                client.submit(_node, command, _child_env(**master, NODE_RANK=str(k)),
                              str(folder / f"node-{k}.log"), beat.name, **pin, workers=[worker])
                for k, worker in enumerate(workers)
            ]  # fmt: skip
            try:
                offset, count = 0, 0
                while not all(f.done() for f in futures):  # node 0's log to the step's, beating
                    count += 1
                    beat.set(count)
                    offset = _follow(folder / "node-0.log", offset, logger)
                    time.sleep(1)
                _follow(folder / "node-0.log", offset, logger)
                codes = [f.result() for f in futures]
            finally:
                beat.delete()
        if any(codes):
            tails = "\n".join(
                f"node {k} (exit {code}):\n"
                + "\n".join((folder / f"node-{k}.log").read_text().splitlines()[-30:])
                for k, code in enumerate(codes)
                if code
            )
            raise TopiaryError(f"{target} on {nodes} nodes failed:\n{tails}")
        return json.loads((folder / RESULT).read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _follow(path: Path, offset: int, logger) -> int:
    """Log the lines of ``path`` after byte ``offset``; the new offset."""
    if not path.is_file():
        return offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode(errors="replace").splitlines():
        logger.info("%s", line)
    return offset + end


def join_ranks(device: str, devices: int, num_nodes: int = 1, strategy: str = "ddp") -> None:
    """Join the run of ``devices`` processes on each of ``num_nodes`` nodes under Lightning's
    ``strategy``; only rank 0 logs."""
    from modules.engine.names import check_device
    from modules.engine.ranks import writes
    from modules.engine.statistics import join

    join(check_device(device), devices, num_nodes, strategy)
    if not writes():
        log.setLevel(logging.WARNING)


def main(argv: list[str]) -> int:
    """The child: join the DDP run, call the target on this rank, rank 0 writes its result."""
    from modules.engine.ranks import writes
    from modules.errors import TopiaryError
    from modules.process import die_with_parent, write_file

    request_path, parent = Path(argv[0]), int(argv[1])
    if "LOCAL_RANK" not in os.environ:  # rank 0 dies with the flow; the ranks it starts die with it
        die_with_parent(parent)
    log.addHandler(logging.StreamHandler(sys.stdout))  # Topiary's progress lines, to the step's log
    log.setLevel(logging.INFO)
    request = json.loads(request_path.read_text())
    try:
        join_ranks(request["device"], request["devices"], request["num_nodes"], request["strategy"])
        module, name = request["target"].split(":")
        result = getattr(importlib.import_module(module), name)(**request["kwargs"])
    except TopiaryError as err:
        if writes():  # every rank raises it; one says it
            print(f"error: {err}", flush=True)
        return 1
    if writes():
        write_file(request_path.with_name(RESULT), json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
