"""The block-sequential driver, its Lightning statistics pass and GBLM's gradient step."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from modules.engine.blocks import block_linears, capture_inputs, find_blocks
from modules.errors import TopiaryError
from modules.pruning.sparsity import parse_spec
from tests import helpers

VOCAB, N, SEQLEN = 97, 8, 16


def tiny_llama(tie: bool = False, seed: int = 0, layers: int = 2, dtype=torch.float32) -> nn.Module:
    return helpers.tiny_llama(VOCAB, tie=tie, seed=seed, layers=layers, dtype=dtype)


def tiny_opt(seed: int = 0) -> nn.Module:
    return helpers.tiny_opt(VOCAB, seed=seed)


def calib_ids(seed: int = 1, n: int = N) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQLEN), generator=torch.Generator().manual_seed(seed))


def request_of(method: str = "wanda", sparsity: float | None = 0.5, pattern: str | None = None, **kw):
    from modules.engine.request import PruneRequest

    return PruneRequest(method, parse_spec(sparsity if pattern is None else None, pattern), **kw)


@pytest.fixture(scope="module")
def trainer():
    from modules.engine.statistics import make_trainer

    return make_trainer("cpu")


def linear_inputs(block: nn.Module, inputs: torch.Tensor, block_args) -> dict[str, torch.Tensor]:
    """Every linear's input over all samples, (T, C_in), from a plain forward with hooks."""
    from modules.engine.blocks import run_block

    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        lin.register_forward_pre_hook(lambda _m, a, n=name: seen.setdefault(n, []).append(a[0].detach()))
        for name, lin in block_linears(block).items()
    ]
    try:
        with torch.no_grad():
            run_block(block, inputs, block_args)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(x).reshape(-1, x[0].shape[-1]).float() for n, x in seen.items()}


def test_shared_inputs_share_one_statistics_object(trainer):
    from modules.engine.statistics import run_pass

    model = tiny_llama()
    _, blocks = find_blocks(model)
    inputs, block_args = capture_inputs(model, calib_ids(), blocks)
    names = set(block_linears(blocks[0]))
    res = run_pass(trainer, blocks[0], inputs, block_args, collect=names, gram=True, batch_size=3)
    stats = res.stats
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert len({id(s) for s in stats.values()}) == 4, "4 distinct inputs: qkv, o, gate/up, down"
    assert res.groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    X = linear_inputs(blocks[0], inputs, block_args)
    for name, s in stats.items():
        assert s.tokens == N * SEQLEN
        torch.testing.assert_close(s.sq_norm, X[name].pow(2).sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.gram, X[name].T @ X[name], rtol=1e-5, atol=1e-4)
    only_down = run_pass(trainer, blocks[0], inputs, block_args, collect={"mlp.down_proj"})
    assert set(only_down.stats) == {"mlp.down_proj"} and only_down.stats["mlp.down_proj"].gram is None


def test_the_trainer_keeps_nothing_of_a_finished_pass(trainer):
    """The Trainer (one per device and thread) holds its last module until the next pass; the
    module must not hold the pass's hidden states or sums by then (a 70B block's activations
    are 8.6 GB; ADMM's Gram matrices stayed beside the next stage's)."""
    import gc
    import weakref

    from modules.engine.statistics import run_pass

    model = tiny_llama()
    _, blocks = find_blocks(model)
    inputs, block_args = capture_inputs(model, calib_ids(), blocks)
    outputs = torch.zeros_like(inputs)
    res = run_pass(
        trainer, blocks[0], inputs, block_args, collect={"mlp.down_proj"}, gram=True, outputs=outputs
    )
    watched = [weakref.ref(t) for t in (inputs, outputs, res.stats["mlp.down_proj"].gram)]
    del inputs, outputs, res
    gc.collect()
    assert trainer.lightning_module is not None  # the case this guards: the module is still held
    assert [r() is None for r in watched] == [True, True, True]


