"""Calibration statistics of fused experts, one expert at a time, from the tokens routed to it.

A fused experts module (transformers 5: ``experts.gate_up_proj`` / ``down_proj``, 3-D, one
matrix per expert) is not an ``nn.Linear``, so no linear hook sees an expert's input. A
forward pre-hook on the experts module sees what the block gives it; from that, for each
expert ``e``, the statistics pass forms

- ``gate_up_proj``'s input (``up_proj``'s where there is no gate): the hidden states of the
  tokens the router sends to ``e``;
- ``down_proj``'s input: ``e``'s intermediate activation on those tokens, recomputed with the
  module's own gate (``_apply_gate``, transformers' default where the class has none).

Two calling conventions (:data:`modules.engine.routers.PRESCALED`): transformers' generic one
(``use_experts_implementation``, and gpt-oss): ``experts(hidden (T, H), top_k_index (T, k),
top_k_weights (T, k))``, the output of ``e`` on token ``t`` multiplied by ``r[t, e]``; and
Llama-4's: every token for every expert, ``(E*T, H)``, each row already scaled by ``r[t, e]``
(zero where ``e`` is not among ``t``'s top k: those rows are the tokens not routed to ``e``),
the unscaled tokens being the input of the module holding the experts.

Weighting (``routed``). The block output is ``y_t = sum_e r[t, e] * expert_e(x_t)``, so an
error ``d`` in expert ``e``'s output on token ``t`` reaches the block output as ``r[t, e] * d``:
the layer-wise objective of a matrix of ``e`` (SparseGPT's and ADMM's ``||X W^T - X Z^T||^2``)
counts token ``t`` with weight ``r[t, e]^2``. Both statistics of both matrices are weighted so:
``gram = sum_t r^2 x x^T`` and ``sq_norm = sum_t r^2 x^2`` (Wanda's ``|W| * ||X_j||``, with
``X`` the expert's inputs as they reach the block output: one rule for every method, and a
token the router barely picks cannot outweigh one it relies on). With Llama-4's convention the
weight already sits in the input (the statistics see ``r x``), so the token weight is 1.
``tokens`` counts the routed tokens (unweighted).

Policy (``moe_calibration``). ``all``: llm-compressor's practice, every calibration token
through every expert for the statistics (unscaled, weight 1), the block's output still routed.
``routed``: the routed tokens; an expert that received fewer than :data:`MIN_ROUTED_TOKENS`
takes its ``all`` statistics instead, and the report says so per expert. So no expert is pruned
on statistics of zero or a handful of tokens, and nothing divides by a count of zero.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from modules.engine.blocks import expert_matrix
from modules.engine.routers import PRESCALED
from modules.errors import TopiaryError
from modules.pruning.sparsity import check_finite
from modules.pruning.stats import LayerStats

MIN_ROUTED_TOKENS = 16
MODES = ("routed", "all")
INPUT_OF = {"gate_up_proj": "tokens", "up_proj": "tokens", "down_proj": "intermediate"}


def experts_of(block: nn.Module, fused: dict[str, bool]) -> dict[str, nn.Module]:
    """The experts modules holding the fused tensors ``fused`` (names within ``block``), by path."""
    paths = {name.rpartition(".")[0] for name in fused}
    return {path: block.get_submodule(path) for path in sorted(paths)}


def unknown_tensors(fused: dict[str, bool]) -> list[str]:
    """Fused expert tensors whose input this module cannot form (not one of :data:`INPUT_OF`)."""
    return [name for name in fused if name.rpartition(".")[2] not in INPUT_OF]


def _matmul(x: torch.Tensor, matrix: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x @ matrix if transposed else x @ matrix.T


def intermediate(module: nn.Module, expert: int, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Expert ``expert``'s activation on tokens ``x`` (rows), the input of its ``down_proj``:
    the up (or gate-up) projection, its bias, then the module's own gate or activation."""
    from transformers.integrations.moe import _default_apply_gate

    gated = hasattr(module, "gate_up_proj")
    name = "gate_up_proj" if gated else "up_proj"
    weight = getattr(module, name)[expert]
    h = _matmul(x.to(weight.dtype), weight, transposed)
    bias = getattr(module, f"{name}_bias", None)
    if isinstance(bias, torch.Tensor):
        h = h + bias[expert]
    if not gated:
        return module.act_fn(h)
    return module._apply_gate(h) if hasattr(module, "_apply_gate") else _default_apply_gate(module, h)


