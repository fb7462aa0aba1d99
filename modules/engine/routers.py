"""The one per-architecture table of the engine: mixtures of experts' routers and expert layout.

A router (gate) is a small ``(experts, hidden)`` matrix that picks the experts of every
token. By default it stays dense (``prune.routers: dense``): an error in it re-routes tokens
instead of perturbing an output slightly, and it is a negligible share of the weights (the
common practice of one-shot pruning of mixtures of experts). With ``prune.routers: prune`` it
is pruned like a linear of the block (:func:`modules.engine.blocks.block_linears`): every
router multiplies its input by its weight as a Linear does (Llama-4's is an ``nn.Linear``, the
others a module calling ``F.linear(hidden, self.weight[, self.bias])``). transformers gives no
generic handle on it, hence this table.

Keys are decoder-block class names (what the engine holds when it walks the blocks);
values the router modules' paths within the block. A path that a block lacks (DeepSeek-V3's
first dense blocks, Qwen3-MoE's ``mlp_only_layers``) is simply not there.
Fused expert tensors (``experts.gate_up_proj`` / ``down_proj``, 3-D) hold one matrix per
expert, as ``(experts, out, in)`` (Mixtral-style, like a Linear's weight) or ``(experts, in,
out)``. transformers says which on its experts modules (``is_transposed``, set by
``use_experts_implementation``); :data:`TRANSPOSED` covers experts modules that do not
(Llama-4's). :data:`PRESCALED` names experts modules called with every token for every expert,
each row already scaled by its routing weight (Llama-4's; :mod:`modules.engine.experts`).
tests/engine/test_routers.py builds each architecture and checks its entries.
"""

from __future__ import annotations

ROUTERS: dict[str, tuple[str, ...]] = {
    "MixtralDecoderLayer": ("mlp.gate",),
    "Qwen3MoeDecoderLayer": ("mlp.gate",),
    "OlmoeDecoderLayer": ("mlp.gate",),
    "DeepseekV3DecoderLayer": ("mlp.gate",),
    "GptOssDecoderLayer": ("mlp.router",),
    "Llama4TextDecoderLayer": ("feed_forward.router",),
}

TRANSPOSED = frozenset({"Llama4TextExperts"})  # (experts, in, out), without an is_transposed attribute
PRESCALED = frozenset({"Llama4TextExperts"})  # called as experts(scaled (experts * tokens, hidden))

WHY_DENSE = (
    "routers: left dense (a pruned router re-routes tokens; a tiny share of the weights); "
    "prune.routers: prune (--routers prune) prunes them"
)
ROUTER_CHOICES = ("dense", "prune")  # prune.routers: left dense (the default), or pruned as linears


def router_paths(block_class: str) -> tuple[str, ...]:
    """The router modules' paths within a decoder block of class ``block_class`` (none if unknown)."""
    return ROUTERS.get(block_class, ())


def is_router(block_class: str, name: str) -> bool:
    """Whether ``name`` (a module or parameter path within such a block) is or lies in a router."""
    return any(name == p or name.startswith(f"{p}.") for p in router_paths(block_class))


def experts_transposed(module) -> bool | None:
    """For a module of fused experts, whether its 3-D tensors are ``(experts, in, out)``; None for
    any other module."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    return True if type(module).__name__ in TRANSPOSED else None
