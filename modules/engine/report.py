"""The pruning report, typed: what the engine measured, read by the tasks and by MLflow.

One :class:`PruneReport` per pruned model, one :class:`BlockReport` per decoder block,
one :class:`LinearReport` per weight matrix of a block (the pruned ones, and those left
dense on purpose: routers, unless ``prune.routers`` is ``prune``, which lists them as linears).
Sparsities and counts are computed here, once, over every weight matrix of the blocks;
:meth:`PruneReport.to_dict` is the JSON written to ``pruning_report.json`` and
:meth:`PruneReport.from_dict` reads it back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class LinearReport:
    """One pruned linear: its weight's shape and the weights pruned (zero off the keep-mask)."""

    shape: list[int]
    pruned: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0


@dataclass
class BlockReport:
    """One pruned decoder block.

    Attributes:
        index: Block number, from 0.
        name: Module path (``model.layers.3``).
        target: Target sparsity of this block (OWL's rate where OWL is on).
        setting: The sparsity setting as text (``0.5``, ``2:4``).
        linears: Per pruned linear, by its name within the block (``self_attn.q_proj``).
        dense: Per weight matrix left dense on purpose (a router, with ``prune.routers: dense``),
            by parameter name (``mlp.gate.weight``); ``pruned`` counts its zeros as written.
        zeros: Zeros among all the block's tensors as written (vectors included).
        params: Values of all the block's tensors as written.
        stats_groups: The groups whose statistics were collected together.
        reconstruction_error: ``||Y_pruned - Y_dense|| / ||Y_dense||`` on the calibration
            inputs; None where not measured (a data-free method).
        seconds: Time of each stage (``stats``, ``prune``, ``propagate``).
        experts: Per fused expert tensor (``mlp.experts.gate_up_proj``): ``routed_tokens``, the
            calibration tokens the router sent to each expert, and ``statistics``, what each
            expert was pruned on (``routed``, or ``all``: :mod:`modules.engine.experts`).
    """

    index: int
    name: str
    target: float
    setting: str
    linears: dict[str, LinearReport]
    stats_groups: list[list[str]] = field(default_factory=list)
    reconstruction_error: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    dense: dict[str, LinearReport] = field(default_factory=dict)
    zeros: int = 0
    params: int = 0
    experts: dict[str, dict] = field(default_factory=dict)

    @property
    def pruned(self) -> int:
        """Zero weights over every weight matrix of the block (the dense ones' zeros as written)."""
        return sum(m.pruned for m in (*self.linears.values(), *self.dense.values()))

    @property
    def numel(self) -> int:
        """Weights of every weight matrix of the block, pruned or left dense."""
        return sum(m.numel for m in (*self.linears.values(), *self.dense.values()))

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for part in ("linears", "dense"):
            out[part] = {
                k: {"shape": v.shape, "pruned": v.pruned, "sparsity": v.sparsity}
                for k, v in getattr(self, part).items()
            }
        out["sparsity"] = self.sparsity
        return out

    @classmethod
    def from_dict(cls, data: dict) -> BlockReport:
        names = {f.name for f in fields(cls)} - {"linears", "dense"}
        parts = {
            part: {k: LinearReport(list(v["shape"]), int(v["pruned"])) for k, v in data.get(part, {}).items()}
            for part in ("linears", "dense")
        }
        return cls(**{k: v for k, v in data.items() if k in names}, **parts)


@dataclass
class PruneReport:
    """A pruned model: the prune request, the blocks, the totals, the time and the provenance.

    Attributes:
        method: Registered method name.
        setting: Sparsity setting as text.
        target: Target sparsity.
        plan: The prune request as JSON data (:meth:`modules.engine.request.PruneRequest.to_json`),
            under the key its readers know.
        nsamples: Calibration windows.
        seqlen: Their length.
        blocks_prefix: Module path of the decoder blocks (``model.layers``).
        blocks: One report per block, in order.
        chosen: Choices the method made by itself (``admm_precision``).
        provenance: Where the result came from (:func:`modules.provenance.provenance`).
        owl: OWL's ratios and rates, when used.
        world_size: Processes that summed the statistics.
        strategy: Lightning strategy of those processes (``DDPStrategy``,
            ``ModelParallelStrategy``), None for one.
        seconds: Time of each phase (``owl``, ``capture``, ``stats``, ``prune``,
            ``propagate``, ``total``) and, once saved, ``phases`` (prune, save).
        left_dense: What was left dense, by kind (:func:`modules.engine.blocks.left_dense`).
        outside: ``zeros`` and ``params`` of the tensors written outside the blocks (set
            when the model is assembled).
    """

    method: str
    setting: str
    target: float
    plan: dict
    nsamples: int
    seqlen: int
    blocks_prefix: str
    blocks: list[BlockReport]
    chosen: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)
    owl: dict | None = None
    world_size: int = 1
    strategy: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict] = field(default_factory=dict)
    left_dense: dict[str, dict] = field(default_factory=dict)
    outside: dict[str, int] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def pruned_params(self) -> int:
        return sum(b.pruned for b in self.blocks)

    @property
    def prunable_params(self) -> int:
        return sum(b.numel for b in self.blocks)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over every weight matrix of the blocks (routers left dense included)."""
        return self.pruned_params / self.prunable_params if self.prunable_params else 0.0

    @property
    def model_zeros(self) -> float | None:
        """The fraction of the whole model's values that are zero as written; None before assembly."""
        if not self.outside:
            return None
        params = sum(b.params for b in self.blocks) + self.outside["params"]
        return (sum(b.zeros for b in self.blocks) + self.outside["zeros"]) / params if params else 0.0

    def summary(self) -> str:
        """The achieved sparsity, the whole model's zeros and what was left dense, on one line."""
        line = f"achieved sparsity {self.sparsity:.4f} over every weight matrix of the blocks"
        if self.model_zeros is not None:
            line += f"; zeros in the whole model {self.model_zeros:.4f}"
        kinds = [f"{k} ({v['params']:,} params)" for k, v in self.left_dense.items()]
        return line + (f"; left dense: {', '.join(kinds)}" if kinds else "")

    def stage_seconds(self) -> dict[str, float]:
        """Seconds of each per-block stage, summed over the blocks."""
        return {k: sum(b.seconds.get(k, 0.0) for b in self.blocks) for k in ("stats", "prune", "propagate")}

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``pruning_report.json`` (``chosen`` also flat at the top, as the config's keys)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "blocks"}
        out.update(
            blocks=[b.to_dict() for b in self.blocks],
            num_blocks=self.num_blocks,
            sparsity=self.sparsity,
            pruned_params=self.pruned_params,
            prunable_params=self.prunable_params,
            model_zeros=self.model_zeros,
            **self.chosen,
        )
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PruneReport:
        names = {f.name for f in fields(cls)}
        blocks = [BlockReport.from_dict(b) for b in data["blocks"]]
        return cls(**{k: v for k, v in data.items() if k in names and k != "blocks"}, blocks=blocks)
