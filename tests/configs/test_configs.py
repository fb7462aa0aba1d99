"""Every shipped YAML in configs/ loads and validates; the sweep's members validate too."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from configs.schema import CONFIG_DIR, ConfigError, PipelineCfg, SweepCfg, load_config
from modules.pruning.registry import METHOD_NAMES

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def _kind(path: Path) -> type[PipelineCfg]:
    """A YAML with sweep keys (methods, settings) is a sweep; anything else a pipeline."""
    return SweepCfg if "methods" in (yaml.safe_load(path.read_text()) or {}) else PipelineCfg


def test_the_shipped_configs_are_there():
    assert {"pipeline.yaml", "sweep.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_loads_and_validates(path):
    from flows.sweep import sweep_jobs

    cfg = load_config(path, _kind(path))
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(type(cfg).model_fields)  # nothing in the file is silently ignored
    if isinstance(cfg, SweepCfg):
        assert sweep_jobs(cfg)  # every (method, setting) is a valid pipeline config


def test_sweep_yaml_compares_all_six_methods_at_three_settings():
    from flows.sweep import sweep_jobs

    cfg = load_config(CONFIG_DIR / "sweep.yaml", SweepCfg)
    jobs = sweep_jobs(cfg)
    assert cfg.model.name == "embedded"
    assert {(j.prune.method, j.prune.setting) for j in jobs} == {
        (m, s) for m in METHOD_NAMES for s in ("0.5", "0.7", "2:4")
    }
    nm = [j for j in jobs if j.prune.setting == "2:4"]
    assert all(j.prune.pattern == "2:4" and j.prune.sparsity is None for j in nm)


def test_sweep_members_report_every_bad_method_and_setting_at_once():
    from flows.sweep import sweep_jobs

    cfg = load_config(CONFIG_DIR / "sweep.yaml", SweepCfg, {"methods": ["wanda", "prunemore"]})
    cfg.settings = ["0.5", "2-4", "1.5"]
    with pytest.raises(ConfigError) as err:
        sweep_jobs(cfg)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "'prunemore' is not one of magnitude, wanda" in message
    assert 'pattern: "2-4" is not N:M' in message
    assert "sparsity: 1.5 is outside [0, 1)" in message


def test_pipeline_override_of_a_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"prune\.method.*'wand'"):
        load_config(CONFIG_DIR / "pipeline.yaml", PipelineCfg, {"prune.method": "wand"})


def test_unquoted_n_m_pattern_is_the_pattern_in_a_file_and_in_set(tmp_path):
    """YAML 1.1 reads 2:4 as the base-60 integer 124; Topiary's loader keeps the pattern."""
    from configs.loader import yaml_value

    assert yaml_value("2:4") == "2:4" and yaml_value("[0.5, 4:8]") == [0.5, "4:8"]
    assert yaml_value("124") == 124 and yaml_value("0.5") == 0.5 and yaml_value(".nan") != yaml_value(".nan")
    path = tmp_path / "nm.yaml"
    path.write_text("prune:\n  method: wanda\n  pattern: 2:4\n")
    cfg = load_config(path, PipelineCfg)
    assert (cfg.prune.pattern, cfg.prune.sparsity, cfg.prune.setting) == ("2:4", None, "2:4")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("settings: [0.5, 2:4]\n")
    assert load_config(sweep, SweepCfg).settings == ["0.5", "2:4"]


def test_set_pattern_replaces_the_config_rate_and_the_other_way_round(tmp_path):
    from flows.cli import _kv

    key, value = _kv("prune.pattern=2:4")
    cfg = load_config(CONFIG_DIR / "pipeline.yaml", PipelineCfg, {key: value})  # the file has sparsity 0.5
    assert (cfg.prune.pattern, cfg.prune.sparsity) == ("2:4", None)
    path = tmp_path / "nm.yaml"
    path.write_text("prune:\n  method: wanda\n  pattern: 2:4\n")
    cfg = load_config(path, PipelineCfg, {"prune.sparsity": 0.7})
    assert (cfg.prune.pattern, cfg.prune.sparsity) == (None, 0.7)
    with pytest.raises(ConfigError, match="exactly one"):  # both given on the command line: ambiguous
        load_config(path, PipelineCfg, {"prune.sparsity": 0.7, "prune.pattern": "4:8"})


