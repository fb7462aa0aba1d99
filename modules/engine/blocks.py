"""Decoder blocks of a Hugging Face causal LM, found generically, and the inputs of the first.

Pruning runs block by block: :func:`find_blocks` locates the ``nn.ModuleList`` of decoder
blocks (no per-architecture table), :func:`capture_inputs` runs the embeddings on the
calibration windows and stops at the first block (the "Catcher" pattern: a forward
pre-hook that records the block's positional and keyword arguments, then raises), and
:func:`run_block` calls one block with those arguments and returns its hidden states,
whether the block returns a tensor or a tuple.

Keyword arguments (attention mask, ``position_embeddings``, ``position_ids``...) are
captured from a batch of one window and reused for every batch: they have batch size 1
and broadcast (seen on LLaMA, Mistral, Qwen2, OPT and GPT-NeoX, eager and SDPA
attention), and calibration windows are unpadded, so they are the same for every window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from modules.engine.routers import ROUTER_CHOICES, WHY_DENSE, experts_transposed, is_router, router_paths
from modules.errors import TopiaryError


class BlockDiscoveryError(TopiaryError):
    """The model has no decoder blocks that Topiary can find or call."""


@dataclass
class BlockArgs:
    """What a decoder block is called with besides its hidden states (shared by all batches)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> BlockArgs:
        """A copy with every tensor (also inside tuples, lists and dicts) on ``device``."""
        return BlockArgs(_to_device(self.args, device), _to_device(self.kwargs, device))


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _holds_linear(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear) and any(isinstance(m, nn.Linear) for m in module.modules())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ``nn.ModuleList`` of modules that hold linear layers.

    Among the candidate lists (every element a module, not itself a Linear, containing
    ``nn.Linear`` layers) the one with the most parameters wins, so a list of small
    adapters or heads is never taken for the decoder.

    Returns:
        ``(prefix, blocks)``: the list's qualified name (``model.layers``,
        ``gpt_neox.layers``, ``model.decoder.layers``) and the list itself.

    Raises:
        BlockDiscoveryError: No such list exists.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_holds_linear(b) for b in module):
            size = _param_count(module)
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise BlockDiscoveryError(
            f"no decoder blocks found in {type(model).__name__}: expected an nn.ModuleList of "
            "blocks that hold nn.Linear layers (the decoder layers of a causal LM)",
            key="model",
        )
    return best[1], best[2]


def block_linears(
    block: nn.Module, exclude: tuple[torch.Tensor, ...] = (), routers: str = "dense"
) -> dict[str, nn.Module]:
    """The linear layers that a block's pruning prunes, by qualified name within it, in module order.

    Each is an ``nn.Linear``, or with ``routers="prune"`` a router of a mixture of experts
    (:mod:`modules.engine.routers`): a module whose 2-D ``weight`` multiplies its input as a
    Linear's does, so statistics (a forward pre-hook on it), masks, updates and the report treat
    it as one. With ``routers="dense"`` (the default) the routers are left out. So is a linear
    whose weight shares storage with one of ``exclude`` (weights that must stay dense: the
    embeddings and LM head).
    """
    if routers not in ROUTER_CHOICES:
        raise ValueError(f"routers: {routers!r} is not one of {', '.join(ROUTER_CHOICES)}")
    ptrs = {t.data_ptr() for t in exclude if t is not None}
    kind = type(block).__name__
    paths = router_paths(kind) if routers == "prune" else ()
    return {
        name: m
        for name, m in block.named_modules()
        if name in paths
        or (isinstance(m, nn.Linear) and m.weight.data_ptr() not in ptrs and not is_router(kind, name))
    }


PRUNED, EXPERTS, ROUTER, UNSUPPORTED = "pruned", "experts", "router", "unsupported"


def block_experts(block: nn.Module) -> dict[str, bool]:
    """The fused expert tensors of a block (3-D, one matrix per expert), by parameter name within
    it, each with its orientation: True for ``(experts, in, out)``, False for ``(experts, out,
    in)`` (:func:`modules.engine.routers.experts_transposed`). Their biases are left out."""
    out = {}
    for mname, module in block.named_modules():
        transposed = experts_transposed(module)
        if transposed is not None:
            for pname, p in module.named_parameters(recurse=False):
                if p.dim() == 3 and not pname.endswith("bias"):
                    out[f"{mname}.{pname}" if mname else pname] = transposed
    return out


def expert_matrix(tensor: torch.Tensor, expert: int, transposed: bool) -> torch.Tensor:
    """Expert ``expert``'s matrix of a fused 3-D tensor as a ``(out, in)`` view, like a Linear's weight."""
    return tensor[expert].T if transposed else tensor[expert]


