"""The checked resume records of a streamed prune (modules/engine/state.py), on hand-made run folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from modules.engine.state import (
    describe,
    file_problem,
    group_path,
    group_records,
    record_path,
    verified_records,
)


def _run_folder(tmp_path: Path, blocks: int) -> Path:
    """Records of ``blocks`` finished blocks as ``_finish_block`` writes them, and their files;
    the inputs of all but the last block are gone, as after a real run."""
    run = tmp_path / "run"
    for i in range(blocks):
        shard = run / "shards" / f"model-{i + 1:05d}-of-00005.safetensors"
        keep = run / "keep" / f"{i:04d}.safetensors"
        inputs = run / "acts" / f"inputs-{i + 1:04d}.safetensors"
        for path, text in ((shard, f"shard {i}"), (keep, f"masks {i}"), (inputs, f"inputs {i + 1}")):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text * 10)
        record = {"inputs": str(inputs), "shard": str(shard), "report": {}, "masks": [str(keep)]}
        record |= {"files": describe(run, [shard, keep]), "inputs_file": describe(run, [inputs])}
        record_path(run, i).parent.mkdir(exist_ok=True)
        record_path(run, i).write_text(json.dumps(record))
        if i:
            (run / "acts" / f"inputs-{i:04d}.safetensors").unlink()
    return run


def test_file_problem_names_a_missing_a_resized_and_a_changed_file(tmp_path):
    (tmp_path / "a").write_bytes(b"0123456789")
    files = describe(tmp_path, [tmp_path / "a"])
    assert (
        files == {"a": {"size": 10, "sha256": files["a"]["sha256"]}} and file_problem(tmp_path, files) is None
    )
    (tmp_path / "a").write_bytes(b"0123456780")  # same size, other content
    assert file_problem(tmp_path, files) == "a has changed (its sha256 is not its record's)"
    (tmp_path / "a").write_bytes(b"01234")
    assert file_problem(tmp_path, files) == "a has 5 bytes, its record says 10"
    (tmp_path / "a").unlink()
    assert file_problem(tmp_path, files) == "a is missing"


def test_intact_records_are_all_verified_and_the_next_inputs_kept(tmp_path, caplog):
    run = _run_folder(tmp_path, 3)
    records, rebuild = verified_records(run, 4, logging.getLogger("t"))
    assert [r["shard"] for r in records] == [
        str(run / f"shards/model-0000{i}-of-00005.safetensors") for i in (1, 2, 3)
    ]
    assert not rebuild and not caplog.records


def test_a_truncated_record_is_discarded_with_every_later_block(tmp_path, caplog):
    run = _run_folder(tmp_path, 3)
    (run / "stats").mkdir()
    (run / "stats" / "0003-0.safetensors").write_text("the unfinished block's")
    text = record_path(run, 1).read_text()
    record_path(run, 1).write_text(text[: len(text) // 2])
    records, rebuild = verified_records(run, 4, logging.getLogger("t"))
    assert len(records) == 1 and rebuild, "block 2's inputs are gone: they must be recomputed"
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == (
        "resume state: blocks/0001.json is not valid JSON (truncated?); discarded blocks 2-3, "
        "recomputed from block 2 on"
    )
    left = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert left == ["blocks/0000.json", "keep/0000.safetensors", "shards/model-00001-of-00005.safetensors"]


def test_damaged_next_inputs_keep_the_records_and_are_recomputed(tmp_path, caplog):
    run = _run_folder(tmp_path, 2)
    (run / "acts" / "inputs-0002.safetensors").write_text("inputs 2" * 3)
    records, rebuild = verified_records(run, 4, logging.getLogger("t"))
    assert len(records) == 2 and rebuild
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("resume state: acts/inputs-0002.safetensors has 24 bytes, its record says 80")


def test_a_damaged_first_block_starts_from_scratch_and_a_gap_ends_the_verified_blocks(tmp_path, caplog):
    run = _run_folder(tmp_path, 3)
    record_path(run, 1).unlink()
    records, _ = verified_records(run, 4, logging.getLogger("t"))
    assert len(records) == 1 and not record_path(run, 2).exists()
    (run / "keep" / "0000.safetensors").unlink()
    records, _ = verified_records(run, 4, logging.getLogger("t"))
    assert records == [] and not any(run.rglob("*.json"))
    assert caplog.records[-1].getMessage() == (
        "resume state: blocks/0000.json: keep/0000.safetensors is missing; discarded blocks 1-1, "
        "recomputed from scratch"
    )


def test_group_records_stop_at_the_first_damaged_group_and_drop_the_later_ones(tmp_path, caplog):
    """Four groups of block 1 recorded with their weight files: a changed byte in group 2's file
    keeps groups 0-1, removes the records of 2 and 3 and says so; a record that is valid JSON but
    no object, or one after a gap, stops there too."""
    run = tmp_path / "run"
    for g in range(4):
        weights = run / "weights" / f"0001-{g}.safetensors"
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_text(f"group {g}" * 10)
        group_path(run, 1, g).parent.mkdir(exist_ok=True)
        group_path(run, 1, g).write_text(
            json.dumps({"pruned": [str(weights)], "files": describe(run, [weights])})
        )
    log = logging.getLogger("test-groups")
    assert len(group_records(run, 1, log)) == 4
    damaged = run / "weights" / "0001-2.safetensors"
    damaged.write_text("GROUP 2" + damaged.read_text()[7:])
    with caplog.at_level(logging.WARNING, logger="test-groups"):
        kept = group_records(run, 1, log)
    assert [r["pruned"] for r in kept] == [[str(run / "weights" / f"0001-{g}.safetensors")] for g in range(2)]
    assert "groups/0001-0002.json: weights/0001-2.safetensors has changed" in caplog.text
    assert "block 2 goes on from group 3" in caplog.text
    assert sorted(p.name for p in (run / "groups").iterdir()) == ["0001-0000.json", "0001-0001.json"]
    group_path(run, 1, 1).write_text("[]")
    assert len(group_records(run, 1, log)) == 1 and not group_path(run, 1, 1).exists()
    group_path(run, 1, 3).write_text(group_path(run, 1, 0).read_text())
    assert len(group_records(run, 1, log)) == 1 and not group_path(run, 1, 3).exists()
