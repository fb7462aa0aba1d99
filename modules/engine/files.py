"""The files of a streamed prune's stages: safetensors written atomically and read back a
tensor at a time (statistics, masks, weights, hidden states).

A tensor that shares memory with another one already written (the linears of a group share
their input statistics) is stored once and named again as an alias in the file's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from modules.engine.ranks import writes
from modules.engine.streaming import (
    SAFETENSORS_DTYPES,
    available_memory,
    read_header,
    read_tensor,
    write_safetensors,
    write_safetensors_each,
)
from modules.process import building


def save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """Write ``tensors`` (moved to the host) atomically as safetensors.

    Tensors sharing memory (the linears of a group share their input statistics) are
    written once: the others are recorded as aliases in the file's metadata.
    """
    unique, alias, seen = {}, {}, {}
    for k, v in tensors.items():
        ptr = (v.data_ptr(), v.shape, v.dtype) if v.numel() else None
        if ptr is not None and ptr in seen:
            alias[k] = seen[ptr]
            continue
        if ptr is not None:
            seen[ptr] = k
        unique[k] = v.detach().to("cpu").contiguous()
    with building(path) as tmp:
        write_safetensors(tmp, unique, metadata={"alias": json.dumps(alias)})
    return path


def save_shared(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """:func:`save` of a shared pass's result: under DDP every rank holds it, rank 0 writes it."""
    return save(tensors, path) if writes() else path


def load(
    path: str | Path, device: str | torch.device = "cpu", keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors :func:`save` wrote, aliases included; only those of ``keys`` that the file
    holds when ``keys`` is given (the rest of the file is not read).

    Each tensor is read into memory of its own (:func:`modules.engine.streaming.read_tensor`).
    """
    header, metadata, start = read_header(Path(path))
    alias = json.loads(metadata.get("alias", "{}"))
    wanted = [*header, *alias] if keys is None else [k for k in keys if k in header or k in alias]
    with open(path, "rb") as f:
        read = {
            src: read_tensor(f, start, header[src], src).to(device)
            for src in dict.fromkeys(alias.get(k, k) for k in wanted)
        }
    return {k: read[alias.get(k, k)] for k in wanted}


def hidden_states(path: str | Path, device: str, activations: str) -> torch.Tensor:
    """The hidden states of an activations file on ``device``, read or memory-mapped as
    ``activations`` says (:attr:`modules.engine.request.Job.activations`).

    A mapped tensor is a copy-on-write view of the file (never written back); on a GPU
    device it is copied there in any case.
    """
    header, _, start = read_header(Path(path))
    info = header["hidden"]
    nbytes = info["data_offsets"][1] - info["data_offsets"][0]
    kind = activations
    if kind == "auto":
        kind = "mmap" if 2 * nbytes > 0.5 * available_memory() else "memory"
    if kind == "memory" or torch.device(device).type != "cpu":
        return load(path, device)["hidden"]
    size = Path(path).stat().st_size
    flat = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    begin = start + info["data_offsets"][0]
    return flat[begin : begin + nbytes].view(SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])


def save_per_linear(
    path: Path,
    layout: dict[str, dict[str, tuple]],
    compute: Callable[[str], dict[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a stage's file one linear at a time: ``layout`` maps each linear to its tensors'
    names, dtypes and shapes; ``compute(linear)`` gives those tensors when the file reaches the
    first of them. Tensors the file needs later (a weight's mask, after every weight) are held
    until written, the rest of a linear's work is freed before the next linear is read.
    ``metadata`` defaults to :func:`save`'s (no aliases)."""
    owner = {key: name for name, keys in layout.items() for key in keys}
    held: dict[str, torch.Tensor] = {}

    def produce(key: str) -> torch.Tensor:
        if key not in held:
            held.update({k: v.detach().to("cpu").contiguous() for k, v in compute(owner[key]).items()})
        return held.pop(key)

    flat = {key: spec for keys in layout.values() for key, spec in keys.items()}
    with building(path) as tmp:
        write_safetensors_each(
            tmp, flat, produce, metadata={"alias": json.dumps({})} if metadata is None else metadata
        )
    return path


def masks_in(files: list[str]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """The keep-masks of a block's stage files, one per weight, without reading them:
    ``{weight name: (file, key, shape)}`` (a masks stage's ``.keep``, an update's ``.mask``; a
    later file's mask of a weight replaces an earlier one's)."""
    found = {}
    for path in files:
        for key, info in read_header(Path(path))[0].items():
            if key.endswith((".keep", ".mask")):
                found[key.removesuffix(".keep").removesuffix(".mask")] = (path, key, tuple(info["shape"]))
    return found


def read_one(path: str, key: str) -> torch.Tensor:
    """The tensor ``key`` of a stage's file, read alone."""
    return load(path, keys=[key])[key]