def block_matrices(block: nn.Module, routers: str = "dense") -> dict[str, str]:
    """Every weight matrix a block multiplies by (each parameter of 2 or more dimensions), by name
    within the block, and what pruning does to it: :data:`PRUNED` (the weight of one of
    :func:`block_linears`, routers included with ``routers="prune"``), :data:`EXPERTS` (fused
    experts, :func:`block_experts`, pruned one expert's matrix at a time), :data:`ROUTER` (left
    dense on purpose) or :data:`UNSUPPORTED` (neither: a ``Conv1D``...). Biases are not
    matrices, whatever their shape."""
    kind = type(block).__name__
    pruned = {f"{name}.weight" for name in block_linears(block, routers=routers)}
    experts = block_experts(block)

    def what(name: str) -> str:
        if name in pruned:
            return PRUNED
        return EXPERTS if name in experts else ROUTER if is_router(kind, name) else UNSUPPORTED

    return {
        name: what(name)
        for name, p in block.named_parameters()
        if p.dim() >= 2 and not name.endswith("bias")  # gpt-oss's expert biases are (experts, out)
    }


def unsupported_matrices(
    prefix: str, blocks: nn.ModuleList, kinds: tuple[str, ...] = (UNSUPPORTED,)
) -> list[str]:
    """Full names of the blocks' weight matrices of ``kinds`` (:func:`block_matrices`); by default
    those that would be neither pruned nor left dense on purpose."""
    return [
        f"{prefix}.{i}.{name}"
        for i, block in enumerate(blocks)
        for name, what in block_matrices(block).items()
        if what in kinds
    ]


def unsupported_message(architecture: str, names: list[str], who: str | None = None) -> str:
    """The one-line refusal (its key: ``model``) of a model whose blocks hold ``names``: matrices
    that nothing prunes, or (with ``who``) fused experts that ``who`` cannot prune yet."""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    if who is not None:
        return (
            f"{architecture}'s decoder blocks hold {len(names)} fused expert tensors ({shown}) that "
            f"{who} cannot prune yet"
        )
    return (
        f"{architecture}'s decoder blocks hold {len(names)} weight matrices that Topiary would "
        f"leave dense without saying so: {shown} (Topiary prunes nn.Linear weights and fused expert tensors)"
    )


def check_supported(prefix: str, blocks: nn.ModuleList) -> None:
    """Refuse (before any work) blocks holding matrices that would be neither pruned nor left dense."""
    names = unsupported_matrices(prefix, blocks)
    if names:
        raise BlockDiscoveryError(unsupported_message(type(blocks[0]).__name__, names), key="model")


def left_dense(
    model: nn.Module, prefix: str, saved: set[str] | None = None, routers: str = "dense"
) -> dict[str, dict]:
    """What pruning leaves dense, by kind: ``{kind: {"why", "tensors", "params"}}``.

    Kinds: ``outside blocks`` (embeddings, LM head, final norm), ``routers`` (unless
    ``routers="prune"``: then they are pruned matrices), ``biases``
    and ``vectors`` (norms, attention sinks: every other 1-D parameter of a block); the
    count of each from the model's parameters (a tied one once), or only from those named in
    ``saved`` (the tensors written; after the reader has materialized and released a
    skeleton's modules, shared parameters are no longer one object).
    """
    why = {
        "outside blocks": "embeddings, LM head and final norm: not pruned (outside the decoder blocks)",
        "routers": WHY_DENSE,
        "biases": "biases: vectors, not weight matrices",
        "vectors": "norms and other 1-D parameters: vectors, not weight matrices",
    }
    out: dict[str, dict] = {}
    kinds = {i: block_matrices(b, routers) for i, b in find_blocks(model)[1].named_children()}
    for name, p in model.named_parameters():
        if saved is not None and name not in saved:
            continue
        if not name.startswith(f"{prefix}."):
            kind = "outside blocks"
        else:
            index, _, inner = name.removeprefix(f"{prefix}.").partition(".")
            if inner.endswith("bias"):
                kind = "biases"
            elif p.dim() < 2:
                kind = "vectors"
            elif kinds[index].get(inner) == ROUTER:
                kind = "routers"
            else:
                continue  # a matrix the blocks' pruning prunes
        entry = out.setdefault(kind, {"why": why[kind], "tensors": 0, "params": 0})
        entry["tensors"] += 1
        entry["params"] += p.numel()
    return out