def test_statistics_are_fp32_for_a_bf16_model(trainer):
    from modules.engine.statistics import run_pass

    model = tiny_llama(dtype=torch.bfloat16)
    _, blocks = find_blocks(model)
    inputs, block_args = capture_inputs(model, calib_ids(), blocks)
    assert inputs.dtype == torch.bfloat16
    res = run_pass(trainer, blocks[0], inputs, block_args, collect={"self_attn.q_proj"}, gram=True)
    s = res.stats["self_attn.q_proj"]
    assert s.sq_norm.dtype == torch.float32 and s.gram.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_statistics_of_a_half_precision_model_are_fp32_sums(trainer, dtype):
    # 1024 tokens in 128 batches of one window: a sum kept in bf16/fp16 (per batch or
    # across batches) is off by at least one 16-bit rounding (2^-9 / 2^-12 relative),
    # far beyond the tolerance of an fp32 sum of the same 16-bit inputs.
    from modules.engine.statistics import run_pass

    model = tiny_llama(dtype=dtype)
    _, blocks = find_blocks(model)
    inputs, block_args = capture_inputs(model, calib_ids(n=128), blocks)
    names = {"self_attn.q_proj", "mlp.down_proj"}
    res = run_pass(trainer, blocks[0], inputs, block_args, collect=names, gram=True, batch_size=1)
    X = linear_inputs(blocks[0], inputs, block_args)
    for name in names:
        x = X[name].double()  # the model's 16-bit inputs, summed exactly
        s = res.stats[name]
        assert s.tokens == 128 * SEQLEN
        torch.testing.assert_close(s.sq_norm.double(), x.pow(2).sum(0), rtol=2e-5, atol=0)
        torch.testing.assert_close(
            s.gram.double(), x.T @ x, rtol=2e-5, atol=1e-5 * float(x.pow(2).sum(0).max())
        )


