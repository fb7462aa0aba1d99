"""Streamed I/O: prune or evaluate a causal LM one decoder block at a time, never loading it whole.

1. :func:`skeleton` builds the architecture from ``config.json`` on the meta device (no
   memory, no weights), in the checkpoint's dtype or the one asked for.
2. :class:`CheckpointReader` reads tensors one at a time from the checkpoint's safetensors
   shards (plain reads at the offsets of their headers): :meth:`CheckpointReader.materialize` puts
   exactly the parameters and buffers of one submodule on a device (a tied weight, such as
   an LM head tied to the embeddings, is read under its partner's name; non-persistent
   buffers such as rotary ``inv_freq`` are recomputed by the model's own ``_init_weights``,
   as ``from_pretrained`` does), :meth:`CheckpointReader.release` puts them back on the meta
   device. The reader counts the bytes it holds (``peak_bytes``: at most one block and the
   modules outside the blocks that a step needs).
3. :class:`ShardWriter` writes each finished block at once to its own shard,
   ``model-{k:05d}-of-{n:05d}.safetensors`` (``n`` = blocks + 1, the last shard holding the
   tensors outside the blocks), each to a temporary name renamed into place, then
   ``model.safetensors.index.json`` from the shards' headers. The names, dtypes and values
   are those ``save_pretrained`` writes for the same model (tied copies left out, weight
   conversions reverted), so ``from_pretrained`` loads the result.
4. :class:`ActivationStore` holds the calibration hidden states between blocks in memory or
   in memory-mapped files (``auto``: by their size against free memory), two buffers at most:
   the current block's inputs and its outputs (the next block's inputs).
5. The streamed prune itself is :mod:`modules.engine.loop` over the stages of
   :mod:`modules.engine.stages` and :mod:`modules.engine.weight_stages` (one stage per task
   of the per-block DAG), built on these pieces.
6. :func:`modules.evaluation.perplexity.perplexity_streamed` evaluates with these parts
   (evaluation may import the engine, not the other way round).

Checkpoints whose tensor names need transformers' load-time conversions (per-expert
matrices fused into 3-D experts at load: Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3) are read
through transformers' own rules, one model tensor at a time, and written back in the layout
they came in (:mod:`modules.engine.layouts`). FP8 block-scaled checkpoints are dequantized
as they are read and written unquantized; other quantized checkpoints are refused.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import psutil
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from modules.engine.blocks import BlockArgs, capture_inputs
from modules.engine.expert_groups import expert_params
from modules.engine.layouts import Layout, dequantize_fp8, quantization
from modules.engine.models import LOAD_LOCK, load_tokenizer, quiet_transformers
from modules.engine.names import checkpoint_candidates, tied_partners
from modules.errors import TopiaryError
from modules.process import building, owner_id, pause_point, write_file
from modules.pruning.sparsity import NonFiniteError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
CAPTURE_CHUNK = 8  # windows per capture call: bounds the embeddings' hidden states in flight
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


# 1. The skeleton ---------------------------------------------------------------------------


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype a checkpoint is stored in: ``config.json``'s ``dtype`` (or ``torch_dtype``),
    else the first floating tensor's in the safetensors headers (FP8 ones left out), else float32."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    for file in _weight_files(model_dir):
        for info in _header(file)[0].values():
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is not None and dtype.is_floating_point and dtype.itemsize > 1:  # not FP8
                return dtype
    return torch.float32


def skeleton(model_dir: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The causal LM of ``model_dir``'s ``config.json`` on the meta device, in eval mode.

    Args:
        model_dir: A local Hugging Face model folder.
        dtype: The dtype of its floating parameters; default the checkpoint's
            (:func:`checkpoint_dtype`). ``from_pretrained(dtype=...)`` builds the same.

    Returns:
        The model, every parameter and buffer on the meta device; tied weights are one
        parameter, as after ``from_pretrained``. Its ``generation_config`` is the folder's
        ``generation_config.json`` when there is one (what ``from_pretrained`` reads).
    """
    model_dir = Path(model_dir)
    dtype = dtype or checkpoint_dtype(model_dir)
    with LOAD_LOCK, quiet_transformers():
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if model.can_generate():
            try:
                model.generation_config = GenerationConfig.from_pretrained(model_dir, _from_auto=True)
            except OSError:
                model.generation_config = GenerationConfig.from_pretrained(
                    model_dir, config_file_name="config.json", _from_auto=True, _from_model_config=True
                )
    return model.eval()


