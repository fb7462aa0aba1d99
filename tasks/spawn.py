"""A flow's step on several DDP processes: the gradients or the prune with ``model.devices > 1``.

Lightning starts a DDP run's other ranks by running the current command again; inside
``topiary pipeline`` or a sweep that would run the whole flow again. So such a step runs its
function in a child, ``python -m tasks.spawn <request.json>``, which joins the DDP run (its
other ranks are that child's command again), calls the function on every rank, and rank 0
writes the result, which the step returns. The child's log lines go to the step's log; it
dies with the flow's process, and its ranks with it. The per-block stages of such a step run
inside the child, so they show in the step's log, not as Prefect task runs.
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
from pathlib import Path

log = logging.getLogger("topiary")
RESULT = "result.json"
ROOT = str(Path(__file__).resolve().parents[1])
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GROUP_RANK")


def run_logger() -> logging.Logger:
    """The Prefect run's logger inside a flow or task run, else the ``topiary`` logger."""
    if "prefect" not in sys.modules:  # no run without it (and topiary prune never imports it)
        return log
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run: the topiary logger
        return log


def on_ranks(target: str, kwargs: dict, device: str, devices: int) -> dict:
    """``target(**kwargs)`` (``"module:function"``) run by ``devices`` DDP processes; rank 0's result.

    Raises:
        TopiaryError: the child failed; its last log lines are in the message.
    """
    from modules.errors import TopiaryError
    from modules.process import remove_stale, temp_prefix

    tmp = Path(tempfile.gettempdir())
    remove_stale([], tmp_dir=tmp)  # what killed children left
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix("spawn"), dir=tmp))
    request = folder / "request.json"
    request.write_text(json.dumps({"target": target, "kwargs": kwargs, "device": device, "devices": devices}))
    env = {k: v for k, v in os.environ.items() if k not in _DDP_ENV}  # the child's run is its own
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
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


def join_ranks(device: str, devices: int, num_nodes: int = 1) -> None:
    """Join the DDP run of ``devices`` processes on each of ``num_nodes`` nodes; only rank 0 logs."""
    from modules.engine.names import check_device
    from modules.engine.ranks import writes
    from modules.engine.statistics import join

    join(check_device(device), devices, num_nodes)
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
        join_ranks(request["device"], request["devices"])
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
