"""Typed configuration of a Topiary run, one section per stage, validated at load time.

A bad key or value is reported with its dotted path, the value and what is allowed;
all problems are reported at once (pydantic collects them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from configs.loader import DuplicateKeyError, yaml_value
from modules.errors import TopiaryError

if TYPE_CHECKING:
    from modules.engine.request import PruneRequest

# The registry and the sparsity parser import torch: they are imported where a check or a
# request needs them, so that parsing the CLI's flags (which come from these fields) costs nothing.

CONFIG_DIR = Path(__file__).parent
MASKS = "masks"  # a pruned model's folder of keep-masks (modules.engine.stages.assemble writes it)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelCfg(_Section):
    name: str = Field("embedded", description="`embedded`, a local directory or a Hugging Face Hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype to load the weights in"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    devices: int = Field(
        1, ge=1, description="processes (one per GPU on cuda) of the gradient and prune steps, under DDP"
    )
    num_nodes: int = Field(
        1,
        ge=1,
        description="machines of the gradient and prune steps, `devices` processes each (see nodes_address)",
    )
    strategy: Literal["ddp", "model_parallel", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="Lightning strategy of a step of several processes (fsdp and deepspeed: CUDA only)",
    )
    nodes_address: str | None = Field(
        None, description="the Dask scheduler whose workers (one per machine) run the nodes, tcp://host:8786"
    )

    @model_validator(mode="after")
    def _nodes(self, info: ValidationInfo) -> ModelCfg:
        # topiary prune's nodes are torchrun's (validated with context {"nodes": "torchrun"})
        torchrun = (info.context or {}).get("nodes") == "torchrun"
        if self.num_nodes > 1 and not self.nodes_address and not torchrun:
            raise ValueError(f"num_nodes: {self.num_nodes} machines need nodes_address (a Dask scheduler)")
        return self

    @property
    def processes(self) -> int:
        """DDP processes of the gradient and prune steps: ``devices`` on each of ``num_nodes`` machines."""
        return self.devices * self.num_nodes


class DataCfg(_Section):
    calib: str = Field(
        "embedded", description="calibration source: embedded, c4, wikitext2, or a .txt/.jsonl/token file"
    )
    nsamples: int = Field(64, ge=1, description="calibration windows")
    seqlen: int = Field(128, ge=2, description="calibration window length in tokens")
    seed: int = Field(0, description="seed of the calibration windows' positions")
    eval: str = Field(
        "embedded", description="evaluation text: embedded, wikitext2, c4, or a .txt/.jsonl file"
    )
    eval_seqlen: int = Field(128, ge=2, description="perplexity window length in tokens (reported)")
    eval_batch_size: int = Field(8, ge=1, description="perplexity windows per forward")


class PruneCfg(_Section):
    method: str = Field("magnitude", description="pruning method (modules/pruning/registry.py)")
    sparsity: float | None = Field(0.5, description="unstructured rate in [0, 1)")
    pattern: str | None = Field(None, description="N:M pattern such as 2:4 (instead of a rate)")
    options: dict = Field(default_factory=dict, description="method option key=value (repeatable)")
    owl: bool = Field(False, description="OWL non-uniform sparsity across blocks")
    true_sequential: bool = Field(
        False, description="prune a block's linears group by group (SparseGPT's option)"
    )
    moe_calibration: Literal["routed", "all"] = Field(
        "routed",
        description="per-expert statistics of mixtures of experts: the tokens routed to each expert "
        "(an expert with too few takes all's), or every token through every expert (docs/moe.md)",
    )
    batch_size: int = Field(
        8,
        ge=1,
        description="calibration windows per forward in the prune's passes (`topiary plan` gives the "
        "largest that fits a device; with expert groups each batch reads the experts once)",
    )
    expert_group: int | None = Field(
        None,
        ge=1,
        description="fused experts loaded and pruned this many at a time within a block (default: all "
        "of a block's at once); `topiary plan` gives the group that fits a device (docs/moe.md)",
    )
    routers: Literal["dense", "prune"] = Field(
        "dense",
        description="routers of mixtures of experts: left dense (the common practice; reported as "
        "such), or pruned like the block's linears by the method (docs/moe.md)",
    )
    report_error: bool = Field(
        False,
        description="measure block errors for a data-free method too (magnitude runs no data pass otherwise)",
    )
    activations: Literal["auto", "memory", "mmap"] = Field(
        "auto", description="hidden states between blocks: in memory, memory-mapped, or by size (auto)"
    )
    masks_from: str | None = Field(
        None,
        description="a weight update (admm) on the final keep-masks of this method's prune "
        "(same model, calibration and sparsity; a cached step of its own, shared with any run of it)",
    )
    masks_from_options: dict = Field(
        default_factory=dict, description="options of the masks_from method's prune (key=value, repeatable)"
    )

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from modules.pruning.registry import METHODS  # read at each check: a test may register one

        if v not in METHODS:
            raise ValueError(f"{v!r} is not one of {', '.join(METHODS)}")
        return v

    @field_validator("masks_from")
    @classmethod
    def _masks_from(cls, v: str | None) -> str | None:
        from modules.pruning.registry import METHODS

        if v is not None and v not in METHODS:
            raise ValueError(f"{v!r} is not one of {', '.join(METHODS)}")
        return v

    @field_validator("masks_from_options")
    @classmethod
    def _masks_from_options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from modules.pruning.registry import option_problems

        source = info.data.get("masks_from")
        if v and source is None:
            raise ValueError("only with masks_from: they are the options of its method's prune")
        bad = option_problems(source, v) if v else []
        if bad:
            raise ValueError("; ".join(bad))
        return v

    @field_validator("sparsity", "pattern")
    @classmethod
    def _spec_field(cls, v: float | str | None, info: ValidationInfo) -> float | str | None:
        """Each of the two on its own, so a bad one is reported beside any other problem."""
        if v is not None:
            _check_spec(**{info.field_name: v})
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from modules.pruning.registry import option_problems

        bad = option_problems(info.data["method"], v) if "method" in info.data else []  # a valid method
        if bad:
            raise ValueError("; ".join(bad))
        return v

    @model_validator(mode="after")
    def _spec(self) -> PruneCfg:
        if self.pattern is not None and "sparsity" not in self.model_fields_set:
            self.sparsity = None
        _check_spec(self.sparsity, self.pattern)
        if self.owl and self.pattern is not None:
            raise ValueError(f"owl: needs an unstructured sparsity rate, not pattern {self.pattern}")
        if self.masks_from is not None:
            from modules.pruning.registry import MASK_FILE, get_method

            if not get_method(self.method).takes_mask:
                raise ValueError(
                    f"masks_from: method {self.method} takes no mask (a weight update such as admm does)"
                )
            if self.masks_from == self.method:
                raise ValueError(f"masks_from: {self.masks_from} is the method itself; name another method")
            if {"selector", MASK_FILE} & set(self.options):
                raise ValueError("masks_from: sets selector and mask_file itself; drop them from options")
        return self

    @property
    def setting(self) -> str:
        """The sparsity setting as a short label: ``0.5`` or ``2:4``."""
        from modules.pruning.sparsity import parse_spec

        return str(parse_spec(self.sparsity, self.pattern))

    def request(self, masks_dir: str | Path | None = None) -> PruneRequest:
        """The :class:`modules.engine.request.PruneRequest` of this section: what the engine runs.

        With ``masks_from``, ``masks_dir`` is the source prune's model folder: the update reads
        its keep-masks (``selector="mask"``, ``mask_file``); None (a check before the source
        ran) leaves the mask file empty.
        """
        from modules.engine.request import PruneRequest
        from modules.pruning.sparsity import parse_spec

        options = dict(self.options)
        if self.masks_from:
            options.update(selector="mask", mask_file=str(Path(masks_dir) / MASKS) if masks_dir else "")
        return PruneRequest(
            method=self.method,
            spec=parse_spec(self.sparsity, self.pattern),
            options=options,
            true_sequential=self.true_sequential,
            moe_calibration=self.moe_calibration,
            expert_group=self.expert_group,
            routers=self.routers,
            batch_size=self.batch_size,
            owl=self.owl,
            report_error=self.report_error,
        )

    def masks_source(self) -> PruneCfg | None:
        """The prune whose final keep-masks a ``masks_from`` update starts from: this section with
        the source's method and ``masks_from_options`` as its options (none: its defaults). It is
        a prune of its own, cached like any: a run of the same section elsewhere is the same step."""
        if not self.masks_from:
            return None
        update = {"method": self.masks_from, "options": dict(self.masks_from_options)}
        return self.model_copy(update={**update, "masks_from": None, "masks_from_options": {}})

    def reads_data(self) -> bool:
        """Whether this prune reads calibration windows (magnitude does not, unless OWL or report_error)."""
        return not self.request().data_free()

    def needs_gradients(self) -> bool:
        """Whether this prune needs the gradient step (the method's own rule, with its options)."""
        return "grad" in self.request().needs()

    def identity(self) -> dict[str, Any]:
        """What of the section decides the pruned model, as JSON: all of it but ``activations``
        (where the hidden states live, not what they are); an empty ``masks_from_options`` and the
        default ``moe_calibration``, ``expert_group``, ``routers`` and ``batch_size`` are left out too,
        so sections from before them keep their keys."""
        default = {
            "masks_from_options": {},
            "moe_calibration": "routed",
            "expert_group": None,
            "routers": "dense",
            "batch_size": 8,
        }
        data = self.model_dump(mode="json", exclude={"activations"})
        return {k: v for k, v in data.items() if not (k in default and v == default[k])}

    def label(self) -> str:
        """The method as a sweep's ``methods`` names it: ``admm@sparsegpt`` with ``masks_from``."""
        return self.method + (f"@{self.masks_from}" if self.masks_from else "")


def _check_spec(sparsity: float | None = None, pattern: str | None = None) -> None:
    from modules.pruning.sparsity import SpecError, parse_spec

    try:
        parse_spec(sparsity, pattern)
    except SpecError as err:
        raise ValueError(str(err)) from None


class ZeroShotCfg(_Section):
    enabled: bool = Field(True, description="run the zero-shot evaluation")
    tasks: list[str] = Field(
        default_factory=lambda: ["embedded"],
        description="comma-separated lm-eval task names, or `embedded` (the embedded suite)",
    )
    limit: int | None = Field(None, ge=1, description="items per task (all by default)")
    batch_size: int = Field(16, ge=1, description="lm-eval batch size")
    data_dir: str | None = Field(
        None, description="local <task>.jsonl copies of the official tasks' data sets"
    )


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


def model_defaults(model: str) -> dict:
    """Data and zero-shot defaults that follow the model: the embedded ones for ``embedded``.

    Any other model gets C4 calibration, WikiText-2 perplexity and lm-eval's official
    seven tasks (the papers' protocol).
    """
    if model == "embedded":
        return {"calib": "embedded", "eval": "embedded", "tasks": ["embedded"]}
    from modules.evaluation.zeroshot import OFFICIAL_TASKS

    return {"calib": "c4", "eval": "wikitext2", "tasks": list(OFFICIAL_TASKS)}


class PipelineCfg(_Section):
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    prune: PruneCfg = Field(default_factory=PruneCfg)
    zeroshot: ZeroShotCfg = Field(default_factory=ZeroShotCfg)
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)
    gate: GateCfg = Field(default_factory=GateCfg)
    work_dir: str = Field(".topiary", description="work folder: cache, resume state, pruned models")

    @model_validator(mode="before")
    @classmethod
    def _model_defaults(cls, raw: object) -> object:
        """Fill ``data.calib``, ``data.eval`` and ``zeroshot.tasks`` from the model when absent."""
        if not isinstance(raw, dict) or not isinstance(raw.get("model", {}), dict):
            return raw
        name = raw.get("model", {}).get("name", "embedded")
        if not isinstance(name, str):
            return raw
        defaults = model_defaults(name)
        raw = dict(raw)
        for section, key in (("data", "calib"), ("data", "eval"), ("zeroshot", "tasks")):
            part = raw.get(section)
            part = {} if part is None else part
            if isinstance(part, dict) and key not in part:
                raw[section] = {**part, key: defaults[key]}
        return raw


