"""GBLM's gradient aggregates by a block-wise backward: one decoder block live at a time.

The same numbers as the whole-model pass of :mod:`modules.engine.gradients` (``G = sqrt(sum_k
(100 g_k)^2)`` per weight of every pruned linear and fused expert tensor, ``g_k`` the gradient
of window ``k``'s mean-token LM loss with labels = inputs), without the whole model in memory. By the chain
rule a block's weight gradients depend only on the block's input and the gradient of the
loss at its output, so:

1. Embed: the calibration windows through the embeddings up to the first block
   (:func:`modules.engine.blocks.capture_inputs`), which also captures the block's other call
   arguments (attention mask, position embeddings), shared by every block.
2. Forward sweep: blocks ``0..n-1`` in order, one window at a time, without autograd;
   every block's input is kept (on ``store``).
3. Top: the model's own forward after its blocks (final norm, LM head, soft-capping or logit
   scale) on the last block's output; per window ``100 * loss`` is back-propagated to that
   output, giving the upstream gradient ``100 dL/dh``.
4. Backward sweep, from the top block down: per window, recompute the block's forward on
   its stored input with autograd, back-propagate the upstream gradient into it,
   accumulate ``(100 g)^2`` of each linear's weight in fp32, and replace the upstream
   gradient by the one at the block's input. The block's file is written as soon as it
   is done, in the format :func:`modules.engine.gradients.load_block_grads` reads.

Under DDP (:mod:`modules.engine.ranks`) each rank sweeps its share of the windows (every
``world``-th), the per-weight sums of squares are all-reduced before the square root, and
rank 0 writes the files.

Blocks come from ``load_block(i)``, called whenever a sweep needs block ``i``, so a
streaming loader can read each block from disk; the default takes the model's own blocks.
A block runs on the device its ``load_block`` put it on. Embeddings are used only in step 1,
the final norm and head only in step 3.

What is live at once: on the compute device, one block's weights, their gradients and
fp32 accumulators, and one window's activations through one block (the whole-model pass
holds every weight, every pruned weight's gradient and accumulator, and one window's
activations through every block). On ``store``: every block's input for every window,
``n_blocks * n_windows * seqlen * hidden`` values in the model's dtype, released block by
block during the backward sweep, plus one upstream-gradient buffer of
``n_windows * seqlen * hidden``.

Resume and bounded disk (``state``, a folder). The blocks are cut into segments of ``every``
blocks (default ``ceil(sqrt(n_blocks))``). The forward sweep writes the inputs of each
segment's first block there; the backward writes the upstream gradient at the input of each
segment it finishes and deletes what it has passed. A killed call, run again on the same
folder, goes on from the last upstream gradient on disk, at most one segment back (or,
killed in the forward sweep, from the last inputs on disk), and gives the same bytes: every
recomputed input is the same computation on the same values. With ``in_memory=False`` only
those files hold inputs between the sweeps: the backward recomputes a segment's inputs from
its first block's (one extra forward of the model in all) into files it maps back one block
at a time. The disk then holds at most ``2 every + 2`` blocks' inputs instead of
``n_blocks`` (Llama-2-70B, 128 x 2048 windows: 20 x 4.3 GB = 86 GB instead of 343 GB), and
the host one block's inputs and outputs and the upstream gradient.
"""

from __future__ import annotations

import logging
import math
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
    block_output,
    capture_inputs,
    dense_weights,
    find_blocks,
    head_logits,
    run_block,
)
from modules.engine.gradients import SCALE, gradient_weights, grads_path, save_atomic
from modules.engine.ranks import all_max, all_sum, rank_and_world, writes
from modules.errors import TopiaryError
from modules.process import building, pause_point


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


def _raw_file(folder: Path, kind: str, index: int) -> Path:
    return folder / f"{kind}-{index:04d}.bin"


