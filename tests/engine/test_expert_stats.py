"""Per-expert statistics of fused experts (modules/engine/experts.py) against an unfused reference.

The reference runs the block's MoE module by hand: the router's top-k, then for each expert
``nn.Linear`` layers built from its slices of the fused tensors (``(out, in)`` like any
Linear), with forward pre-hooks on them summing their inputs over the tokens routed to the
expert, each weighted as the module docstring states. Its output must equal the block's MoE
output (so the reference routes and gates as the model does), and the pass's per-expert
``sq_norm`` / ``gram`` / ``tokens`` must equal its sums.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from modules.engine import experts as experts_mod
from modules.engine.blocks import BlockArgs, block_experts, expert_matrix, find_blocks
from modules.engine.experts import expert_gradient
from modules.engine.statistics import make_trainer, run_pass
from tests.helpers import tiny_config

# model_type -> (MoE module, its router); Llama-4 scales each expert's input, the others its output.
MOE = {
    "gpt_oss": ("mlp", "router"),
    "llama4_text": ("feed_forward", "router"),
    "mixtral": ("mlp", "gate"),
    "qwen3_moe": ("mlp", "gate"),
}


def _block(model_type: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()
    return find_blocks(model)[1][0]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    return lin


class _Sums:
    def __init__(self):
        self.tokens, self.sq_norm, self.gram = 0, 0.0, 0.0

    def hook(self, weights: torch.Tensor):
        def pre(_m, args):
            x = args[0].double()
            self.tokens += x.shape[0]
            self.sq_norm = self.sq_norm + (weights[:, None] * x * x).sum(0)
            self.gram = self.gram + (weights[:, None] * x).T @ x

        return pre


def _reference(block, model_type: str, x: torch.Tensor, mode: str, linears: dict | None = None):
    """Per expert ``{tensor: _Sums}`` and the MoE output, by hand from unfused Linears (put in
    ``linears``, per expert ``{tensor: Linear}``, if given)."""
    moe = getattr(block, MOE[model_type][0])
    fused = block_experts(block)
    mod = moe.experts
    x = x.reshape(-1, x.shape[-1])
    router = getattr(moe, MOE[model_type][1])
    prescaled = model_type == "llama4_text"
    if prescaled:
        top, index = torch.topk(router(x)[1], router.top_k, dim=1)
        scores = torch.sigmoid(top)
    else:
        _, scores, index = router(x)
    out = torch.zeros_like(x)
    sums = {}
    for e in range(len(mod.down_proj)):
        rows, slot = (index == e).nonzero(as_tuple=True)
        r = scores[rows, slot]
        bias = getattr(mod, "gate_up_proj_bias", None)
        transposed = block_experts(block)[f"{MOE[model_type][0]}.experts.down_proj"]
        gu = _linear(expert_matrix(mod.gate_up_proj, e, transposed), None if bias is None else bias[e])
        bias = getattr(mod, "down_proj_bias", None)
        down = _linear(expert_matrix(mod.down_proj, e, transposed), None if bias is None else bias[e])
        gate = partial(_glu, mod) if prescaled else mod._apply_gate
        s_gu, s_down = _Sums(), _Sums()
        if mode == "all":
            tokens, weights = x, torch.ones(len(x), dtype=torch.float64)
        elif not prescaled:  # output scaled by r: token weight r^2
            tokens, weights = x[rows], r.double() ** 2
        else:  # Llama-4 scales the input: the expert sees r x, weight 1
            tokens, weights = x[rows] * r[:, None], torch.ones(len(rows), dtype=torch.float64)
        h1, h2 = (
            gu.register_forward_pre_hook(s_gu.hook(weights)),
            down.register_forward_pre_hook(s_down.hook(weights)),
        )
        h = gu(tokens)
        down(gate(h))
        h1.remove(), h2.remove()
        if prescaled:
            y = down(gate(gu(x[rows] * r[:, None])))
        else:
            y = down(gate(gu(x[rows]))) * r[:, None]
        out.index_add_(0, rows, y)
        sums[e] = {n: (s_gu if n.endswith("gate_up_proj") else s_down) for n in fused}
        if linears is not None:
            linears[e] = {n: (gu if n.endswith("gate_up_proj") else down) for n in fused}
    return sums, out


def _glu(mod, h):
    gate, up = h.chunk(2, dim=-1)
    return up * mod.act_fn(gate)


@pytest.mark.parametrize("model_type", list(MOE))
@pytest.mark.parametrize("mode", ["routed", "all"])
def test_per_expert_statistics_equal_the_unfused_reference(model_type, mode, monkeypatch):
    monkeypatch.setattr(experts_mod, "MIN_ROUTED_TOKENS", 0)  # the routed sums as they are
    block = _block(model_type)
    torch.manual_seed(1)
    inputs = torch.randn(3, 16, block.self_attn.q_proj.in_features)
    captured = {}
    moe = getattr(block, MOE[model_type][0])
    hook = moe.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", []).append(args[0]))
    out_hook = moe.register_forward_hook(
        lambda _m, _a, out: captured.setdefault("y", []).append(out[0] if isinstance(out, tuple) else out)
    )
    rotary = _rotary(model_type, inputs)
    result = run_pass(
        make_trainer("cpu"), block, inputs, BlockArgs((), rotary), gram=True, experts=mode, batch_size=8
    )
    hook.remove(), out_hook.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured["x"]])
    sums, out = _reference(block, model_type, x, mode)
    y = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured["y"]])
    if model_type == "llama4_text":
        y = y - moe.shared_expert(x)
    torch.testing.assert_close(out, y, rtol=1e-4, atol=1e-5)  # the reference routes as the model does
    for name in block_experts(block):
        for e, per in sums.items():
            ref = per[name]
            assert int(result.experts[f"{name}.tokens"][e]) == ref.tokens
            torch.testing.assert_close(
                result.experts[f"{name}.sq_norm"][e].double(), ref.sq_norm, rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(
                result.experts[f"{name}.gram"][e].double(), ref.gram, rtol=1e-4, atol=1e-4
            )
        assert not result.experts[f"{name}.fallback"].any()


@pytest.mark.parametrize("model_type", list(MOE))
def test_an_experts_gradient_is_that_of_its_unfused_linears_on_the_tokens_routed_to_it(model_type):
    """GBLM on experts: expert e's slice of a fused tensor's gradient, as ``(out, in)``
    (:func:`modules.engine.experts.expert_gradient`), equals the gradient of the reference's
    Linears of e, which see only the tokens routed to e, scaled as the block scales them; below
    MIN_ROUTED_TOKENS routed tokens it is zero (not pruned on)."""
    block = _block(model_type)
    moe, fused = getattr(block, MOE[model_type][0]), block_experts(block)
    torch.manual_seed(1)
    x = torch.randn(48, block.self_attn.q_proj.in_features)
    upstream = torch.randn_like(x)
    for p in block.parameters():
        p.requires_grad_(False)
    for name in fused:
        block.get_parameter(name).requires_grad_(True)
    y = moe(x[None])
    y = (y[0] if isinstance(y, tuple) else y).reshape(x.shape)  # Llama-4's shared expert: no gradient here
    (y * upstream).sum().backward()
    linears: dict = {}
    _, out = _reference(block, model_type, x, "routed", linears)
    (out * upstream).sum().backward()
    enough = experts_mod.MIN_ROUTED_TOKENS
    for name, transposed in fused.items():
        grad = block.get_parameter(name).grad
        for e, per in linears.items():
            got = expert_gradient(grad, e, transposed, enough)
            torch.testing.assert_close(got, per[name].weight.grad, rtol=1e-4, atol=1e-6, msg=f"{name} {e}")
            assert got.abs().max() > 0
        assert not expert_gradient(grad, 0, transposed, enough - 1).any()


def _rotary(model_type, inputs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    rope = model.model.rotary_emb
    pos = torch.arange(inputs.shape[1])[None]
    return {"position_embeddings": rope(inputs, pos), "position_ids": pos}


def test_an_expert_without_tokens_takes_all_tokens_statistics():
    """``routed``: an expert the router never picks (fewer than MIN_ROUTED_TOKENS) is pruned on its
    ``all`` statistics, flagged, with its routed count (0) for the report; the others keep theirs."""
    block = _block("gpt_oss")
    with torch.no_grad():
        block.mlp.router.bias[3] = -1e4  # expert 3 is never among the top 2
    torch.manual_seed(1)
    inputs = torch.randn(3, 16, block.self_attn.q_proj.in_features)
    captured = []
    hook = block.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    run = dict(gram=True, batch_size=8)
    result = run_pass(
        make_trainer("cpu"), block, inputs, BlockArgs((), _rotary("gpt_oss", inputs)), experts="routed", **run
    )
    hook.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured])
    everything, _ = _reference(block, "gpt_oss", x, "all")
    routed, _ = _reference(block, "gpt_oss", x, "routed")
    for name in block_experts(block):
        assert result.experts[f"{name}.routed"].tolist()[3] == 0
        assert result.experts[f"{name}.fallback"].tolist() == [False, False, False, True]
        assert int(result.experts[f"{name}.tokens"][3]) == len(x)
        torch.testing.assert_close(
            result.experts[f"{name}.gram"][3].double(), everything[3][name].gram, rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(
            result.experts[f"{name}.gram"][0].double(), routed[0][name].gram, rtol=1e-4, atol=1e-4
        )


def test_each_expert_is_pruned_on_its_own_statistics_in_its_orientation(tmp_path):
    """The masks and update stages read expert e's statistics for expert e's (out, in) matrix; an
    expert with no token at all is refused, never pruned on empty sums."""
    from modules.engine.files import save
    from modules.engine.request import Job
    from modules.engine.weight_stages import _each_expert
    from modules.errors import TopiaryError

    name, experts, cols = "mlp.experts.down_proj", 3, 5
    sums = {
        f"{name}.tokens": torch.tensor([20.0, 30.0, 40.0], dtype=torch.float64),
        f"{name}.sq_norm": torch.arange(1.0, experts + 1)[:, None].expand(experts, cols).contiguous(),
        f"{name}.gram": torch.stack([(e + 1.0) * torch.eye(cols) for e in range(experts)]),
    }
    path = save(sums, tmp_path / "stats.safetensors")
    job = Job(model_dir="", dtype="float32", device="cpu", folder=str(tmp_path), request=None, nsamples=1)
    tensor = torch.randn(experts, cols, 7)  # (experts, in, out)
    seen = list(_each_expert(job, f"{name}[0:{experts}]", "model.layers.0." + name, tensor, True, str(path)))
    assert [e for e, _, _ in seen] == [0, 1, 2]
    for e, W, layer in seen:
        assert torch.equal(W, tensor[e].T) and layer.tokens == 20 + 10 * e
        assert torch.equal(layer.sq_norm, torch.full((cols,), e + 1.0))
        assert torch.equal(layer.gram, (e + 1.0) * torch.eye(cols))
    sums[f"{name}.tokens"][1] = 0
    path = save(sums, tmp_path / "empty.safetensors")
    with pytest.raises(TopiaryError, match="expert 1 has no calibration token"):
        list(_each_expert(job, f"{name}[0:{experts}]", "model.layers.0." + name, tensor, True, str(path)))


def test_fused_experts_of_unknown_input_are_refused_before_any_work():
    """A fused expert tensor the pass cannot form the input of (here renamed) stops a method that
    reads statistics before any work, naming it; a data-free method prunes it."""
    from modules.engine.blocks import BlockDiscoveryError
    from modules.engine.loop import _check_expert_inputs

    block = _block("gpt_oss")
    experts = block.mlp.experts
    experts.register_parameter("fc3_proj", torch.nn.Parameter(torch.zeros(4, 8, 8)))
    blocks = torch.nn.ModuleList([block])
    with pytest.raises(BlockDiscoveryError, match=r"model\.layers\.0\.mlp\.experts\.fc3_proj.*wanda cannot"):
        _check_expert_inputs("model.layers", blocks, "wanda")
    _check_expert_inputs("model.layers", blocks, None)