def test_every_config_problem_is_reported_at_once_on_one_line():
    overrides = {"prune.method": "prunemore", "prune.sparsity": 1.5, "data.nsamples": 0}
    with pytest.raises(ConfigError) as err:
        load_config(CONFIG_DIR / "pipeline.yaml", PipelineCfg, overrides)
    message = str(err.value)
    assert "3 problem(s)" in message and "\n" not in message
    assert "prune.method: 'prunemore' is not one of" in message
    assert "prune.sparsity: 1.5 is outside [0, 1)" in message
    assert "data.nsamples" in message


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"bogus": 1}, "'bogus' is not an option of sparsegpt (its options: blocksize, percdamp)"),
        ({"percdamp": float("nan")}, "percdamp=nan is not a finite number"),
        ({"percdamp": float("inf")}, "percdamp=inf is not a finite number"),
        ({"blocksize": 1.5}, "blocksize=1.5 is not an integer"),
        ({"percdamp": "high"}, "percdamp='high' is not a number"),
    ],
)
def test_method_options_are_checked_against_the_method(options, needle):
    with pytest.raises(ConfigError, match="prune.options") as err:
        load_config(
            CONFIG_DIR / "pipeline.yaml", PipelineCfg, {"prune.method": "sparsegpt", "prune.options": options}
        )
    assert needle in str(err.value)


def test_every_method_accepts_its_own_defaults():
    """No false alarm: each method's documented options, at their defaults, validate."""
    from modules.pruning.registry import method_options, option_problems

    for name in METHOD_NAMES:
        options = {k: v for k, v in method_options(name).items() if k != "mask_file"}
        assert option_problems(name, options) == [], name
    assert option_problems("admm", {"selector": "mask", "mask_file": "masks/"}) == []
    assert option_problems("admm", {"mask_file": "masks/"}) == ['mask_file is only read with selector="mask"']
    assert PipelineCfg.model_validate({"prune": {"method": "sparsegpt", "options": {"percdamp": 1}}})


def test_prune_routers_reaches_the_request_and_is_an_identity_key_only_when_not_dense():
    """``prune.routers`` at its default leaves the section's identity (and so its runs' keys) as
    before it existed; ``prune`` is part of it and reaches the engine's request; a bad value is
    named with the choices."""
    from configs.schema import PruneCfg

    dense, pruned = PruneCfg(method="wanda"), PruneCfg(method="wanda", routers="prune")
    assert "routers" not in dense.identity() and dense.request().routers == "dense"
    assert pruned.identity()["routers"] == "prune" and pruned.request().routers == "prune"
    with pytest.raises(ValueError, match="routers\n  Input should be 'dense' or 'prune'"):
        PruneCfg(routers="sparse")


@pytest.mark.parametrize(("field", "default", "other"), [("batch_size", 8, 4), ("expert_group", None, 2)])
def test_batch_size_and_expert_group_reach_the_request_and_key_only_when_set(field, default, other):
    """``prune.batch_size`` (the windows per forward, which order the statistics' sums) and
    ``prune.expert_group`` (the resume state's groups) are part of a run's identity once set, and
    reach the engine's request; at their defaults the keys of earlier sections stay."""
    from configs.schema import PruneCfg

    plain, changed = PruneCfg(method="wanda"), PruneCfg(method="wanda", **{field: other})
    assert field not in plain.identity() and getattr(plain.request(), field) == default
    assert changed.identity()[field] == other and getattr(changed.request(), field) == other
