"""The pruning methods by name, with what statistics each needs.

Every method is a pure function ``(W, stats, spec, **options) -> (W_pruned, keep)`` on
fp32 tensors: ``W`` is ``(C_out, C_in)``, ``keep`` a boolean mask (True = kept) and
``W_pruned`` is exactly zero where ``keep`` is False.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from modules.errors import TopiaryError

PruneFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """A registered pruner: its function, the statistics it needs, and a one-line summary.

    ``data_free`` methods read no statistics at all (not even ``sq_norm``; they are called
    with ``stats=None``): the driver runs no calibration pass for them unless the
    reconstruction error is asked for.
    """

    name: str
    fn: PruneFn
    needs: frozenset[str]
    summary: str
    data_free: bool = False


def _methods() -> dict[str, Method]:
    from modules.admm import prune_admm, prune_admm_grad
    from modules.gblm import prune_gblm
    from modules.magnitude import prune_magnitude
    from modules.sparsegpt import prune_sparsegpt
    from modules.wanda import prune_wanda

    table = [
        Method("magnitude", prune_magnitude, frozenset(), "|W|, whole matrix or per row", data_free=True),
        Method("wanda", prune_wanda, frozenset(), "|W| * ||X_j||, per output row"),
        Method("sparsegpt", prune_sparsegpt, frozenset({"gram"}), "OBS mask and update, column blocks"),
        Method("gblm", prune_gblm, frozenset({"grad"}), "|W| * (G + ||X_j||), per output row"),
        Method("admm", prune_admm, frozenset({"gram"}), "ADMM weight update on a fixed mask"),
        Method("admm-grad", prune_admm_grad, frozenset({"gram"}), "ADMM with gradual mask selection"),
    ]
    return {m.name: m for m in table}


METHOD_NAMES = ("magnitude", "wanda", "sparsegpt", "gblm", "admm", "admm-grad")


def get_method(name: str) -> Method:
    """Look a method up by name; an unknown name lists the valid ones."""
    methods = _methods()
    if name not in methods:
        raise TopiaryError(f"method: {name!r} is not one of {', '.join(METHOD_NAMES)}")
    return methods[name]


# Options the driver reads itself and never passes to the method function.
DRIVER_OPTIONS = {"mask_file": str}


def method_options(name: str) -> dict[str, object]:
    """The options a method accepts with their defaults (its keyword parameters after ``W, stats, spec``).

    ``mask`` is left out (the driver passes it from ``mask_file``); ``mask_file`` is added
    for methods that take a mask.
    """
    params = list(inspect.signature(get_method(name).fn).parameters.values())[3:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    options = {p.name: p.default for p in params if p.kind in kinds}
    if options.pop("mask", inspect.Parameter.empty) is not inspect.Parameter.empty:
        options["mask_file"] = ""
    return options


def _type_problem(value: object, default: object) -> str | None:
    """Why ``value`` cannot stand for an option whose default is ``default``, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    if isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{value!r} is not an integer"
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"{value!r} is not a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else f"{value!r} is not a string"
    return None


def option_problems(name: str, options: dict) -> list[str]:
    """Every problem of ``options`` for method ``name``, checked against its signature.

    Names must be keyword parameters of the method's function (plus ``mask_file`` for
    methods that take a mask); values must have the type of the default (an int is a
    valid float) and be finite. Ranges are checked by the method itself.

    Returns:
        One message per problem, each naming the option; empty when all is well.
    """
    accepted = method_options(name)
    problems = []
    for key, value in options.items():
        if key not in accepted:
            valid = ", ".join(accepted) or "none"
            problems.append(f"{key!r} is not an option of {name} (its options: {valid})")
            continue
        why = _type_problem(value, accepted[key])
        if why:
            problems.append(f"{key}={why}")
    if "mask_file" in options and options.get("selector") != "mask":
        problems.append('mask_file is only read with selector="mask"')
    if options.get("selector") == "mask" and "mask_file" not in options:
        problems.append('selector="mask" needs mask_file=<path to a .safetensors mask file>')
    return problems
