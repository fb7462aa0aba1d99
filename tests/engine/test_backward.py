"""The block-wise backward gives the whole-model pass's GBLM gradient aggregates."""

from __future__ import annotations

import copy
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from modules.engine.backward import blockwise_gradients
from modules.engine.blocks import dense_weights, find_blocks
from modules.engine.gradients import compute_gradients, gradient_weights, load_block_grads
from modules.errors import TopiaryError
from tests import helpers

VOCAB, N, SEQLEN = 97, 3, 16


@pytest.fixture(scope="module")
def trainer():
    from modules.engine.statistics import make_trainer

    return make_trainer("cpu")


def tiny_mistral(seed: int = 0) -> nn.Module:
    """Mistral with GQA and a sliding window shorter than the windows, so the mask matters."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=6,
    )
    torch.manual_seed(seed)
    return MistralForCausalLM(cfg).eval()


def tiny_opt(seed: int = 0) -> nn.Module:
    return helpers.tiny_opt(VOCAB, seed=seed)


def tiny_granite() -> nn.Module:
    """Granite divides its logits by ``logits_scaling`` after the head."""
    from transformers import GraniteConfig, GraniteForCausalLM

    cfg = GraniteConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        logits_scaling=4.0,
    )
    torch.manual_seed(0)
    return GraniteForCausalLM(cfg).eval()


def tiny_moe(model_type: str) -> nn.Module:
    """A tiny mixture of experts of :data:`tests.helpers.TINY_ARCHS` (fused experts)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(helpers.tiny_config(model_type), dtype=torch.float32).eval()


def random_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (N, SEQLEN), generator=torch.Generator().manual_seed(seed))


def assert_same_gradients(model: nn.Module, got: Path, expected: Path) -> None:
    """Every block's file holds the same keys and, to fp32 tolerance, the same aggregates."""
    _, blocks = find_blocks(model)
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in expected.iterdir())
    for i, block in enumerate(blocks):
        ours, theirs = load_block_grads(got, i), load_block_grads(expected, i)
        assert set(ours) == set(theirs) == set(gradient_weights(block, dense_weights(model)))
        for name, g in ours.items():
            assert g.dtype == torch.float32 and g.abs().max() > 0, name
            # Same operations as the whole-model pass, block by block: only float rounding differs.
            torch.testing.assert_close(g, theirs[name], rtol=1e-5, atol=1e-7, msg=f"block {i} {name}")


@pytest.mark.parametrize(
    "build",
    [
        lambda: tiny_mistral(),
        lambda: helpers.tiny_llama(VOCAB, layers=3, kv_heads=2, tie=True),
        lambda: tiny_opt(),
        lambda: helpers.gemma2_capped(VOCAB, 64),
        tiny_granite,
        lambda: tiny_moe("mixtral"),
        lambda: tiny_moe("gpt_oss"),
        lambda: tiny_moe("llama4_text"),
    ],
    ids=[
        "mistral-sliding",
        "llama-tied",
        "opt",
        "gemma2-softcapped",
        "granite-scaled",
        "mixtral",
        "gpt-oss",
        "llama4",
    ],
)
def test_matches_whole_model_pass(build, tmp_path, trainer):
    model, ids = build(), random_ids()
    compute_gradients(model, ids, tmp_path / "whole", trainer=trainer)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    blockwise_gradients(model, ids, tmp_path / "blocks")
    assert_same_gradients(model, tmp_path / "blocks", tmp_path / "whole")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_embedded_model_on_text(tmp_path, trainer):
    from modules.engine.models import load_model

    try:
        model, tok = load_model("embedded", device="cpu")
    except FileNotFoundError as err:
        pytest.skip(f"embedded reference model not built yet: {err}")
    import modules.engine.blocks

    stream = tok(Path(modules.engine.blocks.__file__).read_text(), return_tensors="pt").input_ids[0]
    ids = stream[: 3 * 32].reshape(3, 32)
    compute_gradients(model, ids, tmp_path / "whole", trainer=trainer)
    blockwise_gradients(model, ids, tmp_path / "blocks")
    assert_same_gradients(model, tmp_path / "blocks", tmp_path / "whole")