class _Sums:
    """Per-expert sums of one fused tensor's input: tokens (E,), sq_norm (E, C_in), gram (E, C_in, C_in)."""

    def __init__(self, experts: int, cols: int, gram: bool, device: torch.device):
        self.tokens = torch.zeros(experts, dtype=torch.float64, device=device)
        self.sq_norm = torch.zeros(experts, cols, device=device)
        self.gram = torch.zeros(experts, cols, cols, device=device) if gram else None

    def add(self, expert: int, x: torch.Tensor, weight: torch.Tensor | None) -> None:
        x = x.float()
        wx = x if weight is None else x * weight.float()[:, None]
        self.tokens[expert] += x.shape[0]
        self.sq_norm[expert] += (wx * x).sum(0)
        if self.gram is not None:
            self.gram[expert].addmm_(wx.T, x)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.tokens, self.sq_norm, self.gram) if t is not None]


def routing(module: nn.Module, args: tuple, kwargs: dict, unscaled: torch.Tensor | None):
    """``(x (T, H), [(rows, inputs, weights)] per expert)`` of one call of ``module``: every
    token, and for each expert the tokens routed to it, their inputs as the expert sees them and
    their weights (None: weight 1) per the module docstring."""
    experts = len(module.down_proj)
    hidden = args[0] if args else kwargs["hidden_states"]
    if type(module).__name__ in PRESCALED:
        x = unscaled.reshape(-1, unscaled.shape[-1])
        scaled = hidden.reshape(experts, x.shape[0], -1)
        routed = []
        for e in range(experts):
            rows = scaled[e].ne(0).any(-1).nonzero().squeeze(-1)
            routed.append((rows, scaled[e][rows], None))
        return x, routed
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
    x = hidden.reshape(-1, hidden.shape[-1])
    routed = []
    for e in range(experts):
        rows, slot = (index == e).nonzero(as_tuple=True)
        routed.append((rows, x[rows], weights[rows, slot].pow(2)))
    return x, routed


