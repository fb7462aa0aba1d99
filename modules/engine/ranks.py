"""The ranks of a multi-process prune (DDP): who computes what, and who writes.

Under DDP every process runs the same stages in the same order (``topiary prune --devices N``:
Lightning starts the other ranks, or a launcher such as ``torchrun`` or SLURM does). The passes
over the calibration windows are shared: each rank runs its share of the windows, the sums are
all-reduced and each rank's rows of a block's outputs are sent to every rank
(:func:`share_rows`), so every rank holds the whole next inputs. Everything else (masks,
updates, files, records) is done by rank 0 alone; the other ranks wait for its result
(:func:`from_zero`). One process is the same code with a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from modules.errors import TopiaryError

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` outside DDP)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


LAUNCHER_RANKS = ("RANK", "LOCAL_RANK", "NODE_RANK")  # set by Lightning's launcher, torchrun, SLURM


def launched_as_rank_zero() -> bool:
    """Whether no launcher started this process as a rank other than 0 (before any join: the
    ranks a launcher starts carry theirs in the environment)."""
    return all(os.environ.get(name, "0") == "0" for name in LAUNCHER_RANKS)


def writes() -> bool:
    """Whether this process writes the run's files (rank 0)."""
    return rank_and_world()[0] == 0


def local_device(device: torch.device) -> torch.device:
    """``device``, or under DDP on GPUs this rank's own GPU (``cuda:<LOCAL_RANK>``)."""
    if device.type == "cuda" and rank_and_world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def _comm_device() -> torch.device:
    """Where collective tensors live: the GPU under NCCL, the host under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_zero(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` run on rank 0 alone; every rank gets its result (a small,
    picklable value) once it is done, so what rank 0 wrote exists when the others go on.

    An error on rank 0 is raised there and, as a :class:`TopiaryError`, on the other ranks.
    """
    rank, world = rank_and_world()
    if world == 1:
        return fn(*args, **kwargs)
    box: list = [None]
    failure = None
    if rank == 0:
        try:
            box = [("ok", fn(*args, **kwargs))]
        except BaseException as err:
            failure, box = err, [("error", f"{type(err).__name__}: {err}")]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind == "error":
        raise TopiaryError(f"rank 0 failed: {value}")
    return value


def everyone(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn`` run on every rank (a shared pass); rank 0's result is returned on all of them,
    once rank 0 has finished (so its files exist)."""
    result = fn(*args, **kwargs)
    if rank_and_world()[1] == 1:
        return result
    return from_zero(lambda: result)


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (itself outside DDP)."""
    if rank_and_world()[1] > 1:
        device = _comm_device()
        moved = tensor.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def all_max(value: int) -> int:
    """The largest of every rank's ``value`` (``value`` itself outside DDP)."""
    if rank_and_world()[1] == 1:
        return value
    tensor = torch.tensor(value, dtype=torch.long, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def share_rows(buffer: torch.Tensor, mine: torch.Tensor, chunk: int = 8) -> None:
    """Each rank's rows ``mine`` of ``buffer`` (indices along dim 0) copied into every
    rank's ``buffer``, ``chunk`` rows at a time, as raw bytes (so exactly, in any dtype).

    Under DDP a pass writes the outputs of its own windows only; after this every rank holds
    them all, bit for bit as the rank that computed them.
    """
    rank, world = rank_and_world()
    if world == 1:
        return
    device = _comm_device()
    counts = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor(len(mine), dtype=torch.long, device=device))
    row_shape = buffer.shape[1:]
    for src in range(world):
        if src == rank:
            idx = mine.to(device=device, dtype=torch.long)
        else:
            idx = torch.empty(int(counts[src]), dtype=torch.long, device=device)
        dist.broadcast(idx, src=src)
        for part in idx.split(chunk):
            at = part.to(buffer.device)
            if src == rank:
                rows = buffer[at].contiguous().to(device)
            else:
                rows = torch.empty((len(part), *row_shape), dtype=buffer.dtype, device=device)
            dist.broadcast(rows.view(torch.uint8), src=src)
            if src != rank:
                buffer[at] = rows.to(buffer.device)