class SweepCfg(PipelineCfg):
    methods: list[str] = Field(default_factory=lambda: ["magnitude"])
    settings: list[str] = Field(default_factory=lambda: ["0.5"])
    runner: Literal["local", "dask"] = "local"
    dask_address: str | None = None
    dask_workers: int = Field(2, ge=1)  # parallel members: Dask workers, or threads with runner local
    dask_processes: bool = True  # LocalCluster workers as processes (False: threads in this process)

    @field_validator("settings", mode="before")
    @classmethod
    def _settings(cls, v: object) -> object:
        """Unquoted rates (``[0.5, 2:4]``) are settings too: numbers become their text."""
        if isinstance(v, list):
            return [str(x) if isinstance(x, int | float) and not isinstance(x, bool) else x for x in v]
        return v


class ConfigError(TopiaryError):
    """A config file that does not validate; the message lists every problem."""


def _format(err: ValidationError, source: str) -> str:
    """All problems of ``err`` on one line: ``source: N problem(s): key: why (got value); ...``."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ").removeprefix(f"{e['loc'][-1]}: " if e["loc"] else "")
        problems.append(f"{where}: {msg} (got {e.get('input')!r})")
    return f"{source}: {len(problems)} problem(s): " + "; ".join(problems)


# Keys of which exactly one is set: overriding one clears the other (unless both are overridden).
EXCLUSIVE = {"prune.pattern": "prune.sparsity", "prune.sparsity": "prune.pattern"}


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted ``overrides`` (``{"prune.method": "wanda"}``) in the config tree ``raw``.

    Setting ``prune.pattern`` (not to null) clears the file's ``prune.sparsity`` and the
    other way round, so ``--set prune.pattern=2:4`` works on a config with a rate.

    Raises:
        ConfigError: a key whose parent is a value, not a section (``model.name.x``).
    """
    for key, value in overrides.items():
        other = EXCLUSIVE.get(key)
        if other and value is not None and other not in overrides:
            section, leaf = other.split(".")
            if isinstance(raw.get(section), dict) and leaf in raw[section]:
                raw[section][leaf] = None
        node = raw
        *parents, leaf = key.split(".")
        for depth, p in enumerate(parents):
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"--set {key}: {where} is the value {node!r}, not a section with keys")
        node[leaf] = value
    return raw


def load_config(
    path: str | Path, kind: type[PipelineCfg] = PipelineCfg, overrides: Mapping[str, Any] | None = None
):
    """Load and validate a YAML config; ``overrides`` maps dotted keys to values.

    Every problem is reported at once, on one line (:class:`ConfigError`). YAML is read
    with :class:`configs.loader.ConfigLoader`, so ``pattern: 2:4`` is the N:M pattern.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {path} does not exist")
    try:
        raw = yaml_value(path.read_text(encoding="utf-8")) or {}
    except DuplicateKeyError as err:
        raise ConfigError(f"config: {path}: {err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        why = " ".join(str(err).split())
        raise ConfigError(f"config: {path} is not valid YAML: {why}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} holds a {type(raw).__name__}, not a mapping of sections")
    raw = apply_overrides(raw, overrides or {})
    try:
        return kind.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, str(path))) from None