def saved_names(model: nn.Module) -> list[str]:
    """The tensors ``save_pretrained`` writes for ``model``: its state dict less the tied copies.

    Names are the model's own; a shard is written in the checkpoint's layout
    (:meth:`CheckpointReader.written`). Call it on a fresh :func:`skeleton`: ties are
    read from shared parameter objects, which
    :meth:`CheckpointReader.materialize` and :meth:`CheckpointReader.release` do not keep.
    """
    from transformers.modeling_utils import remove_tied_weights_from_state_dict  # 1.6 s at first import

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    return list(remove_tied_weights_from_state_dict(state, model))


# 2. Reading the checkpoint -----------------------------------------------------------------


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TopiaryError(f"{index} is not a safetensors index (no weight_map)", key="model") from None
        return [model_dir / n for n in names]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    raise TopiaryError(
        f"{model_dir} has no safetensors weights (model.safetensors or {INDEX_NAME}); "
        "streaming reads only safetensors checkpoints",
        key="model",
    )


def _header(file: Path) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensor entries (dtype, shape, data_offsets) and where its data starts."""
    header, _, start = read_header(file)
    return header, start


def read_header(file: Path) -> tuple[dict[str, dict], dict, int]:
    """A safetensors file's tensor entries, its ``__metadata__`` and where its data starts."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise TopiaryError(
            f"{file} cannot be read (truncated or not safetensors): {err}", key="model"
        ) from None
    if not isinstance(header, dict):
        raise TopiaryError(f"{file} is not safetensors (its header is no JSON object)", key="model")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + size