class ExpertStats:
    """The per-expert sums of a block's fused experts over a statistics pass (see the module docstring).

    Args:
        block: The decoder block.
        fused: Its fused tensors with their orientation (:func:`modules.engine.blocks.block_experts`).
        mode: ``routed`` or ``all`` (:data:`MODES`).
        gram: Also sum the Gram matrices.
    """

    def __init__(self, block: nn.Module, fused: dict[str, bool], mode: str, gram: bool):
        if mode not in MODES:
            raise ValueError(f"moe_calibration: {mode!r} is not one of {', '.join(MODES)}")
        self.block, self.fused, self.mode, self.gram = block, fused, mode, gram
        self.modules = experts_of(block, fused)
        self.routed: dict[str, _Sums] = {}
        self.all: dict[str, _Sums] = {}
        self._unscaled: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def add_hooks(self) -> None:
        """Keep the unscaled input of Llama-4's experts (:data:`PRESCALED`); the calls themselves
        come through :meth:`observe` (:class:`modules.engine.expert_groups.GroupedExperts`)."""
        for path, module in self.modules.items():
            if type(module).__name__ in PRESCALED:
                parent = self.block.get_submodule(path.rpartition(".")[0])
                self._handles.append(
                    parent.register_forward_pre_hook(self._keep_input(path), with_kwargs=True)
                )

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._unscaled.clear()

    def _keep_input(self, path: str):
        def hook(_module, args, kwargs):
            self._unscaled[path] = args[0] if args else kwargs["hidden_states"]

        return hook

    @torch.no_grad()
    def observe(self, path: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Add one call of the experts module at ``path`` (its experts loaded, one group's or all)."""
        x, routed = routing(module, args, kwargs, self._unscaled.pop(path, None))
        for e, (rows, inputs, weights) in enumerate(routed):
            if self.mode == "routed":
                self._add(self.routed, path, module, e, inputs, weights)
            else:  # counted for the report only
                self._sums(self.routed, f"{path}.count", len(module.down_proj), 1, x).tokens[e] += len(rows)
            self._add(self.all, path, module, e, x, None)

    def _sums(self, into: dict, key: str, experts: int, cols: int, x: torch.Tensor) -> _Sums:
        if key not in into:
            into[key] = _Sums(experts, cols, self.gram and not key.endswith(".count"), x.device)
        return into[key]

    def _add(self, into: dict, path: str, module: nn.Module, e: int, x: torch.Tensor, weights) -> None:
        experts = len(module.down_proj)
        for name in (n for n in self.fused if n.rpartition(".")[0] == path):
            transposed = self.fused[name]
            kind = INPUT_OF[name.rpartition(".")[2]]
            inputs = x if kind == "tokens" else intermediate(module, e, x, transposed)
            self._sums(into, name, experts, inputs.shape[-1], inputs).add(e, inputs, weights)

    def tensors(self) -> list[torch.Tensor]:
        """Every sum, in a fixed order (for a reduction over ranks)."""
        return [t for d in (self.routed, self.all) for k in sorted(d) for t in d[k].tensors()]

    def result(self) -> dict[str, torch.Tensor]:
        """Per fused tensor ``name``: ``name.tokens`` (E,), ``name.sq_norm`` (E, C_in), ``name.gram``
        (E, C_in, C_in) when asked, under the policy; ``name.routed`` (E,), the tokens the router
        sent to each expert; ``name.fallback`` (E,), True where ``routed`` took ``all``'s statistics."""
        out = {}
        for name in self.fused:
            full = self.all[name]
            if self.mode == "routed":
                mine = self.routed[name]
                fallback = mine.tokens < MIN_ROUTED_TOKENS
                pick = [
                    torch.where(_fit(fallback, a), a, b)
                    for a, b in zip(full.tensors(), mine.tensors(), strict=True)
                ]
                count = mine.tokens
            else:
                fallback = torch.zeros(len(full.tokens), dtype=torch.bool, device=full.tokens.device)
                pick, count = full.tensors(), self.routed[f"{name.rpartition('.')[0]}.count"].tokens
            keys = ("tokens", "sq_norm", "gram")[: len(pick)]
            out |= {f"{name}.{k}": t for k, t in zip(keys, pick, strict=True)}
            out[f"{name}.routed"] = count.long()
            out[f"{name}.fallback"] = fallback
        return out


def _fit(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flags.reshape(-1, *([1] * (like.dim() - 1)))


def expert_gradient(grad: torch.Tensor, expert: int, transposed: bool, routed: int) -> torch.Tensor:
    """Expert ``expert``'s slice of a fused tensor's gradient aggregates as ``(out, in)``, like its
    matrix; zero when the router sent it fewer than :data:`MIN_ROUTED_TOKENS` tokens (``routed``):
    the gradient of a handful of tokens is not pruned on (:mod:`modules.engine.gradients`)."""
    G = expert_matrix(grad, expert, transposed)
    return torch.zeros_like(G) if routed < MIN_ROUTED_TOKENS else G.clone()


def each_expert(
    tensor: torch.Tensor,
    name: str,
    where: str,
    transposed: bool,
    sums: dict[str, torch.Tensor] | None,
    grad: torch.Tensor | None = None,
    first: int = 0,
) -> Iterator[tuple[int, torch.Tensor, LayerStats | None]]:
    """``(e, W, stats)`` for each expert of fused tensor ``tensor`` (``name`` within its block,
    ``where`` in messages): its matrix as a checked fp32 ``(out, in)`` copy, like a Linear's
    weight, and its own statistics from ``sums`` (:meth:`ExpertStats.result`; None for a
    data-free method) with its slice of ``grad`` (:func:`expert_gradient`) if given. An expert
    without tokens is refused, never pruned on empty sums. ``tensor`` and ``sums`` may hold a
    group of experts from expert ``first`` on (``grad`` holds them all); ``e`` is the expert's own
    number."""
    for j in range(tensor.shape[0]):
        e = first + j
        W = expert_matrix(tensor, j, transposed).to(torch.float32, copy=True)
        check_finite(f"{where} expert {e} weight", W)
        layer = None
        if sums is not None:
            gram = sums.get(f"{name}.gram")
            layer = LayerStats(int(sums[f"{name}.tokens"][j]), sums[f"{name}.sq_norm"][j].clone(),
                               None if gram is None else gram[j].clone(), scratch=True)  # fmt: skip
            if layer.tokens == 0:
                raise TopiaryError(f"{where}: expert {e} has no calibration token to prune it on")
            check_finite(f"{where} expert {e} statistics", layer.sq_norm)
            if grad is not None:
                layer.grad = expert_gradient(grad, e, transposed, int(sums[f"{name}.routed"][j]))
        yield e, W, layer
