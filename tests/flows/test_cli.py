"""The `topiary` CLI: bad input ends in one clear line and exit status 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flows.cli import main
from modules.reference.train import REFERENCE_DIR


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("topiary: error: ")
    return err[0]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("Return the sum of a and b, raising TypeError for strings.\n" * 80)
    return path


def test_eval_ppl_embedded_json(capsys, text_file):
    assert main(["eval", "ppl", "embedded", "--data", str(text_file), "--seqlen", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seqlen"] == 64 and out["windows"] >= 1 and out["ppl"] > 1
    assert out["provenance"]["dtype"] == "float32" and out["provenance"]["device"] == "cpu"
    assert {"topiary_commit", "topiary_dirty", "torch", "lm_eval", "torch_threads"} <= set(out["provenance"])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "ppl", "embedded", "--data", "EVAL", "--seqlen", "4096"], "seqlen"),
        (["eval", "ppl", "embedded", "--data", "missing.txt"], "does not exist"),
        (["eval", "ppl", "/no/such/model", "--data", "EVAL"], "model"),
        (["prune", "embedded", "--method", "wanda", "--pattern", "2-4", "--output", "OUT"], "N:M"),
        (["prune", "embedded", "--method", "wanda", "--sparsity", "1.5", "--output", "OUT"], "sparsity"),
        (["prune", "embedded", "--method", "nope", "--sparsity", "0.5", "--output", "OUT"], "method"),
        (["pipeline", "--config", "no/such.yaml"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, text_file, argv, needle):
    argv = [str(text_file) if a == "EVAL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    assert needle in _error_line(capsys)
    assert not (tmp_path / "out").exists(), "a failed command must leave nothing behind"


def test_console_script_exit_status(tmp_path):
    """Through a real process: exit status 2 and no traceback on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "pipeline", "--config", str(tmp_path / "none.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_embedded_model_is_committed():
    assert (REFERENCE_DIR / "model.safetensors").stat().st_size < 20_000_000
    info = json.loads((REFERENCE_DIR / "training.json").read_text())
    assert info["dense_validation_ppl"] > 1


def test_debug_shows_the_traceback_and_plain_runs_do_not(tmp_path, capsys):
    from configs.schema import ConfigError

    missing = str(tmp_path / "none.yaml")
    assert main(["pipeline", "--config", missing]) == 2
    assert "does not exist" in _error_line(capsys)
    with pytest.raises(ConfigError, match="does not exist"):  # --debug: the exception itself propagates
        main(["--debug", "pipeline", "--config", missing])


def test_embedded_model_gets_embedded_data_by_default(capsys):
    """No --data: the embedded model reads the embedded validation text (offline, no Hub wait)."""
    assert main(["eval", "ppl", "embedded", "--seqlen", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"] == "embedded" and out["seqlen"] == 64


def test_cli_defaults_are_the_configs():
    from configs.schema import DataCfg, ModelCfg, PruneCfg
    from flows.cli import parser

    args = parser().parse_args(["prune", "embedded", "--output", "o"])
    assert (args.nsamples, args.seqlen, args.seed) == (DataCfg().nsamples, DataCfg().seqlen, DataCfg().seed)
    assert (args.dtype, args.device, args.method) == (ModelCfg().dtype, ModelCfg().device, PruneCfg().method)
    help_text = subprocess.run(
        [sys.executable, "-m", "flows.cli", "prune", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "calibration windows (default: 64)" in " ".join(help_text.split())  # the schema's description


def test_validate_checks_the_config_and_nothing_else(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: /no/such/model}\nprune: {method: wanda, pattern: 2:4}\n")
    assert main(["validate", str(path)]) == 0  # the model is not looked at
    assert "a valid pipeline config (model /no/such/model: wanda at 2:4)" in capsys.readouterr().out
    path.write_text(
        "prune: {method: admm, sparsity: 1.5, options: {selector: wandaa, rho: 0}}\ndata: {nsamples: 0}\n"
    )
    assert main(["validate", str(path)]) == 2
    line = _error_line(capsys)
    assert "3 problem(s)" in line and "data.nsamples" in line and "prune.sparsity" in line
    assert "selector='wandaa' is not one of magnitude, wanda, gblm, sparsegpt, mask" in line
    assert main(["validate", "configs/sweep.yaml"]) == 0 and "a valid sweep config" in capsys.readouterr().out
