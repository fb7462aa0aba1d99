"""Load a causal LM and its tokenizer: ``embedded``, a local directory, or a Hub id.

A checkpoint must hold every tensor its architecture needs: transformers fills missing
ones with random values and only warns. :func:`inspect_model` finds that before any
weight is read (the checkpoint's tensor names from the safetensors headers against a
meta-device skeleton built from ``config.json``), and :func:`load_model` enforces it
again at load time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# Imported here, not lazily in the functions: transformers resolves these names on first
# use, which is not thread-safe, and a sweep's threads load models at the same time. Import
# of this module is serialised by Python's import lock.
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from modules.engine.blocks import EXPERTS, block_experts, block_linears, find_blocks, unsupported_matrices
from modules.engine.layouts import Layout, quantization
from modules.engine.names import ModelInfo, check_device, resolve_model
from modules.errors import TopiaryError
from modules.pruning.sparsity import NonFiniteError

# transformers builds a model on the meta device under process-global context managers,
# so two threads loading at once (a sweep on a thread or Dask runner) corrupt each other:
# every model load in the process (load_model, MLflow's log and load) holds this lock.
LOAD_LOCK = threading.Lock()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
SHOWN = 5  # missing tensors named in a message; the rest are counted


def _offline_hub(name: str) -> str:
    """Why the ``model`` ``name`` cannot be loaded offline: it is no local folder and HF_HUB_OFFLINE=1."""
    return (
        f"{name!r} is not a local directory and HF_HUB_OFFLINE=1 forbids the Hub; "
        "give a local path or `embedded`"
    )


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off (building a skeleton warns about things that do not apply)."""
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def checkpoint_dtypes(path: str | Path) -> dict[str, str] | None:
    """Tensor names of the checkpoint in ``path``, each with its safetensors dtype (``F32``,
    ``F8_E4M3``...; ``""`` where unknown), from the safetensors headers only.

    Reads ``model.safetensors.index.json`` and every shard's header (or
    ``model.safetensors``'s); a ``.bin``-only checkpoint gives its index's names, or None.

    Raises:
        TopiaryError: no weight file, a shard the index names is missing, or a file whose
            header cannot be read (truncated or not safetensors).
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TopiaryError(f"{index} is not a safetensors index (no weight_map)", key="model") from None
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        bin_index = path / "pytorch_model.bin.index.json"
        if bin_index.is_file():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return dict.fromkeys(json.loads(bin_index.read_text())["weight_map"], "")
            return None
        if (path / "pytorch_model.bin").is_file():
            return None
        raise TopiaryError(
            f"{path} has no weights (model.safetensors, its index, or pytorch_model.bin)", key="model"
        )
    names: dict[str, str] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise TopiaryError(f"{file} is missing (named in {index.name})", key="model")
        try:
            with safe_open(str(file), framework="pt") as sf:
                names.update({k: sf.get_slice(k).get_dtype() for k in sf.keys()})
        except (SafetensorError, OSError) as err:
            raise TopiaryError(
                f"{file} cannot be read (truncated or not safetensors): {err}", key="model"
            ) from None
    return names


def missing_tensors(skeleton: torch.nn.Module, names: set[str]) -> list[str]:
    """The tensors ``skeleton`` needs that checkpoint tensor ``names`` do not provide.

    Checkpoint names are mapped the way transformers maps them when it loads (its
    renaming and conversion rules, the base-model prefix added or stripped); a tied
    weight is there when its partner is; keys the architecture ignores when missing are
    left out.
    """
    expected = skeleton.state_dict()
    prefix = getattr(skeleton, "base_model_prefix", None) or None
    try:  # transformers' loading internals: 1.3 s at first import, and absent from older versions
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(skeleton)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]

        def rename(key: str) -> str:
            new = rename_source_key(key, renamings, converters, prefix, expected)[0]
            if new not in expected and key in expected:
                new = rename_source_key(key, [], [], prefix, expected)[0]
            return new
    except (ImportError, AttributeError, TypeError):  # another transformers: prefix rule only

        def rename(key: str) -> str:
            if key in expected or not prefix:
                return key
            if f"{prefix}.{key}" in expected:
                return f"{prefix}.{key}"
            return key.removeprefix(f"{prefix}.")

    present = {rename(k) for k in names}
    tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    partners: dict[str, set[str]] = {}
    for target, source in tied.items():
        partners.setdefault(target, set()).add(source)
        partners.setdefault(source, set()).add(target)
    ignore = getattr(skeleton, "_keys_to_ignore_on_load_missing", None) or []
    ignored = re.compile("|".join(f"({p})" for p in ignore)) if ignore else None
    return [
        key
        for key in expected
        if key not in present
        and not (partners.get(key, set()) & present)
        and not (ignored and ignored.search(key))
    ]


def _shown(names: list[str]) -> str:
    """The first :data:`SHOWN` names, and how many more."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def inspect_model(name: str) -> ModelInfo | None:
    """Check a model before loading it, from ``config.json`` and the weight files' headers.

    Builds the architecture on the meta device (no memory, no weights), then checks that
    the checkpoint holds every tensor it needs (:func:`missing_tensors`) and that it has
    decoder blocks; returns their linears' input widths and the context length.

    Returns:
        The :class:`ModelInfo`, or None for a Hub id (not checked before the download).

    Raises:
        TopiaryError: a missing folder or ``config.json``, an unreadable config or weight
            file, an architecture that is not a causal LM, missing tensors, or no decoder blocks.
    """
    path = Path(resolve_model(name))
    if not path.is_dir():
        if path.exists():
            raise TopiaryError(f"{name} is a file, not a model folder", key="model")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise TopiaryError(_offline_hub(name), key="model")
        return None
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TopiaryError(
            f"{name} is a folder without config.json (not a Hugging Face model folder)", key="model"
        )
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
        with quiet_transformers():
            config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError, KeyError) as err:
        why = " ".join(str(err).split())[:300]
        raise TopiaryError(f"{config_file} cannot be read: {why}", key="model") from None
    dtypes = checkpoint_dtypes(path)
    names = None if dtypes is None else set(dtypes)
    if quantization(path, (dtypes or {}).items()) and names:  # refused before any skeleton is built
        names = {n for n in names if not n.endswith("_scale_inv")}  # FP8: read beside their weights
    try:
        with LOAD_LOCK, quiet_transformers(), torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as err:
        why = " ".join(str(err).split())[:300]
        raise TopiaryError(
            f"{name} ({type(config).__name__}) is not a causal LM that transformers builds: {why}",
            key="model",
        ) from None
    arch = type(skeleton).__name__
    if names is not None:
        missing = missing_tensors(skeleton, names)
        if missing:
            raise TopiaryError(
                f"{name} lacks {len(missing)} tensor(s) that {arch} needs: {_shown(missing)} "
                "(transformers would fill them with random values); give a complete checkpoint",
                key="model",
            )
    prefix, blocks = find_blocks(skeleton)
    widths = {
        f"{prefix}.{i}.{lin_name}": lin.in_features
        for i, block in enumerate(blocks)
        for lin_name, lin in block_linears(block).items()
    }
    for i, block in enumerate(blocks):  # an expert's input width: its matrix's second axis, (out, in)
        for pname, transposed in block_experts(block).items():
            widths[f"{prefix}.{i}.{pname}"] = block.get_parameter(pname).shape[1 if transposed else 2]
    contexts = [getattr(config, k, None) for k in CONTEXT_KEYS]
    context = next((c for c in contexts if isinstance(c, int)), None)
    layout = Layout(skeleton, names) if names is not None else None
    return ModelInfo(
        path=path,
        architecture=arch,
        context=context,
        widths=widths,
        tensors=names,
        unsupported=unsupported_matrices(prefix, blocks),
        converted=layout.lacking if layout else [],
        unread=layout.unread if layout else [],
        experts=unsupported_matrices(prefix, blocks, (EXPERTS,)),
    )


