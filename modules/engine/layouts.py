"""Checkpoint layouts: which on-disk tensors make each model tensor, by transformers' own rules.

transformers loads some checkpoints through conversion rules (``conversion_mapping.py``,
``get_model_conversion_mapping``): renamings (Mixtral's ``block_sparse_moe.`` is the model's
``mlp.``) and converters that merge several tensors into one (Mixtral, Qwen3-MoE, OLMoE and
DeepSeek-V3 store one matrix per expert, ``experts.<e>.w1/w3`` or ``gate_proj/up_proj``,
that ``MergeModulelist`` stacks and ``Concatenate`` joins into the model's 3-D
``experts.gate_up_proj``). :class:`Layout` applies those same rules to the checkpoint's
names once (no tensor read), then builds one model tensor at a time from its sources
(:meth:`Layout.build`: the converter's own operations, in transformers' order of the keys),
and writes back in the layout read (:meth:`Layout.revert`: transformers' reverse
operations, only when the checkpoint needed the forward ones). A converter that splits one
tensor into several is not used: those model tensors stay unreadable (:attr:`Layout.lacking`).

Quantized checkpoints: FP8 with 128x128 block scales (DeepSeek-V3, Kimi-K2) is read one
tensor at a time, dequantized to the compute dtype (:func:`dequantize_fp8`), and written in
that dtype; any other (MXFP4...) is refused (:func:`quantization`): its tensors are not the
values they hold.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modules.engine.names import checkpoint_candidates, tied_partners
from modules.errors import TopiaryError

QUANTIZED_TENSOR = re.compile(r"(_scale_inv|_blocks|_scales|\.weight_scale|\.input_scale)$")
QUANT_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F4")
FORMATS = {"fp8": "FP8 block-scaled", "mxfp4": "MXFP4"}


def _rules(model: nn.Module) -> tuple[list, list]:
    """transformers' ``(renamings, converters)`` for ``model`` (none with an older transformers)."""
    try:  # transformers' loading internals: 1.3 s at first import, and absent from older versions
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    mapping = get_model_conversion_mapping(model, add_legacy=False)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    return renamings, [m for m in mapping if isinstance(m, WeightConverter)]


def _order(key: str):
    from transformers.core_model_loading import dot_natural_key  # heavy, version-dependent: see _rules

    return dot_natural_key(key)


@dataclass
class Merge:
    """One model tensor made of several checkpoint tensors: a converter and its sources
    (``{source pattern: checkpoint keys}``, each list in transformers' order: natural, expert
    2 before expert 10)."""

    converter: object
    keys: dict[str, list[str]] = field(default_factory=dict)


