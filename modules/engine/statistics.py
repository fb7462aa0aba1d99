"""Calibration passes over one decoder block, run by Lightning.

A pass feeds the captured block inputs through one block (``Trainer.predict`` over
sample indices) and, with forward pre-hooks on the block's linears, accumulates fp32
statistics of each distinct linear input: ``sq_norm`` (sum of squares per input
channel) always, ``gram = X^T X`` when asked. Linears that read the same tensor in a
forward (q/k/v; gate/up) share one accumulator: sharing is detected from the hook
inputs (the same tensor object), with no per-architecture table.

The same pass optionally writes the block's outputs (the next block's inputs) and
measures ``||Y - Y_ref||^2`` against reference outputs. One code path serves CPU, one
GPU and several devices: under DDP, Lightning gives each rank a disjoint share of the
samples (predict never repeats a sample), each rank accumulates over its share and the
sums are all-reduced at the end, so every rank holds the statistics of all samples.
Each rank computes the outputs of its own share; at the end every rank's rows are sent to
every rank (:func:`modules.engine.ranks.share_rows`), so each holds the whole outputs.

The block is held outside the LightningModule's module tree: Lightning moves a module to
the CPU after ``predict``, and the block must stay where it is (on its GPU) between
passes. The pass moves it to the trainer's device itself. So the module has no parameters,
and every strategy (``model.strategy``: ddp, model_parallel, fsdp, deepspeed) runs the
pass the same way: each rank its share of the samples, the sums reduced by the strategy.
A sharded strategy has nothing to shard: each rank holds the block it runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from torch import nn

from modules.engine.blocks import BlockArgs, block_device, block_experts, block_linears, run_block
from modules.engine.expert_groups import GroupedExperts
from modules.engine.experts import ExpertStats
from modules.engine.ranks import rank_and_world, share_rows
from modules.process import die_with_parent, pause_point
from modules.pruning.stats import LayerStats

_NOISE = (
    ".*does not have many workers.*",
    ".*predict returned None.*",
    ".*LeafSpec.*",
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's per-Trainer info lines and its warnings about our predict loops."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            for pattern in _NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        logger.setLevel(level)


def predict(trainer: L.Trainer, module: L.LightningModule, loader: torch.utils.data.DataLoader) -> None:
    """``trainer.predict`` over ``loader``, quiet and keeping no predictions; Ctrl-C stays an interrupt.

    Lightning turns a ``KeyboardInterrupt`` raised in its loop into ``sys.exit(1)``, and sets
    SIGINT to be ignored while it tears down: an interrupted run would exit 1, as if it had
    failed, and ignore the next Ctrl-C. The interrupt is raised again as itself, and the
    SIGINT handler of before the pass put back.
    """
    before = signal.getsignal(signal.SIGINT)
    try:
        with quiet():
            trainer.predict(module, dataloaders=loader, return_predictions=False)
    except SystemExit as err:
        if not isinstance(err.__context__, KeyboardInterrupt):
            raise
        if threading.current_thread() is threading.main_thread() and before is not None:
            signal.signal(signal.SIGINT, before)
        raise err.__context__ from None


def make_trainer(
    device: torch.device | str | None = None,
    *,
    devices: int | list[int] | str | None = None,
    strategy: str | Strategy | None = None,
    accelerator: str | None = None,
    num_nodes: int = 1,
    progress: bool = False,
) -> L.Trainer:
    """A quiet Trainer for calibration passes (no logger, checkpoints or summaries).

    Args:
        device: Where the model lives; picks the accelerator (``cpu`` or ``gpu``) and,
            for ``cuda:k``, device ``k``. Ignored when ``accelerator`` is given.
        devices: Number or list of devices (several with ``strategy="ddp"``).
        strategy: Lightning strategy, e.g. ``"ddp"`` (gloo on CPU, NCCL on GPUs), a name or
            an instance (see :func:`pass_strategy`).
        accelerator: ``cpu``, ``gpu`` or ``auto``; overrides ``device``.
        num_nodes: Machines, each with ``devices`` processes (DDP).
        progress: Show Lightning's progress bar.
    """
    if accelerator is None:
        dev = torch.device(device or "cpu")
        accelerator = "gpu" if dev.type == "cuda" else "cpu"
        if devices is None:
            devices = [dev.index or 0] if dev.type == "cuda" else 1
    kwargs = {"strategy": strategy} if strategy else {}
    with quiet():
        return L.Trainer(
            accelerator=accelerator,
            devices=devices if devices is not None else "auto",
            num_nodes=num_nodes,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            inference_mode=False,
            **kwargs,
        )


def pass_strategy(name: str, processes: int) -> str | Strategy:
    """The Lightning strategy ``name`` (a registered name, or ``model_parallel``) for ``processes`` ranks.

    ``model_parallel`` is Lightning's ``ModelParallelStrategy`` with every rank in its
    data-parallel dimension: its default would put a node's devices in one tensor-parallel
    group, whose ranks all read the same samples, and each sum would count them that often.
    """
    if name == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy  # heavy: torch's tensor parallelism

        return ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1)
    return name


class Pass(L.LightningModule):
    """A calibration pass: it holds its block or model outside the module tree (see the
    module docstring), so it has no parameters of its own."""

    def configure_model(self) -> None:
        """Nothing to parallelize (``ModelParallelStrategy`` asks each module to say so)."""


@dataclass
class _Acc:
    tokens: int
    sq_norm: torch.Tensor
    gram: torch.Tensor | None


@dataclass
class PassResult:
    """What a pass measured, summed over all samples (and all ranks).

    ``stats`` maps every collected linear to its :class:`LayerStats`; linears that read
    the same input map to the *same* object. ``groups`` lists the linears by distinct
    input in the order the block first calls them (q/k/v, o, gate/up, down).
    ``err_sq`` and ``ref_sq`` are ``sum ||Y - Y_ref||^2`` and ``sum ||Y_ref||^2`` when
    reference outputs were given. ``experts``: the fused experts' per-expert statistics
    (:meth:`modules.engine.experts.ExpertStats.result`) when asked.
    """

    stats: dict[str, LayerStats] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    experts: dict[str, torch.Tensor] = field(default_factory=dict)
    err_sq: float | None = None
    ref_sq: float | None = None


class BlockPass(Pass):
    """One forward pass of a block over the calibration inputs, with statistics hooks.

    Args:
        block: The decoder block (not registered as a submodule; see the module docstring).
        inputs: Block inputs ``(n, seq, hidden)``; batches are read from it by index.
        block_args: The block's other arguments (:class:`modules.engine.blocks.BlockArgs`).
        collect: Names (within the block) of the linears whose input statistics to
            accumulate; a shared input is accumulated once if any of its readers is named.
        gram: Also accumulate ``X^T X``.
        outputs: Buffer like ``inputs`` that receives the block outputs, or ``None``.
        reference: Outputs to compare with (may be ``outputs`` itself: the comparison
            happens before the write), or ``None``.
        experts: Also collect the fused experts' per-expert statistics under this policy
            (``routed`` or ``all``, :mod:`modules.engine.experts`), or ``None``.
        grouped: How the block's fused experts run (:class:`modules.engine.expert_groups.GroupedExperts`:
            a group at a time, and the group whose statistics are collected); None: all of them,
            as the block holds them.
    """

    def __init__(
        self,
        block: nn.Module,
        inputs: torch.Tensor,
        block_args: BlockArgs,
        *,
        collect: set[str] | frozenset[str] = frozenset(),
        gram: bool = False,
        outputs: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        experts: str | None = None,
        grouped: GroupedExperts | None = None,
    ):
        super().__init__()
        self._held = {"block": block}
        self.inputs, self.block_args = inputs, block_args
        self.collect, self.gram = set(collect), gram
        self.outputs, self.reference = outputs, reference
        self._linears = block_linears(block, routers="prune")  # every linear a prune may ask for
        self._handles: list = []
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._done: set[str] = set()
        self.owner: dict[str, str] = {}
        self.order: list[str] = []
        self.acc: dict[str, _Acc] = {}
        self.err_sq = self.ref_sq = None
        self._mine: list[torch.Tensor] = []
        fused = block_experts(block) if experts else {}
        self.experts = ExpertStats(block, fused, experts, gram) if fused else None
        self.grouped = grouped or (GroupedExperts.held(block) if block_experts(block) else None)

    @property
    def block(self) -> nn.Module:
        return self._held["block"]

    def on_predict_start(self) -> None:
        if block_device(self.block) != self.device:
            self.block.to(self.device)
        self._args = self.block_args.to(self.device)
        if self.reference is not None:
            self.err_sq = torch.zeros((), dtype=torch.float64, device=self.device)
            self.ref_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        self.add_hooks()

    def add_hooks(self) -> None:
        self.remove_hooks()
        for name, linear in self._linears.items():
            self._handles.append(linear.register_forward_pre_hook(self._hook(name)))
        if self.experts is not None:
            self.experts.add_hooks()
        if self.grouped is not None:
            self.grouped.observe = self.experts.observe if self.experts is not None else None
            self.grouped.__enter__()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
        if self.experts is not None:
            self.experts.remove_hooks()
        if self.grouped is not None:
            self.grouped.__exit__()

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            entry = self._seen.get(id(x))
            if entry is not None and entry[0]() is x:
                key = entry[1]
            else:  # weak references: a freed tensor's id may be reused, and nothing is kept alive
                key = name
                self._seen[id(x)] = (weakref.ref(x), key)
            if self.owner.setdefault(name, key) != key:
                raise RuntimeError(f"{name}: its input is shared with different linears in different batches")
            if name not in self.order:
                self.order.append(name)
            if name in self.collect and key not in self._done:
                self._done.add(key)
                self._accumulate(key, x)

        return hook

    @torch.no_grad()
    def _accumulate(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        acc = self.acc.get(key)
        if acc is None:
            cols = x.shape[1]
            gram = torch.zeros(cols, cols, device=x.device) if self.gram else None
            acc = self.acc[key] = _Acc(0, torch.zeros(cols, device=x.device), gram)
        acc.tokens += x.shape[0]
        acc.sq_norm += x.pow(2).sum(0)
        if acc.gram is not None:
            acc.gram.addmm_(x.T, x)

    @torch.no_grad()
    def predict_step(self, idx: torch.Tensor, batch_idx: int = 0) -> None:
        pause_point("statistics-pass")  # test hook: inside Lightning's predict loop
        idx = idx.to(self.inputs.device)
        self._seen.clear()
        self._done.clear()
        y = run_block(self.block, self.inputs[idx].to(self.device), self._args)
        self._seen.clear()
        if self.reference is not None:
            ref = self.reference[idx].to(y.device).float()
            self.err_sq += (y.float() - ref).pow(2).sum().double()
            self.ref_sq += ref.pow(2).sum().double()
        if self.outputs is not None:
            self.outputs[idx] = y.to(self.outputs.device, self.outputs.dtype)
            self._mine.append(idx.cpu())

    def on_predict_end(self) -> None:
        self.remove_hooks()
        reduce = self.trainer.strategy.reduce
        for key in sorted(self.acc):
            acc = self.acc[key]
            tokens = torch.tensor(float(acc.tokens), dtype=torch.float64, device=acc.sq_norm.device)
            acc.tokens = int(reduce(tokens, reduce_op="sum").item())
            acc.sq_norm = reduce(acc.sq_norm, reduce_op="sum")
            if acc.gram is not None:
                acc.gram = reduce(acc.gram, reduce_op="sum")
        for t in self.experts.tensors() if self.experts is not None else ():
            t.copy_(reduce(t, reduce_op="sum"))
        if self.err_sq is not None:
            self.err_sq = reduce(self.err_sq, reduce_op="sum")
            self.ref_sq = reduce(self.ref_sq, reduce_op="sum")
        if self.outputs is not None:  # every rank's outputs on every rank (a no-op on one)
            mine = torch.cat(self._mine) if self._mine else torch.zeros(0, dtype=torch.long)
            share_rows(self.outputs, mine)

    def drop(self) -> None:
        """Let go of the block, the hidden states and the sums: the Trainer keeps its last
        module until the next pass, and with it whatever the module still references (a
        70B block's activations, a block's Gram matrices)."""
        self._held.clear()
        self.inputs = self.outputs = self.reference = None
        self.acc, self._mine = {}, []
        self.experts = self.grouped = None

    def result(self) -> PassResult:
        """Statistics per linear (shared objects for shared inputs) and the groups in call order."""
        by_key = {k: LayerStats(a.tokens, a.sq_norm, a.gram) for k, a in self.acc.items()}
        stats = {name: by_key[self.owner[name]] for name in self.order if self.owner[name] in by_key}
        groups: dict[str, list[str]] = {}
        for name in self.order:
            groups.setdefault(self.owner[name], []).append(name)
        return PassResult(
            stats=stats,
            groups=list(groups.values()),
            experts=self.experts.result() if self.experts is not None else {},
            err_sq=None if self.err_sq is None else float(self.err_sq),
            ref_sq=None if self.ref_sq is None else float(self.ref_sq),
        )


def run_pass(
    trainer: L.Trainer,
    block: nn.Module,
    inputs: torch.Tensor,
    block_args: BlockArgs,
    *,
    collect: set[str] | frozenset[str] = frozenset(),
    gram: bool = False,
    outputs: torch.Tensor | None = None,
    reference: torch.Tensor | None = None,
    batch_size: int = 8,
    experts: str | None = None,
    grouped: GroupedExperts | None = None,
) -> PassResult:
    """Run one :class:`BlockPass` over all samples of ``inputs``; see its arguments.

    Under DDP the statistics and errors come back summed over all ranks, while
    ``outputs`` is written only at this rank's samples.
    """
    module = BlockPass(
        block,
        inputs,
        block_args,
        collect=collect,
        gram=gram,
        outputs=outputs,
        reference=reference,
        experts=experts,
        grouped=grouped,
    )
    loader = torch.utils.data.DataLoader(list(range(inputs.shape[0])), batch_size=batch_size)
    try:
        predict(trainer, module, loader)
        return module.result()
    finally:
        module.remove_hooks()
        module.drop()


class _Join(Pass):
    def predict_step(self, batch, batch_idx: int = 0) -> None:
        return None


_joined: list[L.Trainer] = []


def join(device: torch.device | str, devices: int, num_nodes: int = 1, strategy: str = "ddp") -> L.Trainer:
    """Start (or join) the run of ``devices`` processes per node on ``num_nodes`` nodes of
    ``device``'s kind (GPUs for ``cuda``, else CPU processes) under Lightning's ``strategy``
    (:func:`pass_strategy`), and keep its Trainer for every later pass of this process
    (:func:`joined`).

    Run by every rank before its first stage. Under Lightning's own launcher the first
    ``predict`` starts the other ranks by running this process's command again; under
    ``torchrun`` or SLURM they are already running. A rank Lightning started dies with rank 0.
    """
    kind = pass_strategy(strategy, devices * num_nodes)
    trainer = make_trainer(device, devices=devices, num_nodes=num_nodes, strategy=kind)
    loader = torch.utils.data.DataLoader(list(range(trainer.world_size)), batch_size=1)
    predict(trainer, _Join(), loader)
    if rank_and_world()[0] > 0 and _started_by_lightning():
        die_with_parent()
    _joined[:] = [trainer]
    return trainer


def _started_by_lightning() -> bool:
    """Whether Lightning's launcher started this rank (not torchrun or SLURM)."""
    return "TORCHELASTIC_RUN_ID" not in os.environ and "SLURM_JOB_ID" not in os.environ


def joined() -> L.Trainer | None:
    """The Trainer of :func:`join`, or None in a one-process run."""
    return _joined[0] if _joined else None
