"""GBLM-Pruner's gradient step: the l2 aggregate of per-sample gradients, per pruned weight.

For every linear of every decoder block, ``G = sqrt(sum_k (100 g_k)^2)`` where ``g_k`` is
the gradient of calibration sample ``k``'s LM loss (labels = inputs, mean over tokens)
with respect to the weight, computed by a forward and backward of the *dense* model,
one sample at a time. The loss is multiplied by 100 before ``backward`` (the same
``100 g`` in exact arithmetic; in fp16/bf16 it keeps small gradients from underflowing),
squares are accumulated in fp32, and the root is taken at the end.

The result is written per block, ``<dir>/block_{i:04d}.safetensors`` with keys = linear
names within the block (``self_attn.q_proj``; the routers' too, whether or not the prune prunes
them: a tiny matrix, and one gradient folder then serves both ``prune.routers`` choices) and fused
expert tensors' names
(``mlp.experts.gate_up_proj``, 3-D: one aggregate per expert's slice), so pruning can stream
it block by block (:func:`load_block_grads`; :func:`gradient_weights` says which).

Mixtures of experts. An expert's slice of a fused tensor gets its gradient from the tokens
the router sends to it, and from no other: the block output is ``y_t = sum_e r[t, e] *
expert_e(x_t)``, so ``dL/dW_e = sum_{t routed to e} r[t, e] * (dL/dy_t) (d expert_e(x_t)/dW_e)``
(Llama-4 scales the expert's input by ``r[t, e]`` instead: an unrouted token's input is zero,
and so is its gradient). That is GBLM's
quantity for the expert as it is, the gradient of the model's own LM loss, so no weighting is
added: each routed token counts with its routing weight once in ``g_k``, hence ``r^2`` in
``G^2 = sum_k (100 g_k)^2``, as in the ``r^2``-weighted statistics of the experts
(:mod:`modules.engine.experts`). ``moe_calibration: all`` changes only the activation term:
pushing unrouted tokens through an expert would give the gradient of another model's loss.
An expert routed fewer than :data:`modules.engine.experts.MIN_ROUTED_TOKENS` tokens has a
gradient of a handful of tokens or none; pruning drops it (``G = 0``: Wanda's score on its
``all`` statistics, which it takes then) and the report says ``all`` for it.

Unlike the pruning passes this step holds the whole model: a backward needs all of it.

Under DDP each rank takes a disjoint share of the samples (Lightning's predict
sampler never repeats one) and the sums are all-reduced before the root; rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from modules.engine.blocks import (
    block_device,
    block_experts,
    block_linears,
    dense_weights,
    find_blocks,
)
from modules.engine.statistics import Pass, make_trainer, predict
from modules.errors import TopiaryError
from modules.process import building
from modules.pruning.sparsity import check_finite

SCALE = 100.0


def grads_path(directory: str | Path, index: int) -> Path:
    """Where block ``index``'s gradients live."""
    return Path(directory) / f"block_{index:04d}.safetensors"


def gradient_weights(block: nn.Module, exclude: tuple[torch.Tensor, ...] = ()) -> dict[str, nn.Parameter]:
    """The weights of a block whose gradient aggregates pruning reads, by their key in the block's
    file: each linear's weight under the linear's name (routers included: ``routers="prune"``),
    each fused expert tensor under its own (:func:`modules.engine.blocks.block_experts`)."""
    out = {name: lin.weight for name, lin in block_linears(block, exclude=exclude, routers="prune").items()}
    return out | {name: block.get_parameter(name) for name in block_experts(block)}


