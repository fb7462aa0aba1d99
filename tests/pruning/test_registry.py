"""The method registry: the documented six, what each needs, and that each runs with exactly that."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from modules.errors import TopiaryError
from modules.pruning.registry import METHOD_NAMES, get_method
from modules.pruning.sparsity import SparsitySpec
from modules.pruning.stats import LayerStats

# The table documented in modules/pruning/registry.py, in its order.
DOCUMENTED_NEEDS = {
    "magnitude": frozenset(),
    "wanda": frozenset(),
    "sparsegpt": frozenset({"gram"}),
    "gblm": frozenset({"grad"}),
    "admm": frozenset({"gram"}),
    "admm-grad": frozenset({"gram"}),
}


def test_method_names_are_the_documented_six():
    assert METHOD_NAMES == tuple(DOCUMENTED_NEEDS)


@pytest.mark.parametrize("name", list(DOCUMENTED_NEEDS))
def test_get_method_returns_the_named_method(name):
    method = get_method(name)
    assert method.name == name
    assert callable(method.fn)
    assert method.needs == DOCUMENTED_NEEDS[name]
    assert method.summary.strip()


def test_simple_methods_are_the_module_functions():
    from modules.pruning.gblm import prune_gblm
    from modules.pruning.magnitude import prune_magnitude
    from modules.pruning.wanda import prune_wanda

    assert get_method("magnitude").fn is prune_magnitude
    assert get_method("wanda").fn is prune_wanda
    assert get_method("gblm").fn is prune_gblm


def _layer(needs: frozenset[str], seed: int = 0) -> tuple[torch.Tensor, LayerStats]:
    """W (8, 16) and statistics holding sq_norm plus exactly the optional fields in ``needs``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(8, 16, generator=g)
    X = torch.randn(64, 16, generator=g) * (0.5 + torch.rand(16, generator=g))
    stats = LayerStats(
        tokens=64,
        sq_norm=(X**2).sum(0),
        gram=X.T @ X if "gram" in needs else None,
        grad=torch.rand(8, 16, generator=g) if "grad" in needs else None,
    )
    return W, stats


@pytest.mark.parametrize("name", list(DOCUMENTED_NEEDS))
@pytest.mark.parametrize("spec", [SparsitySpec(rate=0.5), SparsitySpec(n=2, m=4)], ids=["0.5", "2:4"])
def test_each_method_runs_with_exactly_its_needs(name, spec):
    method = get_method(name)
    W, stats = _layer(method.needs)
    W_before = W.clone()
    W_pruned, keep = method.run(W, stats, spec)
    assert torch.equal(W, W_before), "W was modified in place"
    assert keep.dtype == torch.bool and keep.shape == W.shape
    assert W_pruned.dtype == torch.float32 and W_pruned.shape == W.shape
    assert bool(torch.isfinite(W_pruned).all())
    assert bool((W_pruned[~keep] == 0).all()), "W_pruned is not exactly zero off the mask"
    if spec.is_nm:
        assert bool((keep.reshape(8, -1, 4).sum(-1) <= 2).all()), "more than 2 kept in a group of 4"
    else:
        # 50% of 16 inputs is exactly 8 per row, 64 per matrix: per-row and per-matrix agree.
        assert int((~keep).sum()) == 64


RATE, NM = SparsitySpec(rate=0.6), SparsitySpec(n=2, m=4)
SELECT_CASES = [
    *[(name, options, spec) for name, options in [("magnitude", {}), ("magnitude", {"group": "row"})]
      for spec in (RATE, NM)],
    *[("wanda", {}, spec) for spec in (RATE, NM)],
    ("wanda", {"alpha_search": True}, RATE),  # unstructured only
    *[("gblm", {"nsamples": 4}, spec) for spec in (RATE, NM)],
]  # fmt: skip


