"""Adding a method is one function and one registry entry: a test's toy method runs everywhere.

The toy method is registered from the test (``METHODS["toy"] = ...``) and runs through
the driver, the config's validation and the ``topiary prune`` command without any other
change; the flow runs it in tests/flows/test_flows.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from configs.schema import ConfigError, PruneCfg, load_config
from modules.pruning.registry import METHODS
from tests.helpers import tiny_llama, toy_method


@pytest.fixture
def toy(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setitem(METHODS, "toy", toy_method(calls))
    return calls


def test_the_driver_runs_a_registered_toy_method(toy):
    from tests.engine.oracle import prune_model

    model = tiny_llama(64)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    request = PruneCfg(method="toy", sparsity=0.5, options={"power": 2.0}).request()
    report = prune_model(model, ids, request)
    assert toy == [2.0] * 14  # 7 linears in each of 2 blocks, each with the option given
    assert report.method == "toy" and report.sparsity == pytest.approx(0.5)
    down = model.model.layers[1].mlp.down_proj.weight
    assert bool(((down == 0).sum(1) == down.shape[1] // 2).all()), "per row, half pruned"


def test_a_toy_method_options_are_checked_when_the_config_loads(toy, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prune:\n  method: toy\n  options: {power: -1, colour: 3}\n")
    with pytest.raises(ConfigError, match=r"'colour' is not an option of toy \(its options: power\)"):
        load_config(path)
    path.write_text("prune:\n  method: toy\n  options: {power: -1}\n")
    with pytest.raises(ConfigError, match="power=-1 must be > 0"):
        load_config(path)
    path.write_text("prune:\n  method: toy\n  options: {power: 3}\n")
    assert load_config(path).prune.options == {"power": 3}
    assert toy == [], "validation runs no method"


def test_the_cli_prunes_with_a_toy_method(toy, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "pruned"
    argv = ["prune", "embedded", "--method", "toy", "--sparsity", "0.5", "--option", "power=0.5"]
    assert main([*argv, "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--output", str(out)]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["method"] == "toy" and report["plan"]["options"] == {"power": 0.5}
    assert toy and set(toy) == {0.5}
    assert "pruned embedded with toy" in capsys.readouterr().out
