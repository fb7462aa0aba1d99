"""``benchmarks.parity`` without reference clones: bad paths exit 2, missing clones are skipped."""

from __future__ import annotations

from benchmarks.parity import main


def test_a_missing_clone_directory_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--wanda", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--wanda" in err[0] and "not a directory" in err[0]


def test_methods_without_a_clone_are_skipped_with_a_line(capsys, monkeypatch):
    for env in ("WANDA_DIR", "SPARSEGPT_DIR", "ADMM_DIR", "GBLM_DIR"):
        monkeypatch.delenv(env, raising=False)
    assert main(["--methods", "magnitude,sparsegpt", "--seeds", "1", "--nsamples", "2"]) == 0
    out = capsys.readouterr().out
    assert "magnitude: skipped, no clone of its reference code (--wanda or WANDA_DIR)" in out
    assert "sparsegpt: skipped, no clone of its reference code (--sparsegpt or SPARSEGPT_DIR)" in out
    assert "| method |" not in out  # nothing measured, no table