@pytest.mark.parametrize(("name", "options", "spec"), SELECT_CASES, ids=lambda c: str(c))
def test_mask_alone_is_the_methods_mask_and_may_take_ws_memory(name, options, spec):
    """``Method.mask`` (the masks stage's entry: no pruned copy, scores in W's place with
    ``overwrite``) gives exactly the mask of the full method; without ``overwrite`` W is kept."""
    method = get_method(name)
    W, stats = _layer(method.needs, seed=3)
    if stats.grad is not None:  # both GBLM terms of one size: either alone ranks otherwise
        stats = replace(stats, grad=stats.grad * 4)
    W[0, :4] = W[0, 4:8]  # ties inside a row: the stable order must survive the in-place scores
    expected = method.run(W, stats, spec, **options)[1]
    kept = W.clone()
    assert torch.equal(method.mask(kept, stats, spec, **options), expected)
    assert torch.equal(kept, W), "W was modified without overwrite"
    scratch = W.clone()
    assert torch.equal(method.mask(scratch, stats, spec, overwrite=True, **options), expected)
    assert not torch.equal(scratch, W), "overwrite=True made a copy: the masks stage holds two"


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(TopiaryError) as err:
        get_method("wandaa")
    message = str(err.value)
    assert "wandaa" in message
    for name in DOCUMENTED_NEEDS:
        assert name in message


def test_options_are_typed_and_checked_with_their_choices():
    admm = get_method("admm")
    assert admm.options() == {
        "iters": 20, "lam": 0.1, "rho": 1.0, "precision": "auto", "selector": "wanda", "mask_file": "",
    }  # fmt: skip
    assert admm.problems({"iters": 10, "selector": "sparsegpt"}) == []
    problems = admm.problems({"selector": "wandaa", "iters": "ten", "nope": 1})
    assert problems == [
        "selector='wandaa' is not one of magnitude, wanda, gblm, sparsegpt, mask",
        "iters='ten' is not an integer",
        "'nope' is not an option of admm (its options: iters, lam, rho, precision, selector, mask_file)",
    ]
    # ranges and couplings, all at once, once names and types are right
    assert admm.problems({"rho": 0, "lam": -1, "selector": "mask"}) == [
        "lam=-1 must be >= 0 (damping as a fraction of the mean diagonal; 0.1)",
        "rho=0 must be > 0 (ADMM penalty; 1.0 by default)",
        'selector="mask" needs mask_file=<path to a .safetensors mask file>',
    ]
    assert get_method("admm-grad").problems({"ks": 30}) == [
        "ks=30 must be within [0, iters=20] (gradual-selection iterations)"
    ]
    assert get_method("gblm").problems({"nsamples": 0}) == ["nsamples=0 must be >= 1 (calibration samples)"]


def test_each_entry_owns_its_statistics_defaults_and_choices():
    from modules.pruning.registry import Context

    assert get_method("admm").statistics({"selector": "gblm"}) == {"gram", "grad"}
    assert get_method("admm").statistics({"selector": "mask", "mask_file": "m"}) == {"gram"}
    assert get_method("wanda").statistics({}) == frozenset()
    context = Context(nsamples=7, widths=frozenset({16}))
    assert get_method("gblm").bind({}, context) == {"nsamples": 7}
    assert get_method("gblm").bind({"nsamples": 3}, context) == {"nsamples": 3}  # a given option wins
    assert get_method("wanda").bind({}, context) == {}
    assert get_method("admm-grad").chosen({"precision": "mixed"}, context) == {"admm_precision": "mixed"}
    assert get_method("admm").chosen({}, context) == {"admm_precision": "fp32"}  # narrow inputs: fp32


@pytest.mark.parametrize("name", list(DOCUMENTED_NEEDS))
def test_the_registry_refuses_every_option_value_the_method_refuses(name):
    """Ranges are checked when the config loads (``Method.problems``), before any calibration: every
    numeric option at -1, 0 and 1 is refused there exactly when the method itself refuses it."""
    method = get_method(name)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 8, generator=gen)
    X = torch.randn(16, 8, generator=gen)
    stats = LayerStats(tokens=16, sq_norm=(X * X).sum(0), gram=X.T @ X, grad=torch.rand(4, 8, generator=gen))
    numeric = [k for k, v in method.defaults_of().items() if type(v) in (int, float)]
    for key in numeric:
        for value in (-1, 0, 1):
            refused = bool(method.problems({key: value}))
            try:
                method.run(W.clone(), stats, SparsitySpec(rate=0.5), **method.bind({key: value}, _context()))
                ran = True
            except (TopiaryError, ValueError) as err:  # gblm's own checks raise ValueError
                assert key in str(err), (key, value, err)
                ran = False
            assert refused != ran, f"{name}: {key}={value}: registry refuses {refused}, method runs {ran}"


def _context():
    from modules.pruning.registry import Context

    return Context(nsamples=16)
