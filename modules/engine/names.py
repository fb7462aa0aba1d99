"""Model names, folders and devices, resolved without importing transformers.

What a run needs before (or instead of) building a model: which folder a name means, which
device a name means, and what a check of a folder found (:class:`ModelInfo`). Importing
this module costs torch, not transformers (about 7 s more here), so the checks and
fingerprints of a warm run stay light; :mod:`modules.engine.models` builds and loads models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from modules.errors import TopiaryError

# The committed reference checkpoint (``embedded``; built by ``modules.reference.train``, which
# imports Lightning: kept out of this module so that checks before a run stay fast).
REFERENCE_DIR = Path(__file__).parents[1] / "assets" / "reference"


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hub id (``org/model``).

    Paths: starting with ``.``, ``/`` or ``~``, with a backslash or two slashes, or whose
    first component is an existing folder here.
    """
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or ("/" in name and Path(name.split("/")[0]).is_dir())
    )


def resolve_model(name: str) -> str:
    """``embedded`` -> the committed reference checkpoint; anything else as given.

    Raises:
        TopiaryError: ``name`` is meant as a local path (:func:`looks_like_path`) that does not exist.
    """
    if name == "embedded":
        if not (REFERENCE_DIR / "model.safetensors").exists():
            raise FileNotFoundError(
                f"the embedded reference model is missing at {REFERENCE_DIR}; run `make reference-model`"
            )
        return str(REFERENCE_DIR)
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise TopiaryError(f"{name} does not exist (no such local folder)", key="model")
    return str(Path(name).expanduser()) if name.startswith("~") else name


def check_device(device: str = "auto") -> torch.device:
    """The torch device of ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``), if present.

    Raises:
        TopiaryError: an unknown device name, or a device this machine does not have.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise TopiaryError(
            f"{device!r} is not a device (expected auto, cpu, cuda, cuda:N or mps)", key="device"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TopiaryError(
                f"{device!r} asked for, but this machine has no CUDA GPU; use device cpu (or auto)",
                key="device",
            )
        if dev.index is not None and dev.index >= count:
            raise TopiaryError(
                f"{device!r} asked for, but this machine has {count} CUDA GPU(s)", key="device"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise TopiaryError(
            f"{device!r} asked for, but MPS is not available here; use device cpu (or auto)", key="device"
        )
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise TopiaryError(
            f"{device!r} is not supported (expected auto, cpu, cuda, cuda:N or mps)", key="device"
        )
    return dev


@dataclass
class ModelInfo:
    """What a local model folder says about itself, read without loading a weight.

    Attributes:
        path: the folder.
        architecture: the causal-LM class transformers builds for it.
        context: the context length from ``config.json`` (None if it names none).
        widths: input width of every linear in the decoder blocks, by qualified name.
        tensors: the tensor names in the checkpoint (None when only ``.bin`` files hold them).
        unsupported: the blocks' weight matrices that pruning would leave dense without
            meaning to (:func:`modules.engine.blocks.unsupported_matrices`).
        experts: the blocks' fused expert tensors (each expert's matrix is pruned).
        converted: the model's tensors that the checkpoint holds only in a form the streamed
            reader cannot convert (:attr:`modules.engine.layouts.Layout.lacking`: a
            transformers rule that splits one tensor into several).
        unread: the checkpoint's tensors that no model tensor reads, by name or by rule.
    """

    path: Path
    architecture: str
    context: int | None
    widths: dict[str, int] = field(default_factory=dict)
    tensors: set[str] | None = None
    unsupported: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    unread: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["tensors"] = None if self.tensors is None else sorted(self.tensors)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelInfo:
        tensors = None if d["tensors"] is None else set(d["tensors"])
        lists = [list(d[k]) for k in ("unsupported", "converted", "unread", "experts")]  # KeyError: older
        return cls(Path(d["path"]), d["architecture"], d["context"], dict(d["widths"]), tensors, *lists)


def tied_partners(model) -> dict[str, list[str]]:
    """Each tied tensor's partners, both ways, from ``model.all_tied_weights_keys``."""
    partners: dict[str, list[str]] = {}
    for target, source in dict(getattr(model, "all_tied_weights_keys", None) or {}).items():
        partners.setdefault(target, []).append(source)
        partners.setdefault(source, []).append(target)
    return partners


def checkpoint_candidates(name: str, prefix: str, partners: dict[str, list[str]]) -> list[str]:
    """The checkpoint names that may hold model tensor ``name``, in the order a streamed read tries
    them: itself, without or with the base-model ``prefix``, then its tied ``partners``."""
    found = [name]
    if prefix:
        found += [name.removeprefix(f"{prefix}."), f"{prefix}.{name}"]
    return found + partners.get(name, [])