def dense_weights(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """Weights that are never pruned: the input embeddings and the LM head (tied or not)."""
    out = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            out.append(module.weight)
    return tuple(out)


def block_device(block: nn.Module) -> torch.device:
    """The device of a block's first parameter (CPU for a block without parameters)."""
    param = next(block.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def block_output(out) -> torch.Tensor:
    """The hidden states of a block's return value: a tensor, or the first item of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise BlockDiscoveryError(
        f"a decoder block returned {type(out).__name__}; expected a tensor or a tuple "
        "whose first item is the hidden states",
        key="model",
    )


def run_block(block: nn.Module, hidden: torch.Tensor, block_args: BlockArgs) -> torch.Tensor:
    """Call ``block`` on ``hidden`` (batch, seq, hidden) with the captured arguments."""
    return block_output(block(hidden, *block_args.args, **block_args.kwargs))


class _Captured(Exception):
    """Raised by the catcher hook to stop the model's forward at the first block."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("first decoder block reached")
        self.args, self.kwargs = args, kwargs


def _catch(_module: nn.Module, args: tuple, kwargs: dict):
    raise _Captured(args, dict(kwargs))


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    blocks: nn.ModuleList | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, BlockArgs]:
    """Hidden states entering the first decoder block, and its other arguments.

    Runs the model on one window at a time; a forward pre-hook on the first block records
    its arguments and stops the forward, so only the embeddings (and rotary tables,
    masks) are computed. The hook is removed whatever happens.

    Args:
        model: A causal LM (any device, any dtype).
        input_ids: Calibration windows, LongTensor ``(n, seqlen)``.
        blocks: The decoder blocks, if already found.
        device: Where the results go; default the first block's device (give one when the
            blocks are a skeleton on the meta device, loaded one at a time).

    Returns:
        ``(inputs, block_args)``: ``inputs`` is ``(n, seqlen, hidden)`` in the model's
        dtype on ``device``; ``block_args`` holds the block's other
        positional arguments and keyword arguments (from the first window).
    """
    if input_ids.dim() != 2 or input_ids.dtype != torch.long or input_ids.shape[0] == 0:
        raise TopiaryError(
            f"calibration: expected a LongTensor of shape (n, seqlen) with n >= 1, got "
            f"{input_ids.dtype} of shape {tuple(input_ids.shape)}"
        )
    if blocks is None:
        _, blocks = find_blocks(model)
    embed = model.get_input_embeddings()
    ids_device = embed.weight.device if embed is not None else block_device(blocks[0])
    device = block_device(blocks[0]) if device is None else torch.device(device)
    n = input_ids.shape[0]
    inputs: torch.Tensor | None = None
    block_args: BlockArgs | None = None
    handle = blocks[0].register_forward_pre_hook(_catch, with_kwargs=True)
    try:
        for i in range(n):
            try:
                model(input_ids=input_ids[i : i + 1].to(ids_device), use_cache=False)
            except _Captured as cap:
                args, kwargs = cap.args, cap.kwargs
            else:
                raise BlockDiscoveryError(
                    f"the forward of {type(model).__name__} never called its first decoder block", key="model"
                )
            if args:
                hidden, rest = args[0], tuple(args[1:])
            elif "hidden_states" in kwargs:
                hidden, rest = kwargs.pop("hidden_states"), ()
            else:
                raise BlockDiscoveryError(
                    f"cannot find the hidden states among the first block's arguments "
                    f"(keywords: {', '.join(kwargs) or 'none'})",
                    key="model",
                )
            if inputs is None:
                inputs = torch.empty((n, *hidden.shape[1:]), dtype=hidden.dtype, device=device)
                block_args = BlockArgs(rest, kwargs).to(device)
            inputs[i] = hidden[0]
    finally:
        handle.remove()
    return inputs, block_args


class _Replay(nn.Module):
    """Stands in for a decoder block in the final forward: the first returns the stored
    last hidden states, the others pass theirs on."""

    def __init__(self, block: nn.Module, as_tuple: bool):
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.as_tuple = as_tuple
        if hasattr(block, "attention_type"):  # read by some models' forward to pick the mask
            self.attention_type = block.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.hidden if self.hidden is not None else hidden_states
        return (out,) if self.as_tuple else out


def head_logits(
    model: nn.Module, blocks: nn.ModuleList, hidden: torch.Tensor, as_tuple: bool
) -> torch.Tensor:
    """The logits of the last block's output rows ``hidden`` ``(b, k, d)``, any positions.

    They come from the model's own forward with its ``blocks`` replaced by replays of
    ``hidden``, so its final norm, head and any post-processing (Gemma-2's soft-capping,
    Cohere's logit scale) run as in the whole model; all of these act on each position alone.
    """
    real = list(blocks)
    replays = [_Replay(b, as_tuple) for b in real]
    replays[0].hidden = hidden
    try:
        for i, r in enumerate(replays):
            blocks[i] = r
        return model(inputs_embeds=torch.zeros_like(hidden), use_cache=False).logits
    finally:
        for i, b in enumerate(real):
            blocks[i] = b