def read_tensor(
    f: BinaryIO, start: int, info: dict, key: str, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Tensor ``key`` (header entry ``info``) from the open file ``f`` (data at ``start``), read
    into memory of its own on the host: no memory map (a mapped file's pages count in the
    process's memory until it is closed). ``rows = (a, b)``: only its rows ``a`` to ``b - 1``
    along the first dimension (contiguous on disk)."""
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise TopiaryError(
            f"tensor {key} in {f.name} has dtype {info['dtype']}, which Topiary cannot read", key="model"
        )
    begin, end = info["data_offsets"]
    shape = list(info["shape"])
    if rows is not None:
        row = (end - begin) // shape[0]
        begin, end, shape[0] = begin + rows[0] * row, begin + rows[1] * row, rows[1] - rows[0]
    raw = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(start + begin)
    if f.readinto(raw.numpy()) != end - begin:
        raise TopiaryError(f"{f.name} is truncated (tensor {key} ends past the end of the file)", key="model")
    return raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(shape)


class NonFiniteCheckpoint(NonFiniteError):
    """A checkpoint tensor is not finite as stored, or in the dtype it is used in: no run of that
    checkpoint can finish, so its resume state is worth nothing."""


def check_read(key: str, file: Path, stored: torch.Tensor, cast: torch.Tensor) -> None:
    """A checkpoint tensor is finite as stored (``stored``) and in the dtype it is used in (``cast``).

    One sum of ``cast`` finds any NaN or Inf (they survive a sum; a finite sum of finite
    weights, bar an overflow of the sum itself, which the exact count below then clears):
    about a tenth of the cost of ``isfinite`` (``benchmarks/bench_read_check.py``).

    Raises:
        NonFiniteCheckpoint: naming the tensor and its file; the hint at fp16 overflow comes
            only where it applies: an fp16 checkpoint, or a cast to fp16 that overflows.
    """
    if not cast.is_floating_point() or math.isfinite(float(cast.sum())):
        return
    if not bool(torch.isfinite(stored).all()):
        nan, inf = int(torch.isnan(stored).sum()), int(torch.isinf(stored).sum())
        hint = (
            " (an fp16 checkpoint that overflowed when it was made?)" if stored.dtype == torch.float16 else ""
        )
        raise NonFiniteCheckpoint(
            f"tensor {key} in {file} holds {nan} NaN and {inf} Inf among {stored.numel()} values as "
            f"stored ({str(stored.dtype).removeprefix('torch.')}){hint}; a model with non-finite weights "
            "cannot be pruned or evaluated",
            key="model",
        )
    if not bool(torch.isfinite(cast).all()):
        top = float(stored.abs().max())
        raise NonFiniteCheckpoint(
            f"tensor {key} in {file} overflows {str(cast.dtype).removeprefix('torch.')} "
            f"(largest |value| {top:.3g}); load it in bfloat16 or float32 (model.dtype, --dtype)",
            key="model",
        )


def _direct_tensors(module: nn.Module) -> Iterator[tuple[str, str, torch.Tensor, bool]]:
    """``(kind, name, tensor, persistent)`` of the module's own parameters and buffers."""
    for name, p in module._parameters.items():
        if p is not None:
            yield "param", name, p, True
    for name, b in module._buffers.items():
        if b is not None:
            yield "buffer", name, b, name not in module._non_persistent_buffers_set


class CheckpointReader:
    """Tensors of a safetensors checkpoint, read one at a time onto a device.

    Each tensor is read with plain file reads into memory of its own (no memory map): a
    map would leave every page read so far resident in the process (and tensors read
    twice would share, copy-on-write, what the first one's pruning wrote), so memory would
    grow with the blocks read instead of staying at one block.

    Args:
        model_dir: The model folder (``model.safetensors`` or ``model.safetensors.index.json``
            with its shards).
        model: Its :func:`skeleton`: names, shapes, dtypes and ties of the tensors to read,
            and the ``_init_weights`` that recomputes non-persistent buffers.
        files: The safetensors files to read instead of the folder's (a block's output shard).

    A model tensor that the checkpoint holds under another name, or as several tensors
    (per-expert matrices), is read through transformers' conversion rules
    (:class:`modules.engine.layouts.Layout`). An FP8 block-scaled checkpoint is dequantized one
    tensor at a time (:attr:`fp8_block`); any other quantized one is refused here.

    Use as a context manager (or call :meth:`close`) to close the shard files.
    """

    def __init__(self, model_dir: str | Path, model: nn.Module, files: list[Path] | None = None):
        self.model_dir = Path(model_dir)
        self.model = model
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for file in files or _weight_files(self.model_dir):
            if not file.is_file():
                raise TopiaryError(f"{file} is missing (named in {INDEX_NAME})", key="model")
            header, start = _header(file)
            self.entries.update({key: (file, info, start) for key, info in header.items()})
        self.fp8_block = quantization(self.model_dir, [(k, e[1]["dtype"]) for k, e in self.entries.items()])
        # FP8 scales are read with their weights
        scales = {k for k in self.entries if self.fp8_block and k.endswith("_scale_inv")}
        self.layout = Layout(model, [k for k in self.entries if k not in scales])
        self._files: dict[Path, BinaryIO] = {}
        self._resident: dict[int, int] = {}
        self.peak_bytes = 0  # the most bytes materialized at once
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.partners = tied_partners(model)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the shard files."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Checkpoint tensor ``key`` as stored (its rows ``a`` to ``b - 1`` with ``rows = (a, b)``),
        in memory of its own on the host."""
        file, info, start = self.entries[key]
        f = self._files.get(file) or self._files.setdefault(file, open(file, "rb"))  # noqa: SIM115
        return read_tensor(f, start, info, key, rows)

    def values(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The values checkpoint tensor ``key`` holds (rows as :meth:`read`): itself, or an FP8
        weight times its block scales (float32; read whole, then sliced)."""
        if self.fp8_block and self.entries[key][1]["dtype"].startswith("F8"):
            whole = dequantize_fp8(self.read(key), self.read(f"{key}_scale_inv"), self.fp8_block)
            return whole if rows is None else whole[rows[0] : rows[1]].clone()
        return self.read(key, rows)

    def source(self, name: str) -> str:
        """The checkpoint's name for model tensor ``name``: itself, with or without the base-model
        prefix, or (a tied weight) its partner's.

        Raises:
            TopiaryError: the checkpoint holds none of them.
        """
        for key in checkpoint_candidates(name, self.prefix, self.partners):
            if key in self.entries:
                return key
        if name in self.layout.renamed:
            return self.layout.renamed[name]
        raise TopiaryError(
            f"{self.model_dir} has no tensor {name} (nor a tied partner, nor tensors that "
            "transformers' conversion rules make it from)",
            key="model",
        )

    def tensor(
        self,
        name: str,
        like: torch.Tensor,
        device: torch.device | str = "cpu",
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Model tensor ``name`` read from the checkpoint (or built from its per-expert tensors),
        cast to ``like``'s dtype, on ``device``; with ``rows = (a, b)`` only its rows ``a`` to
        ``b - 1`` (experts ``a`` to ``b - 1`` of a fused experts tensor), read alone.

        Checked as read, before anything is computed from it (:func:`check_read`).
        """
        merge = self.layout.merged.get(name)
        if merge is not None:
            first = next(iter(merge.keys.values()))[0]
            key, file = f"{name} (from {sum(map(len, merge.keys.values()))} tensors)", self.entries[first][0]
            value = self.layout.build(name, self.values, rows)
        else:
            key = self.source(name)
            file, value = self.entries[key][0], self.values(key, rows)
        if rows is not None:
            like = like[rows[0] : rows[1]]
        if tuple(value.shape) != tuple(like.shape):
            raise TopiaryError(
                f"tensor {key} in {self.model_dir} has shape {tuple(value.shape)}, "
                f"the model's {name} has {tuple(like.shape)}",
                key="model",
            )
        cast = value.to(device=device, dtype=like.dtype)
        check_read(key, file, value, cast)
        return cast

    @torch.no_grad()
    def materialize(
        self,
        module: nn.Module,
        prefix: str,
        device: torch.device | str,
        *,
        recurse: bool = True,
        skip: frozenset[str] = frozenset(),
    ) -> nn.Module:
        """Put ``module``'s parameters and buffers (its own only, without ``recurse``) on ``device``.

        Persistent ones are read from the checkpoint (:meth:`tensor`); non-persistent
        buffers (rotary ``inv_freq``) are recomputed by the model's ``_init_weights``, as
        ``from_pretrained`` recomputes them. Shared parameters are not re-tied: a tied LM
        head gets its own copy of the embeddings.

        Args:
            module: A submodule of the reader's model (a block, the embeddings, the head).
            prefix: Its qualified name in the model (``model.layers.3``; ``""`` for the model).
            device: Where to put the tensors.
            skip: Parameters (names within ``module``) left on the meta device (fused experts
                read a group at a time, :mod:`modules.engine.expert_groups`).
        """
        subs = module.named_modules() if recurse else [("", module)]
        for sub_name, sub in subs:
            full = ".".join(p for p in (prefix, sub_name) if p)
            computed = [n for kind, n, _, keep in _direct_tensors(sub) if kind == "buffer" and not keep]
            for n in computed:
                sub._buffers[n] = torch.empty_like(sub._buffers[n], device=device)
            if computed:
                self.model._init_weights(sub)
            for kind, n, t, keep in list(_direct_tensors(sub)):
                if not keep or ".".join(p for p in (sub_name, n) if p) in skip:
                    continue
                value = self.tensor(f"{full}.{n}" if full else n, t, device)
                if kind == "param":
                    sub._parameters[n] = nn.Parameter(value, requires_grad=t.requires_grad)
                else:
                    sub._buffers[n] = value
            self._resident[id(sub)] = sum(
                t.numel() * t.element_size() for *_, t, _ in _direct_tensors(sub) if not t.is_meta
            )
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        return module

    @torch.no_grad()
    def release(self, module: nn.Module, *, recurse: bool = True) -> nn.Module:
        """Put the parameters and buffers of ``module`` (its own only, without ``recurse``) back
        on the meta device, which frees their memory."""
        for sub in module.modules() if recurse else [module]:
            self._resident.pop(id(sub), None)
            for kind, n, t, _ in list(_direct_tensors(sub)):
                empty = torch.empty_like(t, device="meta")
                if kind == "param":
                    sub._parameters[n] = nn.Parameter(empty, requires_grad=t.requires_grad)
                else:
                    sub._buffers[n] = empty
        return module

    def written(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (model names) as the output writes them: in the layout of the checkpoint read."""
        return self.layout.revert(tensors)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the tensors materialized now (not yet released)."""
        return sum(self._resident.values())


def outer_modules(model: nn.Module, blocks_prefix: str) -> list[tuple[str, nn.Module]]:
    """The modules outside the decoder blocks that hold tensors of their own (embeddings, norms, head)."""
    inside = f"{blocks_prefix}."
    return [
        (name, m)
        for name, m in model.named_modules()
        if name != blocks_prefix
        and not name.startswith(inside)
        and next(_direct_tensors(m), None) is not None
    ]


# 3. Writing the output ---------------------------------------------------------------------

# safetensors' order of dtypes in a file (its Rust serializer sorts by dtype, descending, then name)
_WRITE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16")
_WRITE_ORDER += ("F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (contiguous, on the host) to ``path``: the bytes ``safetensors.torch.save_file``
    writes, but tensor by tensor, without building the whole file in memory first (``save_file``
    copies every tensor into one buffer: a second copy of a block beside the block).

    Metadata keys are written sorted; safetensors writes them in its hash map's order, which
    changes from process to process, so the bytes are the same for at most one key.
    """
    layout = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    write_safetensors_each(path, layout, tensors.__getitem__, metadata)


def write_safetensors_each(
    path: str | Path,
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """:func:`write_safetensors` of tensors made one at a time: ``layout`` gives each name's dtype
    and shape (the header is written first), ``produce(name)`` the tensor, called in the file's
    order and dropped once written, so only one of them is held at a time. ``produce`` may also
    give a tensor as its pieces along the first dimension, in order (an iterable of tensors; a
    fused experts tensor, a group of experts at a time)."""
    order = sorted(layout, key=lambda k: (_WRITE_ORDER.index(_DTYPE_NAMES[layout[k][0]]), k))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = layout[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            made = produce(name)
            dtype, shape = layout[name][0], tuple(layout[name][1])
            if isinstance(made, torch.Tensor):
                made = [made]
            rows = 0
            for t in made:
                if not t.is_contiguous() or t.device.type != "cpu":
                    raise ValueError(f"write_safetensors: {name} must be a contiguous host tensor")
                whole = (t.dtype, tuple(t.shape)) == (dtype, shape)
                if not whole and (t.dtype, tuple(t.shape[1:])) != (dtype, shape[1:]):
                    shape_is = f"{t.dtype} {tuple(t.shape)}"
                    raise ValueError(
                        f"write_safetensors: {name} is {shape_is}, its header says {layout[name]}"
                    )
                rows += t.shape[0] if t.dim() else 1
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                del t
            del made
            if rows != (shape[0] if shape else 1):
                raise ValueError(f"write_safetensors: {name} got {rows} rows, its header says {shape[0]}")


class ShardWriter:
    """Writes a checkpoint shard by shard, then its ``model.safetensors.index.json``.

    Shard ``k`` (1-based) of ``total`` is ``model-{k:05d}-of-{total:05d}.safetensors``,
    Hugging Face's naming. Every file is written to a temporary name and renamed, so a
    final name never holds a partial file; a shard already written is durable.

    Args:
        out_dir: The folder to write into (created).
        total: The number of shards (known before the first is written).
    """

    def __init__(self, out_dir: str | Path, total: int):
        if total < 1:
            raise ValueError(f"total: {total} shards; need at least 1")
        self.out_dir = Path(out_dir)
        self.total = total
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def shard_name(self, k: int) -> str:
        """The file name of shard ``k`` (1-based)."""
        if not 1 <= k <= self.total:
            raise ValueError(f"shard {k} is not in 1..{self.total}")
        return f"model-{k:05d}-of-{self.total:05d}.safetensors"

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> Path:
        """Write shard ``k`` (1-based) holding ``tensors`` (moved to the host), atomically."""
        path = self.out_dir / self.shard_name(k)
        host = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        with building(path) as tmp:
            write_safetensors(tmp, host, metadata={"format": "pt"})
            pause_point("streaming-shard")  # test hook: written under its temporary name, not renamed
        return path

    def write_each(
        self,
        k: int,
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
    ) -> Path:
        """Write shard ``k`` atomically, its tensors made one at a time (:func:`write_safetensors_each`)."""
        path = self.out_dir / self.shard_name(k)
        with building(path) as tmp:
            write_safetensors_each(tmp, layout, produce, metadata={"format": "pt"})
            pause_point("streaming-shard")  # test hook: written under its temporary name, not renamed
        return path

    def finish(self, total_parameters: int) -> Path:
        """Write the index from the shards' headers (all ``total`` must exist); returns its path.

        Its layout is ``save_pretrained``'s: ``metadata`` (``total_parameters``,
        ``total_size`` in bytes) and the sorted ``weight_map``.
        """
        weight_map: dict[str, str] = {}
        size = 0
        for k in range(1, self.total + 1):
            name = self.shard_name(k)
            if not (self.out_dir / name).is_file():
                raise TopiaryError(f"shard {name} was never written to {self.out_dir}", key="output")
            for key, info in _header(self.out_dir / name)[0].items():
                weight_map[key] = name
                size += info["data_offsets"][1] - info["data_offsets"][0]
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": size},
            "weight_map": weight_map,
        }
        return write_file(self.out_dir / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_model_files(model: nn.Module, model_dir: str | Path, out_dir: str | Path) -> None:
    """Write ``config.json``, ``generation_config.json`` and the tokenizer files as today's
    whole-model path does (``save_pretrained`` of the model and of its tokenizer). The weights are
    written unquantized (an FP8 checkpoint's dequantized): the config names no quantization."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    load_tokenizer(model_dir).save_pretrained(out_dir)


# 4. Activations between blocks -------------------------------------------------------------


def available_memory() -> int:
    """Bytes of memory available to a new allocation."""
    return int(psutil.virtual_memory().available)


class ActivationStore:
    """Two buffers of hidden states ``(n, seq, hidden)``: a block's inputs and its outputs.

    Args:
        shape: The shape of one buffer.
        dtype: Their dtype (the model's).
        kind: ``memory``, ``mmap`` (files in ``dir``) or ``auto``: ``mmap`` when the two
            buffers need more than ``fraction`` of the available memory.
        dir: Where ``mmap`` files go (a private folder is made inside; default ``$TMPDIR``).
        device: Where ``memory`` buffers live (``mmap`` ones are always on the host).
        fraction: ``auto``'s share of the available memory.

    After a block has written :attr:`outputs`, :meth:`swap` makes them the next :attr:`inputs`.
    """

    KINDS = ("memory", "mmap", "auto")

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        kind: str = "auto",
        dir: str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
        fraction: float = 0.5,
    ):
        if kind not in self.KINDS:
            raise TopiaryError(f"activations: {kind!r} is not one of {', '.join(self.KINDS)}")
        self.shape, self.dtype = tuple(shape), dtype
        self.nbytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()
        if kind == "auto":
            kind = "mmap" if 2 * self.nbytes > fraction * available_memory() else "memory"
        self.kind = kind
        self.folder: Path | None = None
        if kind == "memory":
            self._buffers = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(2)]
        else:
            self.folder = Path(tempfile.mkdtemp(prefix=f"topiary-acts-{owner_id()}-", dir=dir))
            self._buffers = [self._mapped(self.folder / f"buffer{i}.bin") for i in range(2)]

    def _mapped(self, path: Path) -> torch.Tensor:
        with open(path, "wb") as f:
            f.truncate(self.nbytes)
        numel = math.prod(self.shape)
        return torch.from_file(str(path), shared=True, size=numel, dtype=self.dtype).view(self.shape)

    @property
    def inputs(self) -> torch.Tensor:
        """The current block's inputs."""
        return self._buffers[0]

    @property
    def outputs(self) -> torch.Tensor:
        """The buffer the current block writes its outputs to."""
        return self._buffers[1]

    def swap(self) -> None:
        """The outputs become the inputs (of the next block); the old inputs are reused as outputs."""
        self._buffers.reverse()

    def close(self) -> None:
        """Drop the buffers and remove the ``mmap`` files."""
        self._buffers = []
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def capture_block_inputs(
    reader: CheckpointReader,
    model: nn.Module,
    prefix: str,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    device: torch.device,
    store_of: Callable[[tuple[int, ...], torch.dtype], ActivationStore],
) -> tuple[ActivationStore, BlockArgs]:
    """The first block's inputs of every window, written into a new store, and its other arguments.

    ``store_of(shape, dtype)`` makes the store; the windows are captured
    :data:`CAPTURE_CHUNK` at a time (:func:`modules.engine.blocks.capture_inputs`).
    Loads the modules outside the blocks except the output embeddings (the head), and the
    first block without its fused experts (its pre-hook stops the forward; it never runs, and a
    whole mixture-of-experts block would set the run's peak), then releases them.
    """
    head = model.get_output_embeddings()
    outer = [(n, m) for n, m in outer_modules(model, prefix) if m is not head]
    store, block_args = None, None
    try:
        for name, module in outer:
            reader.materialize(module, name, device, recurse=False)
        reader.materialize(blocks[0], f"{prefix}.0", device, skip=frozenset(expert_params(blocks[0])))
        for start in range(0, input_ids.shape[0], CAPTURE_CHUNK):
            hidden, args = capture_inputs(model, input_ids[start : start + CAPTURE_CHUNK], blocks, device)
            if store is None:
                store, block_args = store_of((input_ids.shape[0], *hidden.shape[1:]), hidden.dtype), args
            store.inputs[start : start + hidden.shape[0]] = hidden.to(store.inputs.device)
        return store, block_args
    except BaseException:
        if store is not None:  # the caller never gets it: remove its files here
            store.close()
        raise
    finally:
        for _, module in outer:
            reader.release(module, recurse=False)
        reader.release(blocks[0])


# 5. The streamed prune ---------------------------------------------------------------------


def block_tensors(
    reader: CheckpointReader, block: nn.Module, name: str, keep: set[str]
) -> dict[str, torch.Tensor]:
    """The tensors of block ``name`` that the output checkpoint holds (those of ``keep``), in
    the checkpoint's own layout."""
    state = {f"{name}.{k}": v for k, v in block.state_dict().items()}
    return reader.written({k: v for k, v in state.items() if k in keep})
