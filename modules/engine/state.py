"""Checked resume state of a streamed prune: a finished block's record vouches for its files.

A block's record ``blocks/<i>.json`` (written last, by :func:`modules.engine.loop.prune_blocks`)
names, relative to the run folder and each with its size and sha256 (:func:`describe`), the
files the rest of the run reads from it: under ``files`` its output shard and keep-masks, kept
until the model is assembled, and under ``inputs_file`` the next block's inputs, removed once
that block is done.

Before a run resumes, :func:`verified_records` reads the records in order and checks every
file they name; the inputs only of the last one (the others are gone by design). The first
record that is not valid JSON, or names a missing file or one whose size or content changed,
is discarded with all later blocks' state, and the run goes on from the last verified block
(from scratch when the first block's record fails). The inputs of the block it goes on with
are recomputed through the verified blocks' shards (:func:`modules.engine.stages.replay`)
when the last verified record's inputs are damaged or gone (always after a discard). One log
line says what was discarded and why. Recomputed state is the same bytes, so the output
equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from modules.process import file_sha256  # sha256 with the CPU's SHA extensions outruns blake2b

RECORDS = "blocks"
GROUPS = "groups"  # the finished pruning groups of the block under way


def record_path(folder: Path, index: int) -> Path:
    """Where block ``index``'s record lives in the run folder ``folder``."""
    return folder / RECORDS / f"{index:04d}.json"


def group_path(folder: Path, index: int, group: int) -> Path:
    """Where the record of pruning group ``group`` of block ``index`` lives in the run folder."""
    return folder / GROUPS / f"{index:04d}-{group:04d}.json"


def group_records(folder: Path, index: int, log: logging.Logger) -> list[dict]:
    """The finished pruning groups of the unfinished block ``index``, each verified with its files
    (its masks or weights; the block's dense outputs for the first), in order. The first record
    that is not valid JSON or names a missing or changed file is discarded with every later one,
    and the block goes on from that group; one log line says so."""
    records = []
    paths = sorted((folder / GROUPS).glob(f"{index:04d}-*.json"))
    for k, path in enumerate(paths):
        missing = path != group_path(folder, index, k)
        record, why = (None, f" comes after a missing group {k}") if missing else _read(folder, path)
        if why:
            for stale in paths[k:]:
                stale.unlink(missing_ok=True)
            log.warning("resume state: %s/%s%s; block %d goes on from group %d", GROUPS, path.name, why,
                        index + 1, k + 1)  # fmt: skip
            break
        records.append(record)
    return records


def describe(folder: Path, paths: Iterable[str | Path]) -> dict[str, dict]:
    """``{path relative to folder: {"size", "sha256"}}`` of files under ``folder``."""
    entries = {}
    for path in map(Path, paths):
        entries[path.relative_to(folder).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": file_sha256(path),
        }
    return entries


def file_problem(folder: Path, files: dict[str, dict]) -> str | None:
    """The first of ``files`` (:func:`describe`'s form) that is missing or differs; None when all match."""
    for name, want in files.items():
        try:
            size = (folder / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if size != want["size"]:
            return f"{name} has {size} bytes, its record says {want['size']}"
        if file_sha256(folder / name) != want["sha256"]:
            return f"{name} has changed (its sha256 is not its record's)"
    return None


def _read(folder: Path, path: Path) -> tuple[dict | None, str | None]:
    """The record at ``path`` (a block's or a group's) and None, or None and why it cannot be used
    (a phrase to follow its name: valid JSON naming files that are all there and unchanged)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None, " is not valid JSON (truncated?)"
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return None, " names no checked files"
    problem = file_problem(folder, record["files"])
    return (None, f": {problem}") if problem else (record, None)


def block_state(index: int) -> tuple[str, ...]:
    """Glob patterns of block ``index``'s files in a run folder: its record, shard, keep-masks,
    outputs (the next block's inputs) and stage files."""
    return (
        f"{RECORDS}/{index:04d}.json",
        f"shards/model-{index + 1:05d}-of-*.safetensors",
        f"keep/{index:04d}.safetensors",
        f"acts/inputs-{index + 1:04d}.*",
        f"acts/dense-{index:04d}.*",
        f"stats/{index:04d}-*",
        f"weights/{index:04d}-*",
        f"masks/{index:04d}-*",
        f"{GROUPS}/{index:04d}-*",
    )


def discard(folder: Path, start: int, blocks: int) -> None:
    """Remove the state of blocks ``start`` to ``blocks - 1``."""
    for index in range(start, blocks):
        for pattern in block_state(index):
            for path in folder.glob(pattern):
                path.unlink(missing_ok=True)


def verified_records(folder: Path, blocks: int, log: logging.Logger) -> tuple[list[dict], bool]:
    """The finished blocks' records, each verified with its files, and whether the inputs of the
    next block must be recomputed (see the module docstring; the log says why).

    Args:
        folder: The run folder.
        blocks: The model's number of decoder blocks.
        log: Where the line on discarded state goes.
    """
    records: list[dict] = []
    existing = [i for i in range(blocks) if record_path(folder, i).is_file()]
    why = None
    for i in existing:
        if i != len(records):
            why = f"{RECORDS}/{i - 1:04d}.json is missing"
            break
        record, problem = _read(folder, record_path(folder, i))
        if problem:
            why = f"{RECORDS}/{i:04d}.json{problem}"
            break
        records.append(record)
    k = len(records)
    if why:
        discard(folder, k, blocks)
        then = f"recomputed from block {k + 1} on" if k else "recomputed from scratch"
        log.warning("resume state: %s; discarded blocks %d-%d, %s", why, k + 1, existing[-1] + 1, then)
    inputs = records[-1].get("inputs_file") if records else None
    problem = file_problem(folder, inputs) if inputs else None
    if problem and not why:
        log.warning("resume state: %s; discarded it, block %d's inputs are recomputed", problem, k + 1)
    return records, bool(problem)