def _write_raw(tensor: torch.Tensor, path: Path) -> None:
    """``tensor``'s bytes to ``path`` (written under a temporary name, then renamed)."""
    with building(path) as tmp:
        tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tofile(tmp)


def _mapped(path: Path, like: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A function that maps ``path`` back as a tensor shaped like ``like`` (copy-on-write).

    It keeps only the shape and dtype: the tensor that was written can be freed.
    """
    shape, dtype, size = like.shape, like.dtype, like.numel()
    return lambda: torch.from_file(str(path), shared=False, size=size, dtype=dtype).view(shape)


@torch.no_grad()
def _forward(
    load_block: Callable[[int], nn.Module],
    blocks: range,
    hidden: torch.Tensor,
    block_args: BlockArgs,
    keep: Callable[[int, torch.Tensor], None],
) -> tuple[torch.Tensor, bool]:
    """Run ``blocks`` in order on ``hidden`` (one window at a time, without autograd), calling
    ``keep(i, inputs)`` with each block's inputs; returns the last block's output and whether the
    blocks return tuples."""
    as_tuple = False
    for i in blocks:
        keep(i, hidden)
        block = load_block(i)
        was_training = block.training
        block.eval()
        device = block_device(block)
        args = block_args.to(device)
        out = torch.empty_like(hidden)
        for k in range(hidden.shape[0]):
            raw = block(hidden[k : k + 1].to(device), *args.args, **args.kwargs)
            as_tuple = isinstance(raw, tuple)
            out[k] = block_output(raw)[0].to(out.device)
        block.train(was_training)
        hidden = out
    return hidden, as_tuple


def _head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None:
        raise BlockDiscoveryError(f"model: {type(model).__name__} has no LM head (get_output_embeddings)")
    return head


def _top_gradient(
    model: nn.Module, blocks: nn.ModuleList, top: torch.Tensor, as_tuple: bool, input_ids: torch.Tensor
) -> torch.Tensor:
    """``100 dL_k/dh`` at the last block's output for every window ``k`` (like ``top``).

    The logits come from the model's own forward on ``h`` (:func:`modules.engine.blocks.head_logits`),
    so its final norm, head and what follows the head (Gemma-2's soft-capping, Granite's and
    Cohere's logit scales) are differentiated as the whole model's loss would be.
    """
    upstream = torch.empty_like(top)
    device = block_device(_head(model))
    with _grads_for(model, []):
        for k in range(top.shape[0]):
            h = top[k : k + 1].to(device).requires_grad_(True)
            logits = head_logits(model, blocks, h, as_tuple)
            (lm_loss(logits, input_ids[k : k + 1].to(logits.device)) * SCALE).backward()
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
    """One block's ``sqrt(sum_k (100 g_k)^2)`` per weight of :func:`modules.engine.gradients.gradient_weights`
    (pruned linears and fused experts); ``upstream`` becomes the gradient at the block's input."""
    weights = gradient_weights(block, exclude)
    device = block_device(block)
    args = block_args.to(device)
    acc = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    with _grads_for(block, list(weights.values())):
        for k in range(inputs.shape[0]):
            x = inputs[k : k + 1].to(device).requires_grad_(pass_down)
            run_block(block, x, args).backward(upstream[k : k + 1].to(device))
            with torch.no_grad():
                for name, w in weights.items():
                    if w.grad is None:
                        raise TopiaryError(f"gradients: {name} received no gradient from the LM loss")
                    acc[name] += w.grad.float().pow(2)
                    w.grad = None
                if pass_down:
                    upstream[k] = x.grad[0].to(upstream.device)
    return {name: all_sum(a).sqrt() for name, a in acc.items()}  # under DDP: every rank's windows


class _Progress:
    """The blocks' inputs between the sweeps and the backward's progress, in memory and in the
    resume folder ``folder`` (see the module docstring): ``held`` maps a block to a function
    giving its inputs; the upstream gradient at block ``i``'s input is on disk for each ``i`` of
    ``saved`` (``n``: the last block's output)."""

    def __init__(self, folder: str | Path | None, n: int, every: int, in_memory: bool, like: torch.Tensor):
        self.folder, self.n, self.every, self.in_memory, self.like = folder, n, every, in_memory, like
        self.last = (n - 1) // every * every  # the top segment's first block
        self.held: dict[int, Callable[[], torch.Tensor]] = {}
        self.saved: list[int] = []
        if folder is not None:
            self.folder = Path(folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            self.held = {
                i: self._file("inputs", i) for i in range(n) if _raw_file(self.folder, "inputs", i).is_file()
            }
            self.saved = [i for i in range(n + 1) if _raw_file(self.folder, "upstream", i).is_file()]

    def _file(self, kind: str, i: int) -> Callable[[], torch.Tensor]:
        return _mapped(_raw_file(self.folder, kind, i), self.like)

    def keep(self, i: int, hidden: torch.Tensor, segment: bool = False) -> None:
        """Hold block ``i``'s inputs: in memory, or (every ``every``-th block, and without
        ``in_memory`` those recomputed for the backward) in the folder."""
        durable = self.folder is not None and (
            i % self.every == 0 or (not self.in_memory and (segment or i >= self.last))
        )
        if durable and i not in self.held:
            _write_raw(hidden, _raw_file(self.folder, "inputs", i))
        if self.in_memory:
            self.held[i] = lambda kept=hidden: kept
        elif durable:
            self.held[i] = self._file("inputs", i)

    def inputs(self, i: int, recompute: Callable) -> torch.Tensor:
        """Block ``i``'s inputs, released here; recomputed from the last inputs held below it
        (``recompute(blocks, hidden, keep)``: :func:`_forward`) when not held."""
        if i not in self.held:
            c = max(j for j in self.held if j < i)
            hidden, _ = recompute(range(c, i), self.held[c](), lambda j, h: self.keep(j, h, segment=True))
            self.keep(i, hidden, segment=True)
        return self.held.pop(i)()

    def resume(self) -> int:
        """The block whose input's upstream gradient every rank holds (``n + 1``: none). The ranks
        go in step (each block's sums are all-reduced) and keep the last two, so they share one."""
        return all_max(min(self.saved, default=self.n + 1))

    def save_upstream(self, upstream: torch.Tensor, i: int) -> None:
        if self.folder is None:
            return
        _write_raw(upstream, _raw_file(self.folder, "upstream", i))
        self.saved.append(i)
        for old in sorted(self.saved)[2:]:  # the backward goes down: keep the two latest
            _raw_file(self.folder, "upstream", old).unlink(missing_ok=True)
            self.saved.remove(old)

    def done(self, i: int, upstream: torch.Tensor) -> None:
        """Block ``i``'s gradients are written: at a segment's first block the upstream gradient
        is saved (a resume goes on from there), and its inputs' file is deleted."""
        if self.folder is not None:
            if i > 0 and i % self.every == 0:
                self.save_upstream(upstream, i)
            _raw_file(self.folder, "inputs", i).unlink(missing_ok=True)

    def finish(self) -> None:
        for i in self.saved if self.folder is not None else ():  # done: nothing to resume
            _raw_file(self.folder, "upstream", i).unlink(missing_ok=True)


def _my_windows(input_ids: torch.Tensor) -> torch.Tensor:
    """This rank's share of the windows under DDP (every ``world``-th; the sums are all-reduced)."""
    rank, world = rank_and_world()
    if world > 1 and input_ids.shape[0] < world:
        raise TopiaryError(f"gradients: {input_ids.shape[0]} windows cannot be shared by {world} ranks")
    return input_ids[rank::world] if world > 1 else input_ids


def blockwise_gradients(
    model: nn.Module,
    input_ids: torch.Tensor,
    directory: str | Path,
    *,
    load_block: Callable[[int], nn.Module] | None = None,
    store: torch.device | str = "cpu",
    state: str | Path | None = None,
    in_memory: bool = True,
    every: int | None = None,
    log: logging.Logger | None = None,
) -> Path:
    """GBLM's per-weight gradient aggregates, one block at a time, written per block.

    Args:
        model: The dense causal LM. Only its modules outside the blocks (embeddings in step
            1, final norm and head in step 3) are used when ``load_block`` is given. Runs in
            eval mode; ``requires_grad`` flags and modes are restored.
        input_ids: Calibration windows, LongTensor ``(n, seqlen)``.
        directory: Folder for ``block_{i:04d}.safetensors`` (created), keys as
            :func:`modules.engine.gradients.gradient_weights`, fp32 on CPU.
        load_block: ``i -> block i`` on the device it should run on; called whenever the
            sweeps need block ``i``. Default: the model's own blocks.
        store: Where the blocks' inputs and the upstream gradients are held in memory.
        state: A folder (created) for the resume state: the inputs of every ``every``-th
            block and the upstream gradient at the last finished segment, each written
            under a temporary name and renamed. A call with the same folder (and the same
            model, windows and world) goes on from where a killed one stopped, to the same
            bytes. Its files are deleted as the backward passes them, the last ones
            at the end (the caller removes the folder). None: nothing but ``directory`` is written.
        in_memory: Hold every block's inputs on ``store`` between the sweeps. False (needs
            ``state``): only the ``every``-th blocks' inputs are kept, in files, and the
            backward recomputes the others one segment at a time into files it maps back
            (see the module docstring).
        every: Blocks per segment; default ``ceil(sqrt(n_blocks))``.
        log: Where "gradients: resuming ..." is said; default the ``topiary`` logger.

    Returns:
        ``directory`` as a Path.

    Raises:
        TopiaryError: bad ``input_ids``, no LM head, or a weight that gets no gradient.
    """
    if state is None and not in_memory:
        raise ValueError("blockwise_gradients: in_memory=False keeps the inputs in `state`; give one")
    input_ids, log = _my_windows(input_ids), log or logging.getLogger("topiary")
    prefix, blocks = find_blocks(model)
    n, load_block, exclude = len(blocks), load_block or blocks.__getitem__, dense_weights(model)
    _head(model)  # before the sweep: a model we cannot finish fails at once
    inputs, block_args = capture_inputs(model, input_ids, blocks, device=store)
    like = torch.empty_like(inputs, device="meta")  # the shape and dtype of every file
    progress = _Progress(state, n, every or math.isqrt(n - 1) + 1, in_memory, like)
    up = progress.resume()
    if up <= n:
        upstream = _mapped(_raw_file(progress.folder, "upstream", up), like)()
        log.info("gradients: resuming the backward at block %d/%d", up, n)
    else:
        start = -all_max(-max(progress.held, default=0))  # a block every rank holds the inputs of
        if start:
            log.info("gradients: resuming the forward sweep at block %d/%d", start + 1, n)
        hidden = progress.held[start]() if start else inputs
        progress.held = {i: f for i, f in progress.held.items() if i <= start}
        top, as_tuple = _forward(load_block, range(start, n), hidden, block_args, progress.keep)
        del hidden
        upstream, up = _top_gradient(model, blocks, top, as_tuple, input_ids), n
        del top
        progress.save_upstream(upstream, n)
    del inputs
    if writes():
        Path(directory).mkdir(parents=True, exist_ok=True)
    for i in reversed(range(up)):
        x = progress.inputs(i, lambda *a: _forward(load_block, *a[:2], block_args, a[2]))
        grads = _block_gradients(load_block(i), x, block_args, upstream, exclude, pass_down=i > 0)
        if writes():  # rank 0 writes what every rank holds
            save_atomic(grads, grads_path(directory, i))
        progress.done(i, upstream)
        pause_point("gradients-backward")  # test hook: block i is done and durable
    progress.finish()
    return Path(directory)
