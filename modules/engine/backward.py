"""GBLM's gradient aggregates by a block-wise backward: one decoder block live at a time.

The same numbers as the whole-model pass of :mod:`modules.engine.gradients` (``G = sqrt(sum_k
(100 g_k)^2)`` per weight of every pruned linear, ``g_k`` the gradient of window ``k``'s
mean-token LM loss with labels = inputs), without the whole model in memory. By the chain
rule a block's weight gradients depend only on the block's input and the gradient of the
loss at its output, so:

1. Embed: the calibration windows through the embeddings up to the first block
   (:func:`modules.engine.blocks.capture_inputs`), which also captures the block's other call
   arguments (attention mask, position embeddings), shared by every block.
2. Forward sweep: blocks ``0..n-1`` in order, one window at a time, without autograd;
   every block's input is kept (on ``store``).
3. Top: final norm and LM head on the last block's output; per window ``100 * loss`` is
   back-propagated to that output, giving the upstream gradient ``100 dL/dh``.
4. Backward sweep, from the top block down: per window, recompute the block's forward on
   its stored input with autograd, back-propagate the upstream gradient into it,
   accumulate ``(100 g)^2`` of each linear's weight in fp32, and replace the upstream
   gradient by the one at the block's input. The block's file is written as soon as it
   is done, in the format :func:`modules.engine.gradients.load_block_grads` reads.

Under DDP (:mod:`modules.engine.ranks`) each rank sweeps its share of the windows (every
``world``-th), the per-weight sums of squares are all-reduced before the square root, and
rank 0 writes the files.

Blocks come from ``load_block(i)``, called once per sweep, so a streaming loader can read
each block from disk; the default takes the model's own blocks. A block runs on the
device its ``load_block`` put it on. Embeddings are used only in step 1, the final norm
and head only in step 3.

What is live at once: on the compute device, one block's weights, their gradients and
fp32 accumulators, and one window's activations through one block (the whole-model pass
holds every weight, every pruned weight's gradient and accumulator, and one window's
activations through every block). On ``store``: every block's input for every window,
``n_blocks * n_windows * seqlen * hidden`` values in the model's dtype, released block by
block during the backward sweep, plus one upstream-gradient buffer of
``n_windows * seqlen * hidden``. With ``spill`` (a folder) the blocks' inputs go to files
there instead, each memory-mapped back when the backward sweep reaches its block: the
host then holds one block's inputs and outputs and the upstream gradient (Llama-2-70B,
128 x 2048 windows: 343 GB on disk instead of memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modules.engine.blocks import (
    BlockArgs,
    BlockDiscoveryError,
    block_device,
    block_linears,
    capture_inputs,
    dense_weights,
    find_blocks,
    run_block,
)
from modules.engine.gradients import SCALE, grads_path
from modules.engine.ranks import all_sum, rank_and_world, writes
from modules.errors import TopiaryError


def final_norm(model: nn.Module, prefix: str) -> nn.Module:
    """The norm between the last decoder block and the LM head.

    Found without a per-architecture table: among the children of the module that holds
    the blocks (``model.layers`` -> ``model``), the one with parameters that is neither
    the block list, an embedding nor the LM head (``norm``, ``final_layer_norm``, ``ln_f``).

    Raises:
        BlockDiscoveryError: none or several such children (e.g. a projection after the norm).
    """
    parent_name, _, _ = prefix.rpartition(".")
    parent, blocks = model.get_submodule(parent_name), model.get_submodule(prefix)
    found = [
        (name, child)
        for name, child in parent.named_children()
        if child is not blocks
        and child is not model.get_output_embeddings()
        and not isinstance(child, nn.Embedding)
        and next(child.parameters(), None) is not None
    ]
    if len(found) != 1:
        names = ", ".join(name for name, _ in found) or "none"
        raise BlockDiscoveryError(
            f"model: cannot tell the final norm of {type(model).__name__} (candidates beside its decoder "
            f"blocks: {names}); the block-wise backward needs exactly one"
        )
    return found[0][1]


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy with labels = inputs (Hugging Face's causal-LM loss, unpadded)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())


@contextmanager
def _grads_for(module: nn.Module, weights: list[nn.Parameter]) -> Iterator[None]:
    """Eval mode, autograd on, and only ``weights`` of ``module`` requiring grad; all restored after."""
    flags = {p: p.requires_grad for p in module.parameters()}
    was_training = module.training
    try:
        for p in flags:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        module.eval()
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        module.train(was_training)


def _spilled(hidden: torch.Tensor, folder: Path, index: int) -> Callable[[], torch.Tensor]:
    """Write ``hidden`` (on the host) to ``folder``; a function that maps it back (copy-on-write)."""
    from modules.process import building

    path = folder / f"inputs-{index:04d}.bin"
    with building(path) as tmp:
        hidden.contiguous().view(torch.uint8).numpy().tofile(tmp)
    shape, dtype, size = hidden.shape, hidden.dtype, hidden.numel()  # not hidden: it must be freed
    return lambda: torch.from_file(str(path), shared=False, size=size, dtype=dtype).view(shape)


@torch.no_grad()
def _forward_sweep(
    load_block: Callable[[int], nn.Module],
    count: int,
    inputs: torch.Tensor,
    block_args: BlockArgs,
    spill: Path | None = None,
) -> tuple[list[Callable[[], torch.Tensor]], torch.Tensor]:
    """Every block's inputs (``count`` functions giving tensors like ``inputs``: kept, or mapped
    back from ``spill``) and the last block's output."""
    stored, hidden = [], inputs
    for i in range(count):
        block = load_block(i)
        was_training = block.training
        block.eval()
        device = block_device(block)
        args = block_args.to(device)
        out = torch.empty_like(hidden)
        for k in range(hidden.shape[0]):
            out[k] = run_block(block, hidden[k : k + 1].to(device), args)[0].to(out.device)
        block.train(was_training)
        if spill is None:
            stored.append(lambda kept=hidden: kept)
        else:
            stored.append(_spilled(hidden.cpu(), spill, i))
        hidden = out
    return stored, hidden


