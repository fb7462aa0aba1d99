"""The provenance record: commit and dirty flag from a real git checkout, versions, device."""

from __future__ import annotations

import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from modules.provenance import KEYS, NOT_A_CHECKOUT, git_state, merge, provenance, summary

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="no git program")


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git repository with one commit, a tracked file and an ignored folder."""
    repo = tmp_path / "topiary"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    (repo / "code.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text(".topiary/\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    return repo


def test_record_has_every_key_with_the_installed_versions():
    record = provenance("cpu", torch.bfloat16)
    assert tuple(record) == KEYS and all(isinstance(v, str) for v in record.values())
    for package in ("torch", "transformers", "lm_eval", "prefect", "mlflow"):
        assert record[package] == version(package), package
    assert record["dtype"] == "bfloat16" and record["device"] == "cpu"
    assert record["torch_threads"] == str(torch.get_num_threads())
    assert provenance(dtype="float16")["dtype"] == "float16"
    assert provenance(admm_precision="mixed")["admm_precision"] == "mixed"
    assert "admm_precision" not in record  # only where ADMM ran


@needs_git
def test_commit_and_dirty_flag_of_a_checkout(checkout):
    head = _git(checkout, "rev-parse", "HEAD")
    assert git_state(checkout) == (head, "false")
    (checkout / ".topiary").mkdir()
    (checkout / ".topiary" / "cache.bin").write_text("ignored")
    assert git_state(checkout) == (head, "false"), "ignored files leave the tree clean"
    (checkout / "new.py").write_text("y = 2\n")
    assert git_state(checkout) == (head, "true"), "an untracked source file makes it dirty"
    (checkout / "new.py").unlink()
    (checkout / "code.py").write_text("x = 2\n")
    assert git_state(checkout) == (head, "true")
    assert provenance(root=checkout)["topiary_commit"] == head


@needs_git
def test_not_a_git_checkout(tmp_path, checkout):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_state(plain) == (NOT_A_CHECKOUT, "unknown")
    (checkout / "sub").mkdir()
    # a folder inside some other repository is not a checkout of its own
    assert git_state(checkout / "sub") == (NOT_A_CHECKOUT, "unknown")
    empty = tmp_path / "empty-repo"
    empty.mkdir()
    _git(empty, "init", "-q")
    assert git_state(empty) == (NOT_A_CHECKOUT, "unknown")  # no commit yet


def test_without_a_git_program(monkeypatch, checkout):
    monkeypatch.setenv("PATH", str(checkout / "no-bin"))
    assert git_state(checkout) == ("unknown", "unknown")


def test_merge_keeps_agreement_and_shows_differences():
    a = {"torch": "2.13.0", "lm_eval": "0.4.13", "dtype": "float32"}
    b = {"torch": "2.13.0", "lm_eval": "0.4.12", "dtype": "float32", "admm_precision": "fp32"}
    merged = merge({"prune": b, "ppl_dense": a, "ppl_pruned": None})
    assert merged == {
        "torch": "2.13.0",
        "lm_eval": "prune=0.4.12; ppl_dense=0.4.13",
        "dtype": "float32",
        "admm_precision": "fp32",
    }
    assert merge({}) == {}


def test_summary_line():
    record = provenance("cpu", "float32", admm_precision="fp32")
    record.update(topiary_commit="0123456789abcdef0123456789abcdef01234567", topiary_dirty="true")
    line = summary(record)
    assert line.startswith("topiary 0123456789ab (dirty), python ")
    assert f"torch {torch.__version__}" in line and "float32" in line and "admm fp32" in line
    assert line.endswith(f"{torch.get_num_threads()} threads")
    assert summary({}) == "no provenance recorded"