class Layout:
    """How the checkpoint tensor ``names`` give ``model``'s tensors (a meta-device skeleton).

    Attributes:
        renamed: model name -> the checkpoint key a renaming rule reads it from.
        merged: model name -> the :class:`Merge` that builds it.
        lacking: model tensors that no name, renaming or usable converter provides.
        unread: checkpoint keys that no model tensor reads.
        converted: whether any model tensor needs a rule (then the output is written back
            through the reverse rules, in the checkpoint's layout).
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        names = set(names)
        state = model.state_dict()
        prefix = getattr(model, "base_model_prefix", "") or ""
        partners = tied_partners(model)
        found = {k: [c for c in checkpoint_candidates(k, prefix, partners) if c in names] for k in state}
        direct = {c for cands in found.values() for c in cands[:1]}
        self.renamed: dict[str, str] = {}
        self.merged: dict[str, Merge] = {}
        named = {c for k in state for c in checkpoint_candidates(k, prefix, partners)}
        rest = sorted(names - named, key=_order)
        if rest:
            self._apply_rules(rest, state, {k for k in state if found[k]}, prefix)
        read = direct | set(self.renamed.values())
        read |= {k for m in self.merged.values() for keys in m.keys.values() for k in keys}
        self.lacking = [k for k in state if not found[k] and k not in self.renamed and k not in self.merged]
        self.unread = sorted(names - read)
        self.converted = bool(self.renamed or self.merged)

    def _apply_rules(self, keys: list[str], state: dict, present: set[str], prefix: str) -> None:
        """Each checkpoint key of ``keys`` (none of them a model name) renamed as transformers
        renames it when it loads; model names ``present`` on disk are read as they are."""
        from transformers.core_model_loading import rename_source_key  # see _rules

        renamings, converters = _rules(self.model)
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        for key in keys:
            new, pattern = rename_source_key(key, renamings, converters, prefix or None, state)
            if new not in state or new in present:
                continue
            if pattern is None:
                self.renamed.setdefault(new, key)
            elif len(by_pattern[pattern].target_patterns) == 1:  # many-to-one only
                merge = self.merged.setdefault(new, Merge(by_pattern[pattern]))
                merge.keys.setdefault(pattern, []).append(key)

    def build(
        self, name: str, read: Callable[[str], torch.Tensor], rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Model tensor ``name`` of :attr:`merged`, from its checkpoint tensors (``read(key)``),
        through its converter's operations; with ``rows = (a, b)`` only experts ``a`` to ``b - 1``
        (the converters stack one checkpoint tensor per expert, in the experts' order)."""
        merge = self.merged[name]
        conv = deepcopy(merge.converter)
        a, b = rows or (None, None)
        tensors: dict = {
            p: [read(k) for k in merge.keys[p][a:b]] for p in conv.source_patterns if p in merge.keys
        }
        for op in conv.operations:
            tensors = op.convert(
                tensors,
                source_patterns=conv.source_patterns,
                target_patterns=conv.target_patterns,
                full_layer_name=name,
                model=self.model,
                config=self.model.config,
            )
        (value,) = tensors.values()
        return value[0] if isinstance(value, list) else value

    def revert(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (model names) under the checkpoint's names and layout: transformers' reverse
        rules when the checkpoint needed the forward ones, else as they are."""
        if not self.converted:
            return tensors
        from transformers.core_model_loading import revert_weight_conversion  # see _rules

        return revert_weight_conversion(self.model, tensors)


def quantization(model_dir: str | Path, headers: Iterable[tuple[str, str]] = ()) -> tuple[int, int] | None:
    """What a checkpoint's quantization lets the streamed reader do: None for plain weights, the
    block of an FP8 block-scaled one (``config.json``'s ``quantization_config.quant_method``
    ``fp8``, each FP8 weight beside its ``weight_scale_inv``: DeepSeek-V3, Kimi-K2), read through
    :func:`dequantize_fp8`. ``headers`` are ``(tensor name, safetensors dtype)`` pairs (a dtype may
    be ``""`` where unknown).

    Raises:
        TopiaryError: any other quantization (MXFP4, static activation scales, an FP8 tensor
            without its scales...), in one line naming the format.
    """
    config_file = Path(model_dir) / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    headers = list(headers)
    names = {n for n, _ in headers}
    if method == "fp8":
        block = tuple(quant.get("weight_block_size") or (128, 128))

        def odd_fp8(n: str, d: str) -> bool:  # an FP8 weight lacking its scales, or another scheme's tensor
            if d in QUANT_DTYPES:
                return d == "F4" or f"{n}_scale_inv" not in names
            return not n.endswith("_scale_inv") and bool(QUANTIZED_TENSOR.search(n))

        odd = next(((n, d) for n, d in headers if odd_fp8(n, d)), None)
        if odd is None and len(block) == 2:
            return block
    else:
        odd = next(((n, d) for n, d in headers if d in QUANT_DTYPES or QUANTIZED_TENSOR.search(n)), None)
        if method is None and odd is None:
            return None
    what = FORMATS.get(str(method), f"{method}-quantized" if method else "quantized")
    seen = f"; tensor {odd[0]} is {odd[1] or 'a quantization tensor'}" if odd else ""
    said = f" (config.json quantization_config.quant_method {method!r}{seen})" if method else f" ({seen[2:]})"
    why = "dequantize it first"
    if method == "fp8":
        why = "only FP8 weights beside their weight_scale_inv block scales are dequantized"
    raise TopiaryError(
        f"model: {model_dir} holds {what} weights{said}: Topiary reads plain floating-point checkpoints "
        f"(their tensors are not the values they hold); {why}"
    )


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The float32 values of an FP8 ``weight`` ``(rows, cols)``: each ``block`` of it times its entry of
    ``scale_inv`` ``(ceil(rows / block[0]), ceil(cols / block[1]))`` (the last blocks may be partial,
    as DeepSeek-V3's 576-row ``kv_a_proj_with_mqa``)."""
    rows, cols = weight.shape[-2:]
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape[-2:]) != grid:
        raise TopiaryError(
            f"model: FP8 weight {tuple(weight.shape)} with {block[0]}x{block[1]} blocks needs scales "
            f"{grid}, its weight_scale_inv is {tuple(scale_inv.shape)}"
        )
    scale = scale_inv.float().repeat_interleave(block[0], -2)[..., :rows, :]
    return weight.float() * scale.repeat_interleave(block[1], -1)[..., :cols]
