"""The pruning methods by name; each entry owns what the engine would otherwise decide by name.

Every method is a pure function ``(W, stats, spec, **options) -> (W_pruned, keep)`` on
fp32 tensors: ``W`` is ``(C_out, C_in)``, ``keep`` a boolean mask (True = kept) and
``W_pruned`` is exactly zero where ``keep`` is False. Its :class:`Method` entry says:

- which statistics it needs, for given options (:meth:`Method.statistics`; ``sq_norm``
  always comes, ``gram`` and ``grad`` only when listed): a built-in method's statistics,
  whether it is data-free and whether it selects come from :data:`modules.pruning.traits.TRAITS`,
  which ``topiary plan`` reads without importing torch;
- its options: the keyword parameters of ``fn`` after ``(W, stats, spec)``, typed by
  their defaults, with the choices of the string ones, plus ``extra`` options that the
  entry consumes itself (ADMM's ``selector``), validated together by
  :meth:`Method.problems` when the config loads;
- the defaults it takes from the run (:meth:`Method.bind`: GBLM's ``nsamples``) and the
  choices it makes by itself, for the report (:meth:`Method.chosen`: ADMM's precision).

The engine only calls these; adding a method is one file here and one entry in
:data:`METHODS` (tests/engine/test_toy_method.py registers one from a test).

A method whose function takes ``mask`` also accepts ``mask_file`` (a ``.safetensors``
file or folder of keep-masks by full parameter name): the engine reads the mask of
each linear from it and passes it as ``mask``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

from modules.errors import TopiaryError
from modules.pruning import admm, gblm, magnitude, sparsegpt, wanda
from modules.pruning.sparsity import SparsitySpec
from modules.pruning.stats import LayerStats
from modules.pruning.traits import TRAITS

PruneFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
MASK_FILE = "mask_file"


@dataclass(frozen=True)
class Context:
    """What the engine knows when it binds options: calibration samples, device, input widths."""

    nsamples: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    widths: frozenset[int] = frozenset()


def _none(*_args) -> dict:
    return {}


def _no_problems(_options: Mapping) -> list[str]:
    return []


@dataclass(frozen=True)
class Method:
    """A registered pruner and the rules it owns (see the module docstring).

    Attributes:
        name: Registry name.
        fn: The pure pruning function.
        summary: One line for ``--help`` and the README.
        needs: Statistics beyond ``sq_norm`` it always needs (``gram``, ``grad``).
        data_free: Reads no statistics at all (called with ``stats=None``); the engine
            then runs no calibration pass unless the reconstruction error is asked for.
        choices: Allowed values of string options.
        extra: Options the entry consumes before calling ``fn``, with their defaults.
        check: More problems of given options (ranges, couplings), one message each.
        option_needs: Statistics that given options add (ADMM's ``selector="gblm"``).
        defaults: Options taken from the run's :class:`Context` when not given.
        chosen: Choices the method makes by itself for given options and context.
        prepare: Turns ``extra`` options into ``fn``'s keywords for one weight.
        selects: Its pruned weights are ``W`` off its keep-mask (no weight update): the
            per-block DAG runs a ``masks`` stage and no ``update``.
        keep: Its keep-mask alone, ``(W, stats, spec, **options, overwrite) -> keep``, for
            a selecting method: with ``overwrite=True`` the scores may take ``W``'s memory,
            and no pruned copy is made (the masks stage; see :meth:`mask`).
        selector: For a weight update on another method's mask (ADMM): the name of that
            method for given options (``"mask"``: the ``mask_file``).
    """

    name: str
    fn: PruneFn
    summary: str
    needs: frozenset[str] = frozenset()
    data_free: bool = False
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    extra: Mapping[str, object] = field(default_factory=dict)
    check: Callable[[Mapping], list[str]] = _no_problems
    option_needs: Callable[[Mapping], set[str]] = lambda _options: set()
    defaults: Callable[[Mapping, Context], dict] = _none
    chosen: Callable[[Mapping, Context], dict] = _none
    prepare: Callable[..., dict] | None = None
    selects: bool = False
    keep: Callable[..., torch.Tensor] | None = None
    selector: Callable[[Mapping], str] | None = None

    def mask_stage(self, options: Mapping) -> bool:
        """Whether the per-block DAG runs a ``masks`` stage for this method with ``options``."""
        return self.selects or self.selector is not None or MASK_FILE in options

    def update_stage(self) -> bool:
        """Whether the per-block DAG runs an ``update`` stage (a weight update)."""
        return not self.selects

    def mask(
        self,
        W: torch.Tensor,
        stats: LayerStats | None,
        spec: SparsitySpec,
        overwrite: bool = False,
        **options,
    ) -> torch.Tensor:
        """The method's keep-mask of one weight; with ``overwrite`` ``W`` is the caller's
        scratch copy, which :attr:`keep` may overwrite (the pruned copy of :meth:`run` is
        never made)."""
        if self.keep is not None:
            return self.keep(W, stats, spec, **options, overwrite=overwrite)
        return self.run(W, stats, spec, **options)[1]

    def select(
        self,
        W: torch.Tensor,
        stats: LayerStats,
        spec: SparsitySpec,
        options: Mapping,
        overwrite: bool = False,
    ):
        """The keep-mask the weight update starts from: that of :attr:`selector`'s method
        (``overwrite``: see :meth:`mask`)."""
        name = self.selector(options)
        allowed = self.choices.get("selector", tuple(METHODS))
        if name not in allowed:
            raise TopiaryError(f"selector: {name!r} is not one of {', '.join(allowed)}")
        if name == "mask":
            raise TopiaryError('selector: "mask" needs the keep-mask passed as mask= (e.g. with mask_file)')
        if stats.sq_norm is None and stats.gram is not None:
            stats = replace(stats, sq_norm=stats.gram.diagonal().clone())
        return METHODS[name].mask(W, stats, spec, overwrite)

    @property
    def takes_mask(self) -> bool:
        return "mask" in inspect.signature(self.fn).parameters

    def options(self) -> dict[str, object]:
        """Every option with its default: ``fn``'s keywords after ``(W, stats, spec)``, then ``extra``.

        ``mask`` is left out (it comes from ``mask_file``, listed instead).
        """
        params = list(inspect.signature(self.fn).parameters.values())[3:]
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        options = {p.name: p.default for p in params if p.kind in kinds and p.name != "mask"}
        options.update(self.extra)
        if self.takes_mask:
            options[MASK_FILE] = ""
        return options

    def problems(self, options: Mapping) -> list[str]:
        """Every problem of ``options``: unknown names, wrong types or choices, then :attr:`check`.

        Returns:
            One message per problem naming the option, its value and what is allowed.
        """
        accepted = self.options()
        problems = []
        for key, value in options.items():
            if key not in accepted:
                valid = ", ".join(accepted) or "none"
                problems.append(f"{key!r} is not an option of {self.name} (its options: {valid})")
                continue
            why = _type_problem(value, accepted[key])
            if why is None and key in self.choices and value not in self.choices[key]:
                why = f"{value!r} is not one of {', '.join(self.choices[key])}"
            if why:
                problems.append(f"{key}={why}")
        return problems or self.check({**self.defaults_of(), **options})

    def defaults_of(self) -> dict[str, object]:
        """The options' own defaults (without ``mask_file``)."""
        return {k: v for k, v in self.options().items() if k != MASK_FILE}

    def statistics(self, options: Mapping) -> frozenset[str]:
        """The statistics beyond ``sq_norm`` it needs with ``options`` (``gram``, ``grad``)."""
        return self.needs | frozenset(self.option_needs(options))

    def bind(self, options: Mapping, context: Context) -> dict:
        """``options`` with the run's defaults filled in (never overriding a given option)."""
        return {**self.defaults(options, context), **options}

    def run(self, W: torch.Tensor, stats: LayerStats | None, spec: SparsitySpec, **options):
        """Prune one weight: :attr:`prepare` the extra options, then call :attr:`fn`."""
        if self.prepare is not None:
            options = self.prepare(W, stats, spec, options)
        return self.fn(W, stats, spec, **options)


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


# GBLM: its reference scales the activation term by 1/nsamples (modules.pruning.gblm.gblm_scores).
def _gblm_check(o: Mapping) -> list[str]:
    return [] if o["nsamples"] >= 1 else [f"nsamples={o['nsamples']} must be >= 1 (calibration samples)"]


def _gblm_defaults(options: Mapping, context: Context) -> dict:
    return {"nsamples": context.nsamples}


def _sparsegpt_check(o: Mapping) -> list[str]:
    return sparsegpt.range_problems(o.get("blocksize"), o.get("percdamp"))  # (a test's spy may take neither)


# ADMM and ADMM-Grad.
def _admm_check(o: Mapping) -> list[str]:
    problems = admm.range_problems(o["iters"], o["lam"], o["rho"])
    if MASK_FILE in o and o["selector"] != "mask":
        problems.append('mask_file is only read with selector="mask"')
    if o["selector"] == "mask" and MASK_FILE not in o:
        problems.append('selector="mask" needs mask_file=<path to a .safetensors mask file>')
    return problems


def _admm_grad_check(o: Mapping) -> list[str]:
    return admm.range_problems(o["iters"], o["lam"], o["rho"], o["ks"])


def _admm_needs(options: Mapping) -> set[str]:
    selector = options.get("selector", "wanda")
    return set() if selector == "mask" else set(METHODS[selector].needs)


def _admm_chosen(options: Mapping, context: Context) -> dict:
    precision = options.get("precision", "auto")
    chosen = {admm.resolve_precision(precision, context.device, w) for w in context.widths}
    if len(chosen) > 1:
        return {"admm_precision": f"fp32 up to {admm.FP32_MAX_INPUTS} inputs, mixed above"}
    return {"admm_precision": chosen.pop() if chosen else "fp32"}


def _admm_prepare(W: torch.Tensor, stats: LayerStats, spec: SparsitySpec, options: Mapping) -> dict:
    """ADMM1's fixed mask: ``mask`` as given, else the mask of the ``selector`` method."""
    options = dict(options)
    selector = options.pop("selector", "wanda")
    if options.get("mask") is None:
        options["mask"] = METHODS["admm"].select(W, stats, spec, {"selector": selector})
    return options


_ADMM_CHOICES = {"selector": admm.SELECTORS, "precision": admm.PRECISIONS}


def _traits(name: str) -> dict:
    """The :class:`Method` fields of built-in method ``name`` that :data:`TRAITS` holds."""
    traits = TRAITS[name]
    return {"needs": traits.needs, "data_free": traits.data_free, "selects": traits.selects}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("magnitude", magnitude.prune_magnitude, "|W|, whole matrix or per row", **_traits("magnitude"),
               choices={"group": ("matrix", "row")}, keep=magnitude.magnitude_keep),
        Method("wanda", wanda.prune_wanda, "|W| * ||X_j||, per output row", **_traits("wanda"),
               keep=wanda.wanda_keep),
        Method("sparsegpt", sparsegpt.prune_sparsegpt, "OBS mask and update, column blocks",
               **_traits("sparsegpt"), check=_sparsegpt_check),
        Method("gblm", gblm.prune_gblm, "|W| * (G + ||X_j||), per output row", **_traits("gblm"),
               check=_gblm_check, defaults=_gblm_defaults, keep=gblm.gblm_keep),
        Method("admm", admm.prune_admm, "ADMM weight update on a fixed mask", **_traits("admm"),
               choices=_ADMM_CHOICES, extra={"selector": "wanda"}, check=_admm_check,
               option_needs=_admm_needs, chosen=_admm_chosen, prepare=_admm_prepare,
               selector=lambda options: options.get("selector", "wanda")),
        Method("admm-grad", admm.prune_admm_grad, "ADMM with gradual mask selection", **_traits("admm-grad"),
               choices={"group": admm.GROUPS, "precision": admm.PRECISIONS},
               check=_admm_grad_check, chosen=_admm_chosen),
    )
}  # fmt: skip

METHOD_NAMES = tuple(METHODS)


def reads_data(prune: Mapping) -> bool:
    """Whether a prune with the config section ``prune`` reads calibration data: every method but a
    data-free one (magnitude), which does too with OWL or ``report_error``."""
    data_free = get_method(prune["method"]).data_free
    return not data_free or bool(prune.get("owl")) or bool(prune.get("report_error"))


def get_method(name: str) -> Method:
    """Look a method up by name; an unknown name lists the valid ones."""
    if name not in METHODS:
        raise TopiaryError(f"method: {name!r} is not one of {', '.join(METHODS)}")
    return METHODS[name]


def method_options(name: str) -> dict[str, object]:
    """The options of method ``name`` with their defaults (see :meth:`Method.options`)."""
    return get_method(name).options()


def option_problems(name: str, options: Mapping) -> list[str]:
    """Every problem of ``options`` for method ``name`` (see :meth:`Method.problems`)."""
    return get_method(name).problems(options)