class GradientPass(Pass):
    """Dense forward+backward per calibration sample; accumulates ``(100 g)^2`` in fp32.

    The model is held outside the module tree (Lightning would move it to the CPU after
    ``predict``); the pass moves it to the trainer's device itself.

    Args:
        model: The dense causal LM.
        input_ids: Calibration windows ``(n, seqlen)``.
        weights: Parameter name -> weight to accumulate for (the pruned linears).
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, weights: dict[str, nn.Parameter]):
        super().__init__()
        self._held = {"model": model}
        self.input_ids, self.weights = input_ids, weights
        self.acc: dict[str, torch.Tensor] = {}

    @property
    def model(self) -> nn.Module:
        return self._held["model"]

    def on_predict_start(self) -> None:
        if block_device(self.model) != self.device:
            self.model.to(self.device)
        self.acc = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in self.weights.items()}

    def predict_step(self, idx: torch.Tensor, batch_idx: int = 0) -> None:
        for i in idx.tolist():
            ids = self.input_ids[i : i + 1].to(self.device)
            with torch.enable_grad():
                loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
                (loss * SCALE).backward()
            with torch.no_grad():
                for name, w in self.weights.items():
                    if w.grad is None:
                        raise TopiaryError(f"gradients: {name} received no gradient from the LM loss")
                    self.acc[name] += w.grad.float().pow(2)
                    w.grad = None

    def on_predict_end(self) -> None:
        reduce = self.trainer.strategy.reduce
        for name in sorted(self.acc):
            self.acc[name] = reduce(self.acc[name], reduce_op="sum").sqrt()


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` (moved to the host) as safetensors under ``path``, atomically."""
    with building(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def compute_gradients(
    model: nn.Module,
    input_ids: torch.Tensor,
    out_dir: str | Path,
    *,
    trainer: L.Trainer | None = None,
) -> Path:
    """Run the gradient step and write one safetensors file per decoder block.

    Args:
        model: Dense causal LM (any dtype; CPU or GPU). Its ``requires_grad`` flags and
            train/eval mode are restored afterwards; the pass runs in eval mode.
        input_ids: Calibration windows, LongTensor ``(n, seqlen)``.
        out_dir: Folder for ``block_{i:04d}.safetensors`` (created).
        trainer: Lightning Trainer (e.g. DDP over several devices); default: one device,
            the model's.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    prefix, blocks = find_blocks(model)
    dense = dense_weights(model)
    per_block = [gradient_weights(block, dense) for block in blocks]
    weights = {f"{prefix}.{i}.{n}": w for i, ws in enumerate(per_block) for n, w in ws.items()}
    trainer = trainer or make_trainer(block_device(blocks[0]))
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    module = GradientPass(model, input_ids, weights)
    loader = torch.utils.data.DataLoader(list(range(input_ids.shape[0])), batch_size=1)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        model.eval()
        predict(trainer, module, loader)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    if trainer.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, names in enumerate(per_block):
            save_atomic({n: module.acc[f"{prefix}.{i}.{n}"] for n in names}, grads_path(out_dir, i))
    trainer.strategy.barrier("gradients-written")
    return out_dir


def load_block_grads(
    directory: str | Path, index: int, names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Block ``index``'s gradient aggregates: linear name within the block -> fp32 tensor (CPU);
    only those of ``names`` that the file holds when ``names`` is given (the rest is not read)."""
    path = grads_path(directory, index)
    if not path.is_file():
        raise TopiaryError(
            f"gradients: {path} does not exist; run the gradient step (compute_gradients) "
            "for this model and calibration set first"
        )
    with safe_open(str(path), framework="pt") as f:
        stored = list(f.keys())  # noqa: SIM118 - safe_open has no iterator
        return {k: f.get_tensor(k) for k in (stored if names is None else [n for n in names if n in stored])}


def expert_gradients(
    directory: str | Path | None, index: int, name: str, needs: set, device: torch.device | str
) -> torch.Tensor | None:
    """Fused expert tensor ``name``'s gradient aggregates in block ``index`` (fp32, on ``device``,
    checked finite), when ``needs`` has ``grad``; else None."""
    if "grad" not in needs:
        return None
    grad = load_block_grads(directory, index, [name]).get(name)
    if grad is None:
        raise TopiaryError(f"gradients: block {index} has no gradient for {name}")
    grad = grad.to(device, torch.float32)
    check_finite(f"block {index} {name} gradients", grad)
    return grad