def test_streams_blocks_into_a_meta_skeleton(tmp_path, trainer):
    """The model's blocks are a skeleton on the meta device; a loader materialises one at a time.

    When block i is loaded, at most the previous one is still referenced (a sweep that
    kept its blocks for the way back would hold them all).
    """
    model, ids = tiny_mistral(seed=3), random_ids(seed=4)
    compute_gradients(model, ids, tmp_path / "whole", trainer=trainer)
    _, blocks = find_blocks(model)
    saved = [copy.deepcopy(b.state_dict()) for b in blocks]
    blocks.to("meta")
    calls: list[int] = []
    live: weakref.WeakSet[nn.Module] = weakref.WeakSet()
    most_live = 0

    def load_block(i: int) -> nn.Module:
        nonlocal most_live
        calls.append(i)
        most_live = max(most_live, len(live))
        block = copy.deepcopy(blocks[i])
        block.load_state_dict(saved[i], assign=True)
        live.add(block)
        return block

    blockwise_gradients(model, ids, tmp_path / "blocks", load_block=load_block)
    assert calls == [0, 1, 2, 2, 1, 0], "each block is loaded once per sweep, top down on the way back"
    assert most_live <= 1, f"{most_live} loaded blocks still alive when the next was loaded"
    assert_same_gradients(model, tmp_path / "blocks", tmp_path / "whole")


def test_refuses_what_it_cannot_compute(tmp_path):
    """Bad windows, a model without an LM head: one error each, no files."""
    model = helpers.tiny_llama(VOCAB)
    with pytest.raises(TopiaryError, match="LongTensor of shape"):
        blockwise_gradients(model, torch.zeros(2, 8), tmp_path)
    model.lm_head = None
    with pytest.raises(TopiaryError, match="has no LM head"):
        blockwise_gradients(model, torch.zeros(2, 8, dtype=torch.long), tmp_path)
    assert not any(tmp_path.iterdir()), "nothing written"


def _grads(folder: Path, blocks: int) -> list[dict[str, torch.Tensor]]:
    return [load_block_grads(folder, i) for i in range(blocks)]


def _same(got: list[dict], expected: list[dict]) -> bool:
    """Bit for bit: the same keys and equal tensors, block by block."""
    return [g.keys() for g in got] == [e.keys() for e in expected] and all(
        torch.equal(g[k], e[k]) for g, e in zip(got, expected, strict=True) for k in g
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_kept_by_segment_on_disk_give_the_in_memory_gradients(tmp_path, dtype):
    """``in_memory=False``: only each segment's first inputs are kept (in files) between the
    sweeps, the backward recomputes a segment's others into files: bit for bit the in-memory
    result, and the disk holds at most a segment and the segments' first blocks."""
    import modules.engine.backward as backward

    model, ids = helpers.tiny_llama(VOCAB, layers=5, kv_heads=2).to(dtype), random_ids(seed=5)
    blockwise_gradients(model, ids, tmp_path / "memory")
    state, seen = tmp_path / "state", []
    original = backward._block_gradients

    def spy(*args, **kwargs):
        seen.append(sorted(p.name for p in state.glob("inputs-*")))
        return original(*args, **kwargs)

    backward._block_gradients = spy
    try:
        blockwise_gradients(model, ids, tmp_path / "disk", state=state, in_memory=False)
    finally:
        backward._block_gradients = original
    # 5 blocks, segments of 3: [0, 1, 2] and [3, 4]. The top segment is kept by the forward
    # sweep; block 2's needs [0, 1, 2] recomputed from block 0's inputs.
    names = lambda *blocks: [f"inputs-{j:04d}.bin" for j in blocks]  # noqa: E731
    assert seen == [names(0, 3, 4), names(0, 3), names(0, 1, 2), names(0, 1), names(0)]
    assert not any(state.iterdir()), "the state outlived the call"
    assert _same(_grads(tmp_path / "disk", 5), _grads(tmp_path / "memory", 5))


@pytest.mark.parametrize("layers", [4, 9, 10])
@pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "disk"])
def test_the_state_holds_no_more_files_than_topiary_plan_says(tmp_path, monkeypatch, layers, in_memory):
    """``topiary plan`` prints the most block inputs the backward keeps on disk; the real
    backward's state folder never holds more (nor fewer than one segment's worth)."""
    import modules.engine.backward as backward
    from modules.engine.plan import gradient_files

    model, ids = helpers.tiny_llama(VOCAB, layers=layers, kv_heads=2), random_ids(seed=8)
    state, most = tmp_path / "state", [0]
    original = backward._write_raw

    def counted(tensor, path):
        original(tensor, path)
        most[0] = max(most[0], len(list(state.glob("*.bin"))))

    monkeypatch.setattr(backward, "_write_raw", counted)
    blockwise_gradients(model, ids, tmp_path / "g", state=state, in_memory=in_memory)
    every, planned = gradient_files(layers, in_memory)
    assert every < most[0] <= planned


