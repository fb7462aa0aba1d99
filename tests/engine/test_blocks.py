"""Decoder-block discovery, input capture and propagation on tiny random HF models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modules.engine.blocks import BlockDiscoveryError, block_linears, capture_inputs, find_blocks, run_block
from modules.errors import TopiaryError

ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt_neox")
PREFIX = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
}
VOCAB, N, SEQLEN = 97, 8, 16


def tiny_model(arch: str, attn: str = "sdpa", tie: bool | None = None, seed: int = 0) -> nn.Module:
    """A 2-layer, width-32 random causal LM of ``arch`` built offline from its config class."""
    import transformers as tf

    sizes = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    sizes["max_position_embeddings"] = 64
    if arch == "opt":
        cfg = tf.OPTConfig(**sizes, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0)
        cls = tf.OPTForCausalLM
    elif arch == "gpt_neox":
        cfg, cls = tf.GPTNeoXConfig(**sizes, intermediate_size=64), tf.GPTNeoXForCausalLM
    else:
        config_cls, cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        }[arch]
        kv = 4 if arch == "llama" else 2  # Mistral and Qwen2 with grouped-query attention
        cfg = config_cls(**sizes, intermediate_size=64, num_key_value_heads=kv)
    if tie is not None:
        cfg.tie_word_embeddings = tie
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(cfg).eval()


def calib_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (N, SEQLEN), generator=torch.Generator().manual_seed(seed))


def dense_block_io(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) hidden states of every decoder block in one ordinary model forward."""
    _, blocks = find_blocks(model)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x.detach().clone(), (out[0] if isinstance(out, tuple) else out).detach().clone()))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_find_blocks_and_capture(arch):
    model = tiny_model(arch)
    prefix, blocks = find_blocks(model)
    assert prefix == PREFIX[arch]
    assert len(blocks) == 2
    assert model.get_submodule(prefix) is blocks
    assert block_linears(blocks[0]), "every block holds linears"
    ids = calib_ids()
    inputs, block_args = capture_inputs(model, ids, blocks)
    assert inputs.shape == (N, SEQLEN, 32) and inputs.dtype == torch.float32
    reference = dense_block_io(model, ids)
    torch.testing.assert_close(inputs, reference[0][0], rtol=0, atol=0)
    assert not any(h for b in blocks for h in b._forward_pre_hooks.values()), "the catcher hook is removed"
    assert block_args.kwargs.get("past_key_values") is None and block_args.kwargs.get("layer_past") is None


@pytest.mark.parametrize(
    ("arch", "attn"), [(a, "sdpa") for a in ARCHS] + [("llama", "eager"), ("opt", "eager")]
)
def test_block_calls_reproduce_dense_forward(arch, attn):
    """Captured kwargs (from one window) work for a batch of windows, eager masks included."""
    model = tiny_model(arch, attn=attn)
    ids = calib_ids()
    inputs, block_args = capture_inputs(model, ids)
    _, blocks = find_blocks(model)
    x = inputs
    for block, (_, dense_out) in zip(blocks, dense_block_io(model, ids), strict=True):
        with torch.no_grad():
            x = run_block(block, x, block_args)
        torch.testing.assert_close(x, dense_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_driver_with_sparsity_zero_propagates_dense_hidden_states(arch):
    from modules.engine.request import PruneRequest
    from modules.pruning.sparsity import parse_spec
    from tests.engine.oracle import prune_block

    model = tiny_model(arch)
    ids = calib_ids()
    reference = dense_block_io(model, ids)
    prefix, blocks = find_blocks(model)
    inputs, block_args = capture_inputs(model, ids, blocks)
    request = PruneRequest("magnitude", parse_spec(0.0), batch_size=3)  # uneven batches on purpose
    for i, block in enumerate(blocks):
        inputs, report = prune_block(block, inputs, block_args, request, index=i, name=f"{prefix}.{i}")
        torch.testing.assert_close(inputs, reference[i][1], rtol=1e-5, atol=1e-5)
        assert report.reconstruction_error == pytest.approx(0.0, abs=1e-6)


def test_model_without_decoder_blocks_is_a_clear_error():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    with pytest.raises(TopiaryError, match="no decoder blocks found in Sequential"):
        find_blocks(model)
    plain_list = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])  # linears, not blocks of linears
    with pytest.raises(BlockDiscoveryError):
        find_blocks(nn.ModuleDict({"layers": plain_list}))


def test_capture_rejects_bad_calibration_tensor():
    model = tiny_model("llama")
    with pytest.raises(TopiaryError, match="LongTensor of shape"):
        capture_inputs(model, torch.zeros(4, 16))


class _ToyBlock(nn.Module):
    """A block that returns a tuple and takes a keyword argument, like older HF layers."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, hidden, scale=None):
        return hidden + scale * self.fc(hidden), None


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.stack = nn.ModuleList([_ToyBlock(), _ToyBlock()])
        self.head = nn.Linear(8, 10)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, use_cache=False):
        h = self.emb(input_ids)
        for block in self.stack:
            h = block(h, scale=torch.tensor(0.5))[0]
        return self.head(h)


def test_generic_model_with_tuple_outputs():
    from modules.engine.request import PruneRequest
    from modules.pruning.sparsity import parse_spec
    from tests.engine.oracle import prune_model

    torch.manual_seed(0)
    model = _Toy()
    head = model.head.weight.detach().clone()
    prefix, blocks = find_blocks(model)
    assert prefix == "stack"
    ids = torch.randint(0, 10, (4, 6))
    inputs, block_args = capture_inputs(model, ids, blocks)
    assert block_args.kwargs["scale"] == 0.5
    with torch.no_grad():
        expected = blocks[1](blocks[0](model.emb(ids), scale=0.5)[0], scale=0.5)[0]
        torch.testing.assert_close(
            run_block(blocks[1], run_block(blocks[0], inputs, block_args), block_args), expected
        )
    report = prune_model(model, ids, PruneRequest("magnitude", parse_spec(0.25)))
    assert [b.name for b in report.blocks] == ["stack.0", "stack.1"]
    assert all(int((b.fc.weight == 0).sum()) == 16 for b in blocks)
    torch.testing.assert_close(model.head.weight, head, rtol=0, atol=0)
