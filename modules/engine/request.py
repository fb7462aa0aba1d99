"""The prune request: what to do to every block, one frozen object from the edge to the method.

``topiary prune``, the pipeline and the sweep build it once from their validated config
(:meth:`configs.schema.PruneCfg`); the stages read it from their :class:`modules.engine.request.Job`.
Its JSON form (:meth:`PruneRequest.to_json`) is what crosses a process boundary (a spawned
rank, a cache key, the report); it is read back once, on the other side.

Options:

- ``true_sequential``: prune the linears of a block group by group in the order the
  block reads them (q/k/v, then o, then gate/up, then down), re-collecting the
  statistics of each group after the earlier groups are pruned (SparseGPT's option).
- ``owl``: non-uniform sparsity across blocks (OWL). The allocation needs the outlier
  ratios of *all* blocks before the first is pruned, so a first dense pass over the
  whole model collects the input norms and scores every block with Wanda's
  ``|W| * ||X||``; then block ``i`` is pruned at ``rate_i``.
- ``report_error``: measure each block's reconstruction error even for a data-free
  method (magnitude), which otherwise runs no calibration pass and reports ``None``.
- ``options``: keyword arguments of the method; ``selector="mask"`` with
  ``mask_file=<.safetensors file or folder of them>`` reads each linear's keep-mask by
  its full parameter name and passes it as ``mask=`` (ADMM's user-given mask).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from modules.pruning.registry import get_method, reads_data
from modules.pruning.sparsity import SparsitySpec, parse_spec


@dataclass(frozen=True)
class PruneRequest:
    """What to do to every block; plain data, written into the report.

    Attributes:
        method: A registered method name (:data:`modules.pruning.registry.METHOD_NAMES`).
        spec: Target sparsity (rate or N:M).
        options: Keyword options of the method (see the module docstring for ``selector="mask"``).
        true_sequential: Prune group by group within a block, re-collecting statistics.
        owl: OWL non-uniform rates across blocks (unstructured rates only).
        owl_m: OWL's outlier threshold, a multiple of the mean score.
        owl_lambda: OWL's band half-width around the target rate.
        batch_size: Calibration windows per forward in the statistics passes.
        report_error: Run the calibration passes of a data-free method too, to report
            each block's reconstruction error (methods that read data always report it).
        moe_calibration: The fused experts' per-expert statistics, ``routed`` or ``all``
            (:mod:`modules.engine.experts`).
        expert_group: Fused experts loaded, pruned and run this many at a time within a block
            (None: all of a block's at once; :mod:`modules.engine.expert_groups`).
        routers: The routers of mixtures of experts, ``dense`` (left dense) or ``prune`` (pruned
            as linears of the block: :func:`modules.engine.blocks.block_linears`).
    """

    method: str
    spec: SparsitySpec
    options: dict = field(default_factory=dict)
    true_sequential: bool = False
    owl: bool = False
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    batch_size: int = 8
    report_error: bool = False
    moe_calibration: str = "routed"
    expert_group: int | None = None
    routers: str = "dense"

    def to_json(self) -> dict:
        """The request as JSON data (``spec`` as its text), as the report records it."""
        out = asdict(self)
        out["spec"] = str(self.spec)
        return out

    @classmethod
    def from_json(cls, data: dict) -> PruneRequest:
        """The request of :meth:`to_json`'s output."""
        text = str(data["spec"])
        spec = parse_spec(None, text) if ":" in text else parse_spec(float(text), None)
        return cls(**{**data, "spec": spec, "options": dict(data.get("options") or {})})

    def needs(self) -> set[str]:
        """Statistics the method needs beyond ``sq_norm`` with its options: ``gram`` and/or ``grad``."""
        return set(get_method(self.method).statistics(self.options))

    def data_free(self) -> bool:
        """True when no calibration pass is needed: a data-free method, no OWL, no error asked for."""
        return not reads_data({"method": self.method, "owl": self.owl, "report_error": self.report_error})


@dataclass(frozen=True)
class Job:
    """What every stage of one streamed prune shares (plain data, part of every cache key).

    Attributes:
        model_dir: The dense checkpoint's folder.
        dtype: The dtype the blocks are pruned in (a name, ``float32``...).
        device: Where blocks are pruned (``cpu``, ``cuda:0``).
        folder: The run's work folder (activations, statistics, masks, shards).
        request: What to do to every block (:class:`modules.engine.request.PruneRequest`).
        nsamples: Calibration windows.
        activations: How a stage holds the hidden states it reads: ``memory`` (read into
            memory), ``mmap`` (memory-mapped from their file, paged in as used) or ``auto``
            (``mmap`` when a block's inputs and outputs together need more than half the
            available memory). Results are the same; it is not part of any cache key.
    """

    model_dir: str
    dtype: str
    device: str
    folder: str
    request: PruneRequest
    nsamples: int
    activations: str = "auto"

    @property
    def path(self) -> Path:
        return Path(self.folder)

    def to_json(self) -> dict:
        """The job as JSON data: what a task takes (and its cache key reads) across processes."""
        return {**asdict(self), "request": self.request.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> Job:
        """The job of :meth:`to_json`'s output."""
        return cls(**{**data, "request": PruneRequest.from_json(data["request"])})
