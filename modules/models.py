"""Load a causal LM and its tokenizer: ``embedded``, a local directory, or a Hub id."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from modules.reference import REFERENCE_DIR

# transformers builds a model on the meta device under process-global context managers,
# so two threads loading at once (a sweep on a thread or Dask runner) corrupt each other:
# every model load in the process (load_model, MLflow's log and load) holds this lock.
LOAD_LOCK = threading.Lock()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(name: str) -> str:
    """``embedded`` -> the committed reference checkpoint; anything else as given."""
    if name == "embedded":
        if not (REFERENCE_DIR / "model.safetensors").exists():
            raise FileNotFoundError(
                f"the embedded reference model is missing at {REFERENCE_DIR}; run `make reference-model`"
            )
        return str(REFERENCE_DIR)
    return name


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(name: str, dtype: str = "float32", device: str = "auto"):
    """Return ``(model, tokenizer)`` in eval mode on ``device``.

    A name that is neither ``embedded`` nor an existing directory is taken as a Hub id;
    offline (HF_HUB_OFFLINE) that fails with one clear error.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load drowns the CLI's own output

    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    path = resolve_model(name)
    if not Path(path).is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"model: {name!r} is not a local directory and HF_HUB_OFFLINE=1 forbids the Hub; "
            "give a local path or `embedded`"
        )
    try:
        with LOAD_LOCK:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as err:
        raise FileNotFoundError(f"model: cannot load {name!r}: {err}") from None
    return model.to(pick_device(device)).eval(), tok
