"""A block's fused experts a few at a time (``prune.expert_group``): device memory below one block.

A mixture-of-experts block keeps almost all of its weights in its fused expert tensors (3-D,
one matrix per expert: ``experts.gate_up_proj`` / ``down_proj`` and their per-expert biases).
With an expert group of ``N``, every stage holds the block's other tensors (its "trunk":
attention, norms, router, shared experts) and ``N`` experts' rows of the fused tensors, never
all of them:

- a pass over the windows (:class:`GroupedExperts`) calls the experts module once per group,
  with that group's rows loaded and released after; each forward over a batch reads the
  block's experts group by group;
- the per-expert statistics of a group come from a pass that loads that group alone (the
  experts' inputs do not depend on the experts), so the sums held are one group's;
- the masks and update stages prune a group's experts from its rows and its statistics
  (:mod:`modules.engine.weight_stages`); their files name each expert's matrix apart
  (``<tensor>.<e>``, ``<tensor>.<e>.keep``), so any group reads the experts it holds;
- the output shard is written group by group (:func:`modules.engine.stages.propagate`).

A pruning unit of experts is named ``<fused tensor>[a:b]`` (:func:`unit`): experts ``a`` to
``b - 1`` of that tensor. The groups are the same for every stage of a run (:func:`ranges`).

Same numbers as the whole block: the experts module is called with the tokens routed to the
group, ordered as the module's own loop orders them (by expert, then top-k slot, then token),
and each expert's outputs are added to the block's in expert order, as the module adds them;
so on the CPU a grouped run writes the bytes of a whole-block run (tests/engine/test_expert_groups.py).
Llama-4's experts module (:data:`modules.engine.routers.PRESCALED`) takes every token for every
expert: a group takes its experts' rows of that input.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from modules.engine.blocks import block_experts
from modules.engine.experts import experts_of
from modules.engine.routers import PRESCALED

_UNIT = re.compile(r"^(.+)\[(\d+):(\d+)\]$")

Loader = Callable[[str, int, int], torch.Tensor]


def ranges(experts: int, group: int | None) -> list[tuple[int, int]]:
    """The expert groups ``[(a, b), ...]`` of ``experts`` experts, ``group`` at a time (None: one)."""
    size = group or experts or 1
    return [(a, min(a + size, experts)) for a in range(0, experts, size)]


def unit(name: str, a: int, b: int) -> str:
    """The pruning unit of experts ``a`` to ``b - 1`` of fused tensor ``name``."""
    return f"{name}[{a}:{b}]"


def parse_unit(name: str) -> tuple[str, int, int] | None:
    """``(tensor, a, b)`` of a unit of experts; None for a linear's name."""
    match = _UNIT.match(name)
    return (match.group(1), int(match.group(2)), int(match.group(3))) if match else None


def expert_count(block: nn.Module) -> int:
    """The experts of a block's fused tensors (0 without any)."""
    fused = block_experts(block)
    return len(block.get_parameter(next(iter(fused)))) if fused else 0


def expert_units(block: nn.Module, group: int | None) -> list[list[str]]:
    """The block's fused tensors as units, one list per expert group (none without experts)."""
    fused = block_experts(block)
    return [[unit(n, a, b) for n in fused] for a, b in ranges(expert_count(block), group)]


def expert_params(block: nn.Module) -> dict[str, nn.Module]:
    """Every per-expert parameter of the block's experts modules (the fused weights and their
    biases: a first dimension of one row per expert), by name within the block, with its module."""
    out = {}
    for path, module in experts_of(block, block_experts(block)).items():
        experts = len(module.down_proj)
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and p.shape[0] == experts:
                out[f"{path}.{name}"] = module
    return out


def _call_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden, top_k_index, top_k_weights)`` of a call of an experts module (transformers' generic
    convention; gpt-oss names them ``router_indices`` and ``routing_weights``)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
    return hidden, index, weights