def lm_tail(model: nn.Module, prefix: str) -> tuple[nn.Module, nn.Module]:
    """``(final norm, LM head)``: what turns the last block's output into logits.

    Raises:
        BlockDiscoveryError: no head, no single final norm, or logits that the model
            post-processes (soft-capping, scaling), which ``head(norm(h))`` would miss.
    """
    name = type(model).__name__
    head = model.get_output_embeddings()
    if head is None:
        raise BlockDiscoveryError(f"model: {name} has no LM head (get_output_embeddings)")
    config = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, key, None) not in (None, 1.0):
            raise BlockDiscoveryError(
                f"model: {name} sets {key}; the block-wise backward computes plain logits"
            )
    return final_norm(model, prefix), head


def _top_gradient(
    norm: nn.Module, head: nn.Module, top: torch.Tensor, input_ids: torch.Tensor
) -> torch.Tensor:
    """``100 dL_k/dh`` at the last block's output for every window ``k`` (like ``top``)."""
    upstream = torch.empty_like(top)
    device, head_device = block_device(norm), block_device(head)
    with _grads_for(norm, []), _grads_for(head, []):
        for k in range(top.shape[0]):
            h = top[k : k + 1].to(device).requires_grad_(True)
            logits = head(norm(h).to(head_device))
            (lm_loss(logits, input_ids[k : k + 1].to(head_device)) * SCALE).backward()
            upstream[k] = h.grad[0].to(upstream.device)
    return upstream


