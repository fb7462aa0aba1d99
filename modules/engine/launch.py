"""A flow's step on several DDP processes: the gradients or the prune with ``model.devices > 1``
(on this machine) or ``model.num_nodes > 1`` (on the machines of a Dask cluster).

Lightning starts a DDP run's other ranks by running the current command again; inside
``topiary pipeline`` or a sweep that would run the whole flow again. So such a step runs its
function in a child, ``python -m modules.engine.launch <request.json>``, which joins the DDP
run (its other ranks are that child's command again), calls the function on every rank, and
rank 0 writes the result, which the step returns. The child's log lines go to the step's log;
it dies with the flow's process, and its ranks with it. The per-block stages of such a step
run inside the child, so they show in the step's log, not as Prefect task runs.

Several nodes (:func:`on_nodes`): the same child is started on ``num_nodes`` workers of the
Dask scheduler at ``model.nodes_address`` (one worker per machine), node ``k`` with
``NODE_RANK=k`` and the first worker's host and a free port there as ``MASTER_ADDR`` and
``MASTER_PORT``: Lightning's own cluster environment, the one ``torchrun`` per node gives
``topiary prune`` (docs/design.md says why a flow cannot use ``torchrun``). The request, the
result and each node's log are files in the work folder, which every machine must share,
with the checkpoint and this code at the same paths. A node's child dies with its Dask
worker; and the flow beats a counter on the scheduler (a Dask ``Variable``), so when the flow
dies, each node kills its child within :data:`STALE_S` seconds.

The target is named ``"module:function"`` and imported by the child, so this launcher depends
on no layer above the engine.
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
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from modules.engine.names import check_device
from modules.engine.ranks import writes
from modules.engine.statistics import join
from modules.errors import TopiaryError
from modules.process import die_with_parent, free_port, remove_stale, temp_prefix, temp_sibling, write_file

if TYPE_CHECKING:
    from distributed import Client

log = logging.getLogger("topiary")
RESULT = "result.json"
ROOT = str(Path(__file__).resolve().parents[2])
CHILD = "modules.engine.launch"  # ``python -m CHILD <request.json> <parent pid>``
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK")
STALE_S = 10.0  # a node kills its child when the flow's beat has not moved for this long


@dataclass(frozen=True)
class Ranks:
    """The DDP processes of a step: ``devices`` on each of ``num_nodes`` machines, under
    Lightning's ``strategy``; several machines are the workers of the Dask scheduler at
    ``nodes_address``."""

    device: str
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "ddp"
    nodes_address: str | None = None

    @classmethod
    def of(cls, model: Mapping[str, Any]) -> Ranks:
        """The ranks of a ``model`` config section (:class:`configs.schema.ModelCfg` as JSON)."""
        return cls(**{name: model[name] for name in cls.__dataclass_fields__ if name in model})

    @property
    def processes(self) -> int:
        """How many processes: ``devices`` on each of ``num_nodes`` machines."""
        return self.devices * self.num_nodes


def _child_env(**extra: str) -> dict[str, str]:
    """This environment for a child whose DDP run is its own (plus ``extra``), Topiary importable."""
    env = {k: v for k, v in os.environ.items() if k not in _DDP_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return env | extra


def _request(folder: Path, target: str, kwargs: dict[str, Any], ranks: Ranks) -> Path:
    request = folder / "request.json"
    request.write_text(json.dumps({"target": target, "kwargs": kwargs, "ranks": asdict(ranks)}))
    return request


def on_ranks(
    target: str, kwargs: dict[str, Any], ranks: Ranks, logger: logging.Logger = log
) -> dict[str, Any]:
    """``target(**kwargs)`` (``"module:function"``, JSON arguments) run by the DDP processes of
    ``ranks``; rank 0's result. The child's log lines go to ``logger`` (a step's: its run logger).

    Raises:
        TopiaryError: the child failed; its last log lines are in the message.
    """
    if ranks.num_nodes > 1:
        return on_nodes(target, kwargs, ranks, logger)
    tmp = Path(tempfile.gettempdir())
    remove_stale([], tmp_dir=tmp)  # what killed children left
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix("spawn"), dir=tmp))
    request = _request(folder, target, kwargs, ranks)
    command = [sys.executable, "-m", CHILD, str(request), str(os.getpid())]
    tail: deque[str] = deque(maxlen=30)
    try:
        with subprocess.Popen(
            command,
            env=_child_env(),
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
            raise TopiaryError(
                f"{target} on {ranks.devices} processes failed (exit {proc.returncode}):\n{lines}"
            )
        return json.loads((folder / RESULT).read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ``distributed`` (Dask) loads only in the functions of several machines: one machine never needs it.


def _node(command: list[str], env: dict[str, str], log_path: str, beat: str) -> int:
    """On a Dask worker: one node's child, with its output in ``log_path``; its exit status.

    The child dies with this worker (``die_with_parent``); it is killed when the flow's
    beat (the Dask ``Variable`` ``beat``) has not moved for :data:`STALE_S` seconds.
    """
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


def on_nodes(
    target: str, kwargs: dict[str, Any], ranks: Ranks, logger: logging.Logger = log
) -> dict[str, Any]:
    """:func:`on_ranks` on ``ranks.num_nodes`` workers of the Dask scheduler at ``ranks.nodes_address``;
    its files in ``kwargs["work_dir"]``, which every machine shares.

    Raises:
        TopiaryError: no scheduler there, fewer workers than nodes, or a node's child
            failed (the message holds the last lines of each failed node's log).
    """
    from distributed import Variable

    folder = temp_sibling(Path(kwargs["work_dir"]) / "nodes")  # shared; a killed flow's: remove_stale
    folder.mkdir()
    try:
        request = _request(folder, target, kwargs, ranks)
        with node_workers(ranks.nodes_address, ranks.num_nodes) as (client, workers):
            pin = {"allow_other_workers": False, "pure": False}  # each call on the worker named
            port = client.submit(free_port, "", workers=workers[:1], **pin).result()
            beat = Variable(f"topiary-beat-{uuid.uuid4().hex}", client=client)
            beat.set(0)
            master = {"MASTER_ADDR": urlparse(workers[0]).hostname, "MASTER_PORT": str(port)}
            command = [sys.executable, "-m", CHILD, str(request)]  # + the worker's pid
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
            raise TopiaryError(f"{target} on {ranks.num_nodes} nodes failed:\n{tails}")
        return json.loads((folder / RESULT).read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _follow(path: Path, offset: int, logger: logging.Logger) -> int:
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


def join_ranks(ranks: Ranks) -> None:
    """Join the run of ``ranks`` (every rank calls it before its first stage); only rank 0 logs."""
    join(check_device(ranks.device), ranks.devices, ranks.num_nodes, ranks.strategy)
    if not writes():
        log.setLevel(logging.WARNING)


def main(argv: list[str]) -> int:
    """The child: join the DDP run, call the target on this rank, rank 0 writes its result."""
    request_path, parent = Path(argv[0]), int(argv[1])
    if "LOCAL_RANK" not in os.environ:  # rank 0 dies with the flow; the ranks it starts die with it
        die_with_parent(parent)
    log.addHandler(logging.StreamHandler(sys.stdout))  # Topiary's progress lines, to the step's log
    log.setLevel(logging.INFO)
    request = json.loads(request_path.read_text())
    try:
        join_ranks(Ranks(**request["ranks"]))
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
