"""Every shipped YAML in configs/ loads and validates; the sweep's members validate too."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from configs.schema import CONFIG_DIR, ConfigError, PipelineCfg, SweepCfg, load_config
from modules.registry import METHOD_NAMES

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
