"""Perplexity equals exp(mean token NLL) computed independently, whatever the batch size."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks.bench_vocab import full_logits_window_nll
from modules.errors import TopiaryError
from modules.evaluation.perplexity import perplexity
from tests.helpers import gemma2_capped, tiny_llama

VOCAB, SEQLEN, N = 64, 12, 7


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, kv_heads=2, max_positions=32)


@pytest.fixture(scope="module")
def wins():
    return torch.randint(0, VOCAB, (N, SEQLEN), generator=torch.Generator().manual_seed(1))


def manual_nll(model, wins) -> float:
    """Mean NLL of every next token, gathered from log_softmax in fp64, one window at a time."""
    total = 0.0
    with torch.no_grad():
        for w in wins:
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), dim=-1)
            total += -logp.gather(1, w[1:, None]).sum().item()
    return total / (wins.shape[0] * (wins.shape[1] - 1))


def test_perplexity_is_exp_of_the_mean_token_nll(model, wins):
    report = perplexity(model, wins, batch_size=3, progress=False)
    nll = manual_nll(model, wins)
    assert report["nll"] == pytest.approx(nll, rel=1e-6)
    assert report["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
    # The model's own loss (mean over one window's targets); windows are equally long,
    # so the mean of the window losses is the mean over all tokens.
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in wins]
    assert report["nll"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def test_batch_size_does_not_change_the_result(model, wins):
    reports = [perplexity(model, wins, batch_size=b, progress=False) for b in (1, 2, 3, N, 64)]
    for r in reports[1:]:
        # fp32 logits of differently shaped batches may differ in the last bits
        assert r["nll"] == pytest.approx(reports[0]["nll"], rel=1e-6)
        assert r["tokens"] == reports[0]["tokens"]


def test_report_names_the_window_length(model, wins):
    report = perplexity(model, wins, batch_size=4, progress=False)
    assert report["seqlen"] == SEQLEN
    assert report["windows"] == N
    assert report["tokens"] == N * (SEQLEN - 1)
    assert report["ppl"] == pytest.approx(math.exp(report["nll"]), rel=1e-12)
    shorter = perplexity(model, wins[:, :6], batch_size=4, progress=False)
    assert shorter["seqlen"] == 6 and shorter["tokens"] == N * 5


def test_uniform_model_has_the_vocabulary_size_as_perplexity(model, wins):
    uniform = LlamaForCausalLM(model.config).eval()
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # all logits 0: every token has probability 1/VOCAB
    assert perplexity(uniform, wins, progress=False)["ppl"] == pytest.approx(VOCAB, rel=1e-6)


def test_training_mode_is_restored(model, wins):
    model.train()
    try:
        perplexity(model, wins[:2], progress=False)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("shape", [(0, SEQLEN), (3, 1), (SEQLEN,)])
def test_bad_window_shapes(model, shape):
    with pytest.raises(TopiaryError, match="windows: shape"):
        perplexity(model, torch.zeros(shape, dtype=torch.long), progress=False)


def test_window_nll_is_each_windows_summed_loss_in_order(model, wins):
    # The paired perplexity interval resamples windows: each entry must be that window's own
    # summed NLL, in window order, whatever the batching.
    report = perplexity(model, wins, batch_size=3, progress=False)
    assert len(report["window_nll"]) == N
    for w, got in zip(wins, report["window_nll"], strict=True):
        assert got == pytest.approx(manual_nll(model, w[None]) * (SEQLEN - 1), rel=1e-6)
    assert sum(report["window_nll"]) / report["tokens"] == pytest.approx(report["nll"], rel=1e-12)


# --------------------------------------------------------------------------- chunked head


def assert_same_nll(got: list[float], want: list[float]) -> None:
    # Same fp32 token NLLs summed in fp64 in the same order: equal to fp64 rounding.
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= 1e-12 * abs(w), (g, w)
    assert abs(math.fsum(got) - math.fsum(want)) <= 1e-12 * abs(math.fsum(want))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("positions", [1, 4, 5, SEQLEN - 1, 64])
def test_chunked_head_equals_the_full_logits_path(monkeypatch, model, wins, arch, positions):
    """Chunks of 1, 4, 5 (an uneven last chunk), all 11 scored positions, and more than a window."""
    import modules.evaluation.perplexity as ppl

    net = model if arch == "llama" else gemma2_capped(VOCAB, max_positions=32)
    monkeypatch.setattr(ppl, "HEAD_CHUNK_BYTES", positions * 3 * VOCAB * 4)  # batch 3
    assert ppl.head_chunk(3, VOCAB) == positions
    report = perplexity(net, wins, batch_size=3, progress=False)
    assert_same_nll(report["window_nll"], full_logits_window_nll(net, wins, 3))


def test_head_chunk_bounds_the_logits():
    from modules.evaluation.perplexity import HEAD_CHUNK_BYTES, head_chunk

    for batch, vocab in ((8, 262_144), (8, 128_256), (1, 49_152), (64, 262_144)):
        step = head_chunk(batch, vocab)
        assert step * batch * vocab * 4 <= HEAD_CHUNK_BYTES < (step + 1) * batch * vocab * 4
    assert head_chunk(1024, 262_144) == 1  # over the bound for one position: still one


def test_streamed_chunked_head_equals_the_full_logits_path(monkeypatch, tmp_path, wins):
    import modules.evaluation.perplexity as ppl
    from modules.evaluation.perplexity import perplexity_streamed

    net = gemma2_capped(VOCAB, max_positions=32)
    net.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(ppl, "HEAD_CHUNK_BYTES", 4 * 3 * VOCAB * 4)  # 4 positions at batch 3
    report = perplexity_streamed(tmp_path / "m", wins, batch_size=3, dtype=torch.float32)
    assert_same_nll(report["window_nll"], full_logits_window_nll(net, wins, 3))


# Architectures whose blocks return tuples or tensors, route to experts, or post-process the
# head's output (Cohere's logit scale, Granite's logits scaling, Gemma-3's soft-capping).
ARCHS = {
    "gpt_oss": {},
    "mixtral": {},
    "qwen3": {},
    "gemma3_text": dict(final_logit_softcapping=0.5),
    "cohere": dict(logit_scale=0.5),
    "granite": dict(logits_scaling=4.0),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_head_equals_the_full_logits_path_across_architectures(monkeypatch, wins, arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    import modules.evaluation.perplexity as ppl
    from tests.helpers import SMALL, TINY_ARCHS

    cfg = AutoConfig.for_model(arch, **{**SMALL, **TINY_ARCHS.get(arch, {}), **ARCHS[arch]}, vocab_size=VOCAB)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    monkeypatch.setattr(ppl, "HEAD_CHUNK_BYTES", 4 * 3 * VOCAB * 4)  # 4 positions at batch 3
    report = perplexity(net, wins, batch_size=3, progress=False)
    assert_same_nll(report["window_nll"], full_logits_window_nll(net, wins, 3))