class Killed(Exception):
    """What the test's ``load_block`` raises in place of a kill."""


@pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "disk"])
@pytest.mark.parametrize(
    ("kill", "resumed"),
    [
        ((3, 1), "the forward sweep at block 4/7"),
        ((6, 2), "the backward at block 7/7"),
        ((4, 2), "the backward at block 6/7"),
        ((1, 2), "the backward at block 3/7"),  # the latest progress, not the first segment's
    ],  # fmt: skip
    ids=["forward-block-4", "backward-block-7", "backward-block-5", "backward-block-2"],
)
def test_a_killed_backward_resumes_from_its_state_to_the_same_bytes(
    tmp_path, caplog, in_memory, kill, resumed
):
    """Killed when block ``kill[0]`` is loaded for the ``kill[1]``-th time (7 blocks, segments
    of 3; the second loads are the backward's), the same call on the same state says where
    it resumes, loads fewer blocks than a whole run, and writes an uninterrupted run's bytes."""
    model, ids = helpers.tiny_llama(VOCAB, layers=7, kv_heads=2), random_ids(seed=7)
    _, blocks = find_blocks(model)
    blockwise_gradients(model, ids, tmp_path / "whole")
    loads: list[int] = []

    def load_block(i: int, kill: tuple[int, int] | None = None) -> nn.Module:
        loads.append(i)
        if kill == (i, loads.count(i)):
            raise Killed
        return blocks[i]

    state = tmp_path / "state"
    kwargs = {"state": state, "in_memory": in_memory}
    blockwise_gradients(model, ids, tmp_path / "full", load_block=load_block, **kwargs)
    whole_run = len(loads)
    loads.clear()
    with pytest.raises(Killed):
        blockwise_gradients(model, ids, tmp_path / "run", load_block=lambda i: load_block(i, kill), **kwargs)
    loads.clear()
    with caplog.at_level("INFO", logger="topiary"):
        blockwise_gradients(model, ids, tmp_path / "run", load_block=load_block, **kwargs)
    assert f"gradients: resuming {resumed}" in caplog.text
    assert len(loads) < whole_run, loads
    expected = _grads(tmp_path / "whole", 7)
    assert _same(_grads(tmp_path / "full", 7), expected)
    assert _same(_grads(tmp_path / "run", 7), expected)
    assert not list(state.glob("inputs-*")), "block inputs outlived the backward"


def test_streamed_gradients_keep_the_inputs_on_disk_when_asked_and_leave_nothing(tmp_path, monkeypatch):
    import modules.engine.backward as backward
    from modules.engine.passes import gradients

    model = helpers.tiny_llama(VOCAB, layers=3, kv_heads=2)
    model.save_pretrained(tmp_path / "ckpt")
    ids = random_ids(seed=6)
    written: list[str] = []
    original = backward._write_raw
    monkeypatch.setattr(
        backward, "_write_raw", lambda t, path: written.append(path.name) or original(t, path)
    )
    gradients(str(tmp_path / "ckpt"), "float32", "cpu", ids, tmp_path / "g" / "memory", activations="memory")
    assert written == []  # no resume state asked for: nothing but the gradients
    gradients(str(tmp_path / "ckpt"), "float32", "cpu", ids, tmp_path / "g" / "mmap", activations="mmap")
    # 3 blocks, segments of 2: the forward sweep keeps blocks 0 and 2's inputs, the backward
    # saves its progress after the top segment and recomputes block 1's inputs.
    assert written == [
        "inputs-0000.bin",
        "inputs-0002.bin",
        "upstream-0003.bin",
        "upstream-0002.bin",
        "inputs-0001.bin",
    ]
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["memory", "mmap"]  # no state folder left
    assert_same_gradients(model, tmp_path / "g" / "mmap", tmp_path / "g" / "memory")


def test_a_kept_input_is_read_back_and_not_held_in_memory(tmp_path):
    """What ``_mapped`` returns reads the file back; it must not keep the tensor that was
    written alive (a 70B block's inputs are 4.3 GB: keeping every segment's would hold them all)."""
    import gc

    from modules.engine.backward import _mapped, _write_raw

    hidden = torch.randn(3, 5, 4, dtype=torch.bfloat16)
    expected, alive = hidden.clone(), weakref.ref(hidden)
    _write_raw(hidden, tmp_path / "inputs-0000.bin")
    back = _mapped(tmp_path / "inputs-0000.bin", torch.empty_like(hidden, device="meta"))
    del hidden
    gc.collect()
    assert alive() is None, "the written tensor is still held"
    assert torch.equal(back(), expected)