def load_tokenizer(path: str | Path):
    """The tokenizer of the model at ``path`` (a folder or a Hub id), as transformers loads it.

    Raises:
        TopiaryError: no tokenizer loads from there (no tokenizer files, or ones that need
            a package that is not installed), in one line naming the folder.
    """
    try:
        with LOAD_LOCK:
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as err:
        why = " ".join(str(err).split())[:160]
        raise TopiaryError(
            f"{path} has no tokenizer that transformers can load ({type(err).__name__}: {why}); "
            "copy the model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it",
            key="model",
        ) from None


def check_finite_weights(model: torch.nn.Module) -> None:
    """Raise a :class:`TopiaryError` naming the first parameter or buffer that holds NaN or Inf."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            raise NonFiniteError(
                f"tensor {name} holds {nan} NaN and {inf} Inf among {tensor.numel()} values; "
                "a model with non-finite weights cannot be evaluated",
                key="model",
            )


def check_finite_metric(name: str, value: float) -> float:
    """``value`` if finite, else a :class:`TopiaryError` naming the metric."""
    if not math.isfinite(value):
        raise NonFiniteError(f"{name}: {value} is not finite (the model's outputs overflowed or hold NaN)")
    return value


def load_model(name: str, dtype: str = "float32", device: str = "auto"):
    """Return ``(model, tokenizer)`` in eval mode on ``device``.

    A name that is neither ``embedded`` nor an existing directory is taken as a Hub id;
    offline (HF_HUB_OFFLINE) that fails with one clear error.
    """
    hf_logging.disable_progress_bar()  # a bar per load drowns the CLI's own output

    if dtype not in DTYPES:
        raise TopiaryError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    device = check_device(device)
    path = resolve_model(name)
    if not Path(path).is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(_offline_hub(name))
    try:
        tok = load_tokenizer(path)
        with LOAD_LOCK:
            with quiet_transformers():  # its load report; missing tensors are an error below
                model, info = AutoModelForCausalLM.from_pretrained(
                    path, dtype=DTYPES[dtype], output_loading_info=True
                )
    except OSError as err:
        raise FileNotFoundError(f"cannot load {name!r}: {err}", key="model") from None
    except SafetensorError as err:
        raise TopiaryError(f"{name}: a weight file cannot be read (truncated?): {err}", key="model") from None
    bad = sorted(info.get("missing_keys") or ()) + sorted(str(k) for k in info.get("mismatched_keys") or ())
    if bad:
        raise TopiaryError(
            f"{name} lacks {len(bad)} tensor(s) that {type(model).__name__} needs (missing or of "
            f"another shape): {_shown(bad)}; give a complete checkpoint",
            key="model",
        )
    return model.to(device).eval(), tok