class GroupedExperts:
    """Run the experts modules of a block (their per-expert parameters on the meta device)
    group by group, as the module docstring says.

    Args:
        block: The block, its trunk loaded (:func:`modules.engine.job.load_block`).
        load: ``load(parameter name within the block, a, b)``: that parameter's rows ``a`` to
            ``b - 1``, on the block's device, pruned files applied.
        groups: The groups to run; a pass whose outputs matter runs them all, a statistics pass
            of one group runs that group alone (the module's output is then partial).
        observe: ``observe(path, module, args, kwargs)``, called for ``collect``'s group with its
            rows loaded: the call as the module would see it with that group alone, routing
            indices ``e - a`` for its experts and -1 for the others (per-expert statistics).
        collect: The group ``observe`` is called for.
    """

    def __init__(
        self,
        block: nn.Module,
        load: Loader,
        groups: list[tuple[int, int]],
        observe: Callable | None = None,
        collect: tuple[int, int] | None = None,
    ):
        self.block, self.load, self.groups = block, load, groups
        self.observe, self.collect = observe, collect
        self.params = expert_params(block)
        self._modules = experts_of(block, block_experts(block))

    @classmethod
    def held(cls, block: nn.Module) -> GroupedExperts:
        """All experts of a block that holds them (loaded whole) at once, as the module runs them."""
        params = {n: block.get_parameter(n) for n in expert_params(block)}
        (whole,) = ranges(expert_count(block), None)
        return cls(block, lambda n, a, b: params[n][a:b], [whole], collect=whole)

    def __enter__(self) -> GroupedExperts:
        for path, module in self._modules.items():
            module.forward = self._forward(path, module, module.forward)
        return self

    def __exit__(self, *exc) -> None:
        for module in self._modules.values():
            module.__dict__.pop("forward", None)

    def _forward(self, path: str, module: nn.Module, original: Callable) -> Callable:
        names = [n.rpartition(".")[2] for n in self.params if n.rpartition(".")[0] == path]
        experts = len(module.down_proj)

        def forward(*args, **kwargs):
            meta = {n: module._parameters[n] for n in names}
            count = getattr(module, "num_experts", None)
            out = None
            try:
                for a, b in self.groups:
                    for n in names:
                        rows = self.load(f"{path}.{n}", a, b)
                        module._parameters[n] = nn.Parameter(rows, requires_grad=False)
                    if count is not None:
                        module.num_experts = b - a
                    out = self._group(path, module, original, (a, b), experts, out, args, kwargs)
                    module._parameters.update(meta)
                if isinstance(out, _Routed):  # a pass of one group's statistics: the output is not used
                    out = out.result()
                if out is None:  # a pass that needs no expert (true-sequential linears): not used either
                    out = torch.zeros_like(args[0] if args else kwargs["hidden_states"])
            finally:
                module._parameters.update(meta)
                if count is not None:
                    module.num_experts = count
            return out

        return forward

    def _group(self, path, module, original, rows, experts, out, args, kwargs) -> torch.Tensor:
        """Add group ``rows``' output to ``out`` (None before the first group)."""
        a, b = rows
        if type(module).__name__ in PRESCALED:  # (experts * tokens, hidden), one block of rows per expert
            hidden = args[0] if args else kwargs["hidden_states"]
            tokens = hidden.shape[0] // experts
            mine = (hidden[a * tokens : b * tokens],)
            if rows == self.collect and self.observe:
                self.observe(path, module, mine, {})
            y = original(*mine)
            if (a, b) == (0, experts):
                return y
            out = torch.zeros_like(hidden) if out is None else out
            out[a * tokens : b * tokens] = y
            return out
        hidden, index, weights = _call_args(args, kwargs)
        if rows == self.collect and self.observe:
            local = torch.where((index >= a) & (index < b), index - a, torch.full_like(index, -1))
            self.observe(path, module, (hidden, local, weights), {})
        if (a, b) == (0, experts):
            return original(hidden, index, weights)
        out = _Routed(hidden, index, _sums_slots(module)) if out is None else out
        out.add(original, weights, a, b)
        if b == self.groups[-1][1]:
            return out.result()
        return out


def _sums_slots(module: nn.Module) -> bool:
    """Whether the module adds a token's top-k outputs slot by slot (transformers' ``batched_mm``
    and ``grouped_mm``: a sum over the top-k dimension) rather than expert by expert (its eager loop)."""
    config = getattr(module, "config", None)
    return getattr(config, "_experts_implementation", None) not in (None, "eager")


class _Routed:
    """The output of an experts module called with a group of its experts at a time.

    Each group's call takes one row per (token, slot) routed to the group, ordered by expert,
    slot and token (the rows the module's own loop gives each expert), top-k 1; each row's
    output (already weighted) is kept and, once every group ran, added up as the module adds
    them: over the top-k slots of each token, or per expert in the experts' order."""

    def __init__(self, hidden: torch.Tensor, index: torch.Tensor, by_slot: bool):
        self.hidden, self.index, self.by_slot = hidden, index, by_slot
        self.x = hidden.reshape(-1, hidden.shape[-1])
        tokens, k = index.shape
        self.rows = torch.zeros(tokens, k, self.x.shape[-1], dtype=self.x.dtype, device=self.x.device)
        self.out = None if by_slot else torch.zeros_like(self.x)

    def add(self, original: Callable, weights: torch.Tensor, a: int, b: int) -> None:
        index = self.index
        token, slot = ((index >= a) & (index < b)).nonzero(as_tuple=True)
        if not len(token):
            return
        expert = index[token, slot]
        order = torch.argsort((expert * index.shape[1] + slot) * index.shape[0] + token, stable=True)
        token, slot, expert = token[order], slot[order], expert[order]
        y = original(self.x[token], (expert - a)[:, None], weights[token, slot][:, None])
        if self.by_slot:
            self.rows[token, slot] = y
            return
        for e in torch.unique_consecutive(expert).tolist():
            mine = (expert == e).nonzero().squeeze(-1)
            self.out.index_add_(0, token[mine], y[mine])

    def result(self) -> torch.Tensor:
        out = self.rows.sum(dim=1) if self.by_slot else self.out
        return out.reshape(self.hidden.shape)