def _block_gradients(
    block: nn.Module,
    inputs: torch.Tensor,
    block_args: BlockArgs,
    upstream: torch.Tensor,
    exclude: tuple[torch.Tensor, ...],
    pass_down: bool,
) -> dict[str, torch.Tensor]:
    """One block's ``sqrt(sum_k (100 g_k)^2)`` per linear; ``upstream`` becomes the input gradient."""
    linears = block_linears(block, exclude=exclude)
    device = block_device(block)
    args = block_args.to(device)
    acc = {name: torch.zeros_like(lin.weight, dtype=torch.float32) for name, lin in linears.items()}
    with _grads_for(block, [lin.weight for lin in linears.values()]):
        for k in range(inputs.shape[0]):
            x = inputs[k : k + 1].to(device).requires_grad_(pass_down)
            run_block(block, x, args).backward(upstream[k : k + 1].to(device))
            with torch.no_grad():
                for name, lin in linears.items():
                    if lin.weight.grad is None:
                        raise TopiaryError(f"gradients: {name} received no gradient from the LM loss")
                    acc[name] += lin.weight.grad.float().pow(2)
                    lin.weight.grad = None
                if pass_down:
                    upstream[k] = x.grad[0].to(upstream.device)
    return {name: all_sum(a).sqrt() for name, a in acc.items()}  # under DDP: every rank's windows


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    from modules.process import building

    with building(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def blockwise_gradients(
    model: nn.Module,
    input_ids: torch.Tensor,
    directory: str | Path,
    *,
    load_block: Callable[[int], nn.Module] | None = None,
    store: torch.device | str = "cpu",
    spill: str | Path | None = None,
) -> Path:
    """GBLM's per-weight gradient aggregates, one block at a time, written per block.

    Args:
        model: The dense causal LM. Only its embeddings (step 1), final norm and LM head
            (step 3) and the structure of its block list are used when ``load_block`` is
            given. Runs in eval mode; ``requires_grad`` flags and modes are restored.
        input_ids: Calibration windows, LongTensor ``(n, seqlen)``.
        directory: Folder for ``block_{i:04d}.safetensors`` (created), keys = linear names
            within the block, fp32 on CPU: what :func:`modules.engine.gradients.load_block_grads` reads.
        load_block: ``i -> block i`` on the device it should run on; called once in the
            forward and once in the backward sweep. Default: the model's own blocks.
        store: Where the blocks' inputs and the upstream gradients are kept between blocks.
        spill: A folder (created) for the blocks' inputs between the two sweeps instead of
            ``store``: written once, mapped back one block at a time (see the module docstring).

    Returns:
        ``directory`` as a Path.

    Raises:
        TopiaryError: bad ``input_ids``, a model whose final norm or head cannot be found,
            or a linear that gets no gradient.
    """
    out_dir = Path(directory)
    rank, world = rank_and_world()
    if world > 1:  # DDP: this rank's share of the windows; the sums are all-reduced
        if input_ids.shape[0] < world:
            raise TopiaryError(f"gradients: {input_ids.shape[0]} windows cannot be shared by {world} ranks")
        input_ids = input_ids[rank::world]
    prefix, blocks = find_blocks(model)
    load_block = load_block or blocks.__getitem__
    exclude = dense_weights(model)
    norm, head = lm_tail(model, prefix)  # before the sweep: a model we cannot finish fails at once
    inputs, block_args = capture_inputs(model, input_ids, blocks, device=store)
    if spill is not None:
        spill = Path(spill)
        spill.mkdir(parents=True, exist_ok=True)
    stored, top = _forward_sweep(load_block, len(blocks), inputs, block_args, spill)
    del inputs
    upstream = _top_gradient(norm, head, top, input_ids)
    del top
    if writes():
        out_dir.mkdir(parents=True, exist_ok=True)
    for i in reversed(range(len(blocks))):
        # pop: block i's inputs are released as soon as its backward is done
        grads = _block_gradients(
            load_block(i), stored.pop()(), block_args, upstream, exclude, pass_down=i > 0
        )
        if writes():  # rank 0 writes what every rank holds
            _save_atomic(grads, grads_path(out_dir, i))
        if spill is not None:
            (spill / f"inputs-{i:04d}.bin").unlink(missing_ok=True)
    return out_dir
