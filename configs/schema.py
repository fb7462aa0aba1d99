"""Typed configuration of a Topiary run, one section per stage, validated at load time.

A bad key or value is reported with its dotted path, the value and what is allowed;
all problems are reported at once (pydantic collects them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modules.errors import TopiaryError
from modules.sparsity import SpecError, parse_spec

CONFIG_DIR = Path(__file__).parent


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelCfg(_Section):
    name: str = "embedded"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"


class DataCfg(_Section):
    calib: str = "embedded"
    nsamples: int = Field(64, ge=1)
    seqlen: int = Field(128, ge=2)
    seed: int = 0
    eval: str = "embedded"
    eval_seqlen: int = Field(128, ge=2)
    eval_batch_size: int = Field(8, ge=1)


class PruneCfg(_Section):
    method: str = "magnitude"
    sparsity: float | None = 0.5
    pattern: str | None = None
    options: dict = Field(default_factory=dict)
    owl: bool = False
    true_sequential: bool = False

    @model_validator(mode="after")
    def _spec(self) -> PruneCfg:
        if self.pattern is not None and "sparsity" not in self.model_fields_set:
            self.sparsity = None
        try:
            parse_spec(self.sparsity, self.pattern)
        except SpecError as err:
            raise ValueError(str(err)) from None
        return self

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from modules.registry import METHOD_NAMES

        if v not in METHOD_NAMES:
            raise ValueError(f"{v!r} is not one of {', '.join(METHOD_NAMES)}")
        return v

    @property
    def setting(self) -> str:
        """The sparsity setting as a short label: ``0.5`` or ``2:4``."""
        return str(parse_spec(self.sparsity, self.pattern))


class ZeroShotCfg(_Section):
    enabled: bool = True
    tasks: list[str] = Field(default_factory=lambda: ["embedded"])
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    data_dir: str | None = None  # local <task>.jsonl copies of official tasks (modules.zeroshot)


class TrackingCfg(_Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "topiary"
    registered_model: str = "topiary-embedded"


class GateCfg(_Section):
    rule: Literal["point", "interval"] = "point"
    """``interval``: the limits below apply to the upper bound of the 95% paired interval
    (ppl ratio pruned/dense, zero-shot drop in points); ``point``: to the point figures.
    A config without the key (a run logged before intervals existed) is read as ``point``;
    ``configs/pipeline.yaml`` uses ``interval``."""
    max_ppl_ratio: float = Field(2.0, gt=0)
    max_zeroshot_drop: float = Field(10.0, ge=0)
    primary_metric: Literal["ppl", "zeroshot_mean"] = "ppl"
    beat_champion: bool = True


class PipelineCfg(_Section):
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    prune: PruneCfg = Field(default_factory=PruneCfg)
    zeroshot: ZeroShotCfg = Field(default_factory=ZeroShotCfg)
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)
    gate: GateCfg = Field(default_factory=GateCfg)
    work_dir: str = ".topiary"


class SweepCfg(PipelineCfg):
    methods: list[str] = Field(default_factory=lambda: ["magnitude"])
    settings: list[str] = Field(default_factory=lambda: ["0.5"])
    runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None
    dask_workers: int = Field(2, ge=1)  # parallel members: Dask workers, or threads with runner local
    dask_processes: bool = True  # LocalCluster workers as processes (False: threads in this process)


class ConfigError(TopiaryError):
    """A config file that does not validate; the message lists every problem."""


def _format(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {len(err.errors())} problem(s)"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path, kind: type[PipelineCfg] = PipelineCfg, overrides: dict | None = None):
    """Load and validate a YAML config; ``overrides`` maps dotted keys to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {err}") from None
    for key, value in (overrides or {}).items():
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return kind.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, str(path))) from None