@pytest.mark.parametrize("tie", [False, True])
def test_prune_model_keeps_embeddings_dense_and_hits_exact_sparsity(tie, trainer):
    from tests.engine.oracle import prune_model

    model = tiny_llama(tie=tie)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prune_model(model, calib_ids(), request_of("wanda", 0.5), trainer=trainer).to_dict()
    json.dumps(report)  # a plain dict the CLI writes as is
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tie
    for name, p in model.named_parameters():
        if ".layers." not in name or not name.endswith("proj.weight"):
            torch.testing.assert_close(p, dense[name], rtol=0, atol=0, msg=f"{name} must stay dense")
        else:
            per_row = (p == 0).sum(1)
            assert bool((per_row == p.shape[1] // 2).all()), f"{name}: not 50% in every row"
    assert report["sparsity"] == pytest.approx(0.5)
    assert report["num_blocks"] == 2 and len(report["blocks"]) == 2
    for block in report["blocks"]:
        assert set(block["linears"]) == set(block_linears(find_blocks(model)[1][0]))
        assert all(lin["sparsity"] == pytest.approx(0.5) for lin in block["linears"].values())
        assert 0.0 < block["reconstruction_error"] < 1.0
        assert set(block["seconds"]) == {"stats", "prune", "propagate"}
    assert {"method", "setting", "nsamples", "seqlen", "seconds", "owl", "sparsity"} <= set(report)
    from modules.provenance import KEYS

    assert tuple(report["provenance"]) == KEYS  # no admm_precision: not an ADMM method
    assert report["provenance"]["device"] == "cpu" and report["provenance"]["dtype"] == "float32"


def _inputs_of(model: nn.Module, ids: torch.Tensor, name: str) -> torch.Tensor:
    """The input of linear ``name`` in a plain forward of the whole model, (T, C_in) fp32."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).float()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_the_next_block_sees_the_pruned_blocks_outputs(monkeypatch, trainer, method):
    # Record the statistics every linear is pruned with; block 1's q/k/v statistics must be
    # those of the inputs that the *pruned* block 0 produces, not the dense one's.
    from dataclasses import replace

    from modules.pruning.registry import METHODS
    from tests.engine.oracle import prune_model

    original = METHODS[method].fn
    seen = []

    def recording(W, stats, spec, **options):
        seen.append(stats)
        return original(W, stats, spec, **options)

    monkeypatch.setitem(METHODS, method, replace(METHODS[method], fn=recording))
    ids = calib_ids()
    dense_model = tiny_llama()
    model = tiny_llama()
    prune_model(model, ids, request_of(method, 0.5), trainer=trainer)
    assert len(seen) == 14  # 7 linears per block, block 0 first
    q = "model.layers.1.self_attn.q_proj"
    x_pruned, x_dense = _inputs_of(model, ids, q), _inputs_of(dense_model, ids, q)
    stats = seen[7]  # block 1's first linear (q_proj)
    torch.testing.assert_close(stats.sq_norm, x_pruned.pow(2).sum(0), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stats.sq_norm, x_dense.pow(2).sum(0), rtol=1e-2, atol=1e-3)
    if method == "sparsegpt":
        torch.testing.assert_close(stats.gram, x_pruned.T @ x_pruned, rtol=1e-4, atol=1e-4)


def test_opt_tied_embeddings_untouched_with_nm_pattern(trainer):
    from tests.engine.oracle import prune_model

    model = tiny_opt()
    emb = model.get_input_embeddings().weight
    assert emb is model.get_output_embeddings().weight
    before = emb.detach().clone()
    report = prune_model(model, calib_ids(), request_of("wanda", pattern="2:4"), trainer=trainer).to_dict()
    torch.testing.assert_close(emb, before, rtol=0, atol=0)
    _, blocks = find_blocks(model)
    for lin in block_linears(blocks[1]).values():
        groups = (lin.weight != 0).reshape(lin.weight.shape[0], -1, 4).sum(-1)
        assert bool((groups <= 2).all())
    assert report["setting"] == "2:4" and report["sparsity"] == pytest.approx(0.5)


def test_non_finite_weight_or_statistics_name_the_block_and_linear(trainer):
    from modules.pruning.sparsity import NonFiniteError
    from tests.engine.oracle import prune_model

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj weight"):
        prune_model(model, calib_ids(), request_of("wanda", 0.5), trainer=trainer)

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.0\.self_attn\.q_proj input statistics"):
        prune_model(model, calib_ids(), request_of("wanda", 0.5), trainer=trainer)


def test_owl_prunes_each_block_at_its_rate(trainer):
    from modules.pruning.owl import owl_rates
    from tests.engine.oracle import owl_block_rates, prune_model

    model = tiny_llama(layers=3)
    p = request_of("wanda", 0.5, owl=True, owl_m=3.0)
    # OWL's ratios written out from a plain forward of the dense model: per block, the share
    # of all its linears' |W| * ||X_j|| above 3 x their common mean.
    ratios = []
    for i, block in enumerate(model.model.layers):
        scores = [
            lin.weight.detach().abs() * _inputs_of(model, calib_ids(), f"model.layers.{i}.{name}").norm(dim=0)
            for name, lin in block_linears(block).items()
        ]
        flat = torch.cat([s.reshape(-1) for s in scores]).double()
        ratios.append(float((flat > 3.0 * flat.mean()).double().mean()))
    rates = owl_rates(ratios, 0.5, 0.08)
    assert owl_block_rates(tiny_llama(layers=3), calib_ids(), p, trainer=trainer)[0] == pytest.approx(ratios)
    report = prune_model(model, calib_ids(), p, trainer=trainer).to_dict()
    assert report["owl"]["ratios"] == pytest.approx(ratios) and report["owl"]["rates"] == pytest.approx(rates)
    assert len(set(rates)) > 1, "the tiny model's blocks differ in outliers"
    assert sum(rates) / len(rates) == pytest.approx(0.5)
    assert all(abs(r - 0.5) <= 0.08 + 1e-9 for r in rates)
    for block, rate in zip(report["blocks"], rates, strict=True):
        assert block["target"] == pytest.approx(rate)
        for lin in block["linears"].values():
            assert lin["sparsity"] == pytest.approx(math.floor(lin["shape"][1] * rate) / lin["shape"][1])
    with pytest.raises(TopiaryError, match="owl: needs an unstructured"):
        prune_model(tiny_llama(), calib_ids(), request_of("wanda", pattern="2:4", owl=True), trainer=trainer)


def test_true_sequential_recollects_statistics_after_earlier_groups(trainer):
    from modules.engine.statistics import run_pass
    from modules.pruning.wanda import prune_wanda
    from tests.engine.oracle import prune_block

    model = tiny_llama()
    _, blocks = find_blocks(model)
    block = blocks[0]
    inputs, block_args = capture_inputs(model, calib_ids(), blocks)
    dense = {n: lin.weight.detach().clone() for n, lin in block_linears(block).items()}

    # By hand: prune q/k/v on dense statistics, then o_proj on the statistics of that block.
    everything = set(dense)
    stats = run_pass(trainer, block, inputs, block_args, collect=everything).stats
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        lin = block.get_submodule(name)
        lin.weight.data.copy_(prune_wanda(dense[name], stats[name], parse_spec(0.5))[0])
    o_stats = run_pass(trainer, block, inputs, block_args, collect={"self_attn.o_proj"}).stats
    _, expected_o = prune_wanda(dense["self_attn.o_proj"], o_stats["self_attn.o_proj"], parse_spec(0.5))
    _, dense_o = prune_wanda(dense["self_attn.o_proj"], stats["self_attn.o_proj"], parse_spec(0.5))
    assert not torch.equal(expected_o, dense_o), "pruning q/k/v changes o_proj's statistics"

    for name, w in dense.items():
        block.get_submodule(name).weight.data.copy_(w)
    masks: dict[str, torch.Tensor] = {}
    _, report = prune_block(
        block,
        inputs,
        block_args,
        request_of("wanda", 0.5, true_sequential=True),
        trainer=trainer,
        masks=masks,
    )
    torch.testing.assert_close(masks["self_attn.o_proj.weight"], expected_o)
    assert report.stats_groups[0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


def test_masks_are_saved_by_full_parameter_name(tmp_path, trainer):
    from safetensors.torch import load_file

    from modules.engine.masks import MaskFile
    from tests.engine.oracle import prune_model

    model = tiny_llama()
    prune_model(model, calib_ids(), request_of("magnitude", 0.3), mask_dir=tmp_path, trainer=trainer)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["block_0000.safetensors", "block_0001.safetensors"]
    masks = load_file(str(tmp_path / "block_0001.safetensors"))
    w = model.get_parameter("model.layers.1.mlp.down_proj.weight")
    assert masks["model.layers.1.mlp.down_proj.weight"].dtype == torch.bool
    torch.testing.assert_close(masks["model.layers.1.mlp.down_proj.weight"], w != 0)
    source = MaskFile(tmp_path)
    assert len(source.index) == 14
    with pytest.raises(TopiaryError, match="has no mask for lm_head.weight"):
        source.get("lm_head.weight", w.shape, w.device)
    with pytest.raises(TopiaryError, match="mask_file"):
        MaskFile(tmp_path / "missing.safetensors")


def test_gradients_match_direct_autograd(tmp_path):
    from modules.engine.gradients import compute_gradients, load_block_grads

    model = tiny_llama()
    ids = calib_ids(n=4)
    compute_gradients(model, ids, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_0000.safetensors", "block_0001.safetensors"]
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())

    expected: dict[str, torch.Tensor] = {}
    for k in range(ids.shape[0]):
        model.zero_grad()
        model(input_ids=ids[k : k + 1], labels=ids[k : k + 1]).loss.backward()
        for name, p in model.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                expected[name] = expected.get(name, 0) + (100 * p.grad).pow(2)
    for i in range(2):
        grads = load_block_grads(tmp_path, i)
        assert set(grads) == set(block_linears(model.model.layers[i]))
        for name, g in grads.items():
            assert g.dtype == torch.float32
            torch.testing.assert_close(
                g, expected[f"model.layers.{i}.{name}.weight"].sqrt(), rtol=1e-4, atol=1e-6
            )
    with pytest.raises(TopiaryError, match="run the gradient step"):
        load_block_grads(tmp_path, 7)


def test_gblm_prunes_with_streamed_gradients(tmp_path, trainer):
    from modules.engine.gradients import compute_gradients, load_block_grads
    from modules.engine.masks import MaskFile
    from modules.pruning.gblm import prune_gblm
    from modules.pruning.stats import LayerStats
    from tests.engine.oracle import prune_model

    model = tiny_llama()
    ids = calib_ids()
    with pytest.raises(TopiaryError, match="needs the gradient step"):
        prune_model(model, ids, request_of("gblm", 0.5), trainer=trainer)
    compute_gradients(model, ids, tmp_path / "grads", trainer=trainer)
    dense = {n: lin.weight.detach().clone() for n, lin in block_linears(model.model.layers[0]).items()}
    _, blocks = find_blocks(model)
    X = linear_inputs(blocks[0], *capture_inputs(model, ids, blocks))
    report = prune_model(
        model,
        ids,
        request_of("gblm", 0.5),
        grads_dir=tmp_path / "grads",
        mask_dir=tmp_path / "masks",
        trainer=trainer,
    ).to_dict()
    assert report["sparsity"] == pytest.approx(0.5)
    assert report["plan"]["options"] == {}, "the request is reported as given"
    # The driver passes nsamples = the number of calibration windows (the reference's scale
    # of the activation term): block 0's masks are GBLM's with nsamples=N, not nsamples=1.
    masks = MaskFile(tmp_path / "masks")
    grads = load_block_grads(tmp_path / "grads", 0)
    differs = 0
    for name, W in dense.items():
        stats = LayerStats(X[name].shape[0], X[name].pow(2).sum(0), grad=grads[name])
        keep = masks.get(f"model.layers.0.{name}.weight", W.shape, W.device)
        assert torch.equal(keep, prune_gblm(W, stats, parse_spec(0.5), nsamples=N)[1]), name
        differs += not torch.equal(keep, prune_gblm(W, stats, parse_spec(0.5))[1])
    assert differs >= 3, "the scale of the activation term changes GBLM's masks here"


# --- a real block of the embedded model -------------------------------------------------


@pytest.fixture(scope="module")
def embedded_block():
    """Block 1 of the embedded reference model, its calibration inputs and call arguments."""
    from modules.engine.models import load_model

    try:
        model, tok = load_model("embedded", device="cpu")
    except FileNotFoundError as err:
        pytest.skip(f"embedded reference model not built yet: {err}")
    from modules.data.windows import calibration_windows

    ids = calibration_windows("embedded", tok, nsamples=16, seqlen=64, seed=0)
    prefix, blocks = find_blocks(model)
    inputs, block_args = capture_inputs(model, ids, blocks)
    with torch.no_grad():
        inputs = blocks[0](inputs, *block_args.args, **block_args.kwargs)
    return blocks[1], inputs, block_args


def _error_on_block(embedded_block, trainer, method: str, **options) -> float:
    import copy

    from tests.engine.oracle import prune_block

    block, inputs, block_args = embedded_block
    block = copy.deepcopy(block)
    _, block_report = prune_block(
        block, inputs, block_args, request_of(method, 0.6, options=options), trainer=trainer
    )
    report = block_report.to_dict()
    assert report["linears"]["mlp.up_proj"]["sparsity"] == pytest.approx(0.6, abs=0.01)
    return report["reconstruction_error"]


def test_weight_updates_reconstruct_a_real_block_better_than_wanda(embedded_block, trainer):
    wanda = _error_on_block(embedded_block, trainer, "wanda")
    sparsegpt = _error_on_block(embedded_block, trainer, "sparsegpt")
    admm1 = _error_on_block(embedded_block, trainer, "admm", selector="wanda")
    admm_grad = _error_on_block(embedded_block, trainer, "admm-grad")
    assert sparsegpt < wanda
    assert admm1 < wanda
    assert admm_grad <= admm1


def test_admm_reads_a_user_mask_file(tmp_path, trainer):
    from tests.engine.oracle import prune_model

    wanda_model = tiny_llama()
    prune_model(wanda_model, calib_ids(), request_of("wanda", 0.5), mask_dir=tmp_path, trainer=trainer)
    model = tiny_llama()
    options = {"selector": "mask", "mask_file": str(tmp_path), "precision": "fp32"}
    report = prune_model(
        model, calib_ids(), request_of("admm", 0.5, options=options), trainer=trainer
    ).to_dict()
    assert report["admm_precision"] == "fp32" and report["provenance"]["admm_precision"] == "fp32"
    for (name, p), q in zip(model.named_parameters(), wanda_model.parameters(), strict=True):
        if name.endswith("proj.weight"):
            assert torch.equal(p != 0, q != 0), f"{name}: ADMM must keep the given mask"


def test_bad_options_fail_before_any_pass(trainer, tmp_path):
    from configs.schema import PruneCfg
    from tests.engine.oracle import prune_model

    model = tiny_llama()
    with pytest.raises(
        TopiaryError,
        match=r"options of wanda: 'colour' is not an option of wanda \(its options: alpha_search\)",
    ):
        prune_model(model, calib_ids(), request_of("wanda", 0.5, options={"colour": 1}), trainer=trainer)
    with pytest.raises(TopiaryError, match='selector="mask" needs mask_file'):
        prune_model(
            model, calib_ids(), request_of("admm", 0.5, options={"selector": "mask"}), trainer=trainer
        )
    with pytest.raises(TopiaryError, match="precision='fp16' is not one of auto, fp32, mixed"):
        prune_model(
            model, calib_ids(), request_of("admm-grad", 0.5, options={"precision": "fp16"}), trainer=trainer
        )
    p = PruneCfg(method="sparsegpt", pattern="2:4", true_sequential=True).request()
    assert (p.method, str(p.spec), p.true_sequential, p.owl) == ("sparsegpt", "2:4", True, False)
    assert p.needs() == {"gram"}
    assert PruneCfg(method="admm", options={"selector": "gblm"}).request().needs() == {
        "gram",
        "grad",
    }
