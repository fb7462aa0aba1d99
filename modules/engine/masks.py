"""Keep-mask files: written per block by the engine, read back by any method that takes a mask.

A mask file is a ``.safetensors`` file (or a folder of them, ``block_{i:04d}.safetensors``)
of boolean keep-masks keyed by full parameter name (``model.layers.3.mlp.up_proj.weight``); each
expert's matrix of a fused experts tensor by that tensor's name and the expert's number, as the
tensor stores it (``model.layers.3.mlp.experts.down_proj.7``: ``down_proj[7]``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modules.errors import TopiaryError
from modules.process import building


def blocks_path(directory: str | Path, index: int) -> Path:
    """Per-block file name shared by gradients and masks: ``block_{i:04d}.safetensors``."""
    return Path(directory) / f"block_{index:04d}.safetensors"


class MaskFile:
    """Keep-masks by full parameter name, from one safetensors file or a folder of them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors")) if self.path.is_dir() else [self.path]
        if not self.path.exists() or not files:
            raise TopiaryError(f"{self.path} does not exist or holds no .safetensors file", key="mask_file")
        self.index: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                self.index.update(dict.fromkeys(sf.keys(), f))

    def get(self, key: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The mask of parameter ``key`` as a bool tensor of ``shape`` on ``device``."""
        if key not in self.index:
            raise TopiaryError(f"{self.path} has no mask for {key}", key="mask_file")
        with safe_open(str(self.index[key]), framework="pt") as sf:
            mask = sf.get_tensor(key)
        if tuple(mask.shape) != tuple(shape):
            raise TopiaryError(
                f"mask {key} has shape {tuple(mask.shape)}, the weight has {tuple(shape)}", key="mask_file"
            )
        return mask.to(device=device, dtype=torch.bool)


def save_block_masks(directory: str | Path, index: int, masks: dict[str, torch.Tensor]) -> Path:
    """Write one block's keep-masks (full parameter name -> bool) atomically; returns the path."""
    path = blocks_path(directory, index)
    with building(path) as tmp:
        save_file({k: v.contiguous() for k, v in masks.items()}, str(tmp))
    return path
