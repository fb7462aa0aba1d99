"""Checkpoints of mixtures of experts as they are on the Hub (issue 24): read through transformers'
conversion rules, written back in the layout read; quantized ones refused first.

Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V3 store one matrix per expert on disk
(``experts.<e>.w1/w2/w3`` or ``gate_proj/up_proj/down_proj``) that transformers fuses into
``experts.gate_up_proj`` / ``down_proj`` at load. Tiny random checkpoints (``save_pretrained``,
2 blocks, 4 experts) are built once per session.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.cli import main
from tests.helpers import save_tiny

PER_EXPERT = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"]
EXPERT = re.compile(r"\.experts\.\d+\.")
ROUTER = re.compile(r"\.(block_sparse_moe|mlp)\.gate\.weight$")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-layouts")
    found = {name: save_tiny(name, root / name) for name in PER_EXPERT}
    # 12 experts: a key order by string (expert 10 before 2) would put experts at the wrong index
    found["mixtral-12"] = save_tiny("mixtral", root / "mixtral-12", num_local_experts=12)
    found["mixtral-fused"] = _fused_on_disk(found["mixtral"], root / "mixtral-fused")
    return found


@pytest.fixture(scope="session")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("layouts-data") / "calib.txt"
    path.write_text("Return the sum of a and b, raising TypeError for strings.\n" * 200)
    return path


def _fused_on_disk(src: Path, dst: Path) -> Path:
    """``src`` saved under the model's own names (fused 3-D experts), as ``from_pretrained`` holds it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    dst.mkdir()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix == ".json" or f.name.startswith("tokenizer"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in folder.glob("model*.safetensors") for k, v in load_file(f).items()}


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code)


def _prune(model: Path, text: Path, out: Path, *setting: str, method: str = "magnitude") -> int:
    argv = ["prune", str(model), "--method", method, *setting, "--calib", str(text)]
    argv += ["--nsamples", "8", "--seqlen", "64", "--output", str(out), "--work-dir", f"{out}-work"]
    return _run(argv)


@pytest.mark.parametrize("name", [*PER_EXPERT, "mixtral-12"])
def test_the_streamed_reader_builds_what_from_pretrained_loads(name, tiny):
    """Every model tensor, per-expert ones fused through transformers' rules, equals from_pretrained's."""
    from transformers import AutoModelForCausalLM

    from modules.engine.streaming import CheckpointReader, skeleton

    reference = AutoModelForCausalLM.from_pretrained(tiny[name], dtype=torch.float32).state_dict()
    model = skeleton(tiny[name])
    with CheckpointReader(tiny[name], model) as reader:
        assert reader.layout.merged and not reader.layout.lacking and not reader.layout.unread
        for key, like in model.state_dict().items():
            assert torch.equal(reader.tensor(key, like), reference[key]), key


def _expert_matrices(after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each expert's two matrices as the model holds them, ``(out, in)``: gate and up stacked (w1
    and w3 of one expert are one matrix to transformers, hence to the prune), and down."""
    found: dict[str, list[torch.Tensor]] = {}
    for key, t in sorted(after.items()):
        if t.dim() == 3 and "experts" in key:  # fused on disk: (experts, out, in)
            found |= {f"{key}[{e}]": [m] for e, m in enumerate(t)}
        elif EXPERT.search(key):
            role = "down" if re.search(r"\.(w2|down_proj)\.", key) else "gate_up"
            found.setdefault(f"{key[: EXPERT.search(key).end()]}{role}", []).append(t)
    return {k: torch.cat(ts) for k, ts in found.items()}


@pytest.mark.parametrize("setting", [("--sparsity", "0.5"), ("--pattern", "2:4")], ids=["0.5", "2:4"])
@pytest.mark.parametrize("name", [*PER_EXPERT, "mixtral-fused"])
def test_magnitude_prunes_every_expert_and_writes_the_layout_read(
    name, setting, tiny, text, tmp_path, capsys
):
    """Counted from the saved tensors: each expert's matrix at the target; the output holds the input's
    names (per-expert in, per-expert out; fused in, fused out), every tensor the prune left alone
    byte-identical, every pruned one equal to the input where it is not zero; it loads."""
    from transformers import AutoModelForCausalLM

    src, out = tiny[name], tmp_path / "out"
    assert _prune(src, text, out, *setting) == 0, capsys.readouterr().err
    printed = re.search(r"achieved sparsity (\d\.\d+)", capsys.readouterr().out).group(1)
    before, after = _tensors(src), _tensors(out)
    assert set(after) == set(before), "the output must keep the checkpoint's layout"
    experts = _expert_matrices(after)
    assert len(experts) == 2 * 4 * (1 if name == "deepseek_v3" else 2)  # DeepSeek-V3's block 0 is dense
    for key, W in experts.items():
        if setting[0] == "--pattern":
            assert bool(((W.reshape(W.shape[0], -1, 4) == 0).sum(-1) == 2).all()), f"{key}: not 2:4"
        else:
            assert int((W == 0).sum()) == W.numel() // 2, key
    for key, t in after.items():
        old = before[key]
        assert t.dtype == old.dtype and t.shape == old.shape, key
        if ROUTER.search(key) or t.dim() < 2 or not key.startswith("model.layers."):
            assert _bytes(t) == _bytes(old), f"{key} was left alone: same bytes"
        else:
            assert torch.equal(t[t != 0], old[t != 0]), f"{key}: kept weights must be the input's"
    blocks = [v for k, v in after.items() if k.startswith("model.layers.") and v.dim() >= 2]
    zeros, total = sum(int((v == 0).sum()) for v in blocks), sum(v.numel() for v in blocks)
    assert float(printed) == pytest.approx(zeros / total, abs=5e-5)
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert bool(torch.isfinite(model(torch.arange(1, 17)[None]).logits).all())


@pytest.mark.parametrize("name", PER_EXPERT)
def test_the_pruned_output_gives_a_finite_perplexity(name, tiny, text, tmp_path, capsys):
    out = tmp_path / "out"
    assert _prune(tiny[name], text, out, "--sparsity", "0.5") == 0
    capsys.readouterr()
    assert _run(["eval", "ppl", str(out), "--data", str(text), "--seqlen", "32"]) == 0
    ppl = float(re.search(r"ppl (\S+) ", capsys.readouterr().out).group(1))
    assert ppl == ppl and 1 < ppl < float("inf")


BLOCK = (24, 40)  # published checkpoints use 128x128; here the tiny matrices hold several, some partial


def _blocks_of(t: torch.Tensor):
    for i in range(0, t.shape[0], BLOCK[0]):
        for j in range(0, t.shape[1], BLOCK[1]):
            yield i // BLOCK[0], j // BLOCK[1], (slice(i, i + BLOCK[0]), slice(j, j + BLOCK[1]))


def _fp8_checkpoint(src: Path, dst: Path) -> Path:
    """``src`` as DeepSeek-V3 and Kimi-K2 publish it: every linear weight of the blocks FP8 e4m3
    beside its per-block ``weight_scale_inv`` (one scale per block, its amax over 448), the other
    tensors bf16, config.json's ``quantization_config`` ``fp8``."""
    dst.mkdir()
    tensors = {}
    for key, t in load_file(src / "model.safetensors").items():
        if key.startswith("model.layers.") and key.endswith(("proj.weight", "mqa.weight")):
            grid = (-(-t.shape[0] // BLOCK[0]), -(-t.shape[1] // BLOCK[1]))
            scale, q = torch.empty(grid), torch.empty(t.shape, dtype=torch.float8_e4m3fn)
            for r, c, at in _blocks_of(t):
                scale[r, c] = t[at].abs().amax().clamp(min=1e-12) / 448
                q[at] = (t[at] / scale[r, c]).to(torch.float8_e4m3fn)
            tensors[key], tensors[f"{key}_scale_inv"] = q, scale
        else:
            tensors[key] = t.to(torch.bfloat16)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK)}
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "generation")):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape)
    for r, c, at in _blocks_of(q):
        out[at] = q[at].float() * scale[r, c]
    return out


def test_an_fp8_checkpoint_is_dequantized_pruned_and_written_in_bf16(tiny, text, tmp_path, capsys):
    """Each FP8 weight read as its values (block by block times its scale), pruned, written bf16
    under its own name without scales; the bf16 tensors left alone keep their bytes; the config
    names no quantization, the report says what was dequantized; the output loads and runs."""
    from transformers import AutoModelForCausalLM

    src, out = _fp8_checkpoint(tiny["deepseek_v3"], tmp_path / "fp8"), tmp_path / "out"
    assert _prune(src, text, out, "--sparsity", "0.5", "--dtype", "bfloat16") == 0, capsys.readouterr().err
    before, after = _tensors(src), _tensors(out)
    assert set(after) == {k for k in before if not k.endswith("_scale_inv")}
    for key, t in after.items():
        assert t.dtype == torch.bfloat16, key
        if f"{key}_scale_inv" in before:
            values = _dequantized(before[key], before[f"{key}_scale_inv"]).to(torch.bfloat16)
            assert torch.equal(t[t != 0], values[t != 0]), f"{key}: kept weights must be the FP8 values"
        else:
            assert _bytes(t) == _bytes(before[key]), f"{key} was left alone: same bytes"
    experts = _expert_matrices(after)
    assert len(experts) == 2 * 4 and all(int((W == 0).sum()) == W.numel() // 2 for W in experts.values())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["dequantized"] == "FP8 weights with 24x40 block scales, dequantized, written as bfloat16"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()) and model.dtype == torch.bfloat16, info
    assert bool(torch.isfinite(model(torch.arange(1, 17)[None]).logits).all())


def _mxfp4_checkpoint(dst: Path) -> Path:
    """A tiny gpt-oss whose experts are stored as MXFP4 ``_blocks`` / ``_scales`` (uint8), as published."""
    src = save_tiny("gpt_oss", dst.with_name("gpt-oss-plain"))
    dst.mkdir()
    tensors = {}
    for key, t in load_file(src / "model.safetensors").items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, rows, cols = t.shape
            tensors[f"{key}_blocks"] = torch.zeros(e, cols, rows // 32, 16, dtype=torch.uint8)
            tensors[f"{key}_scales"] = torch.full((e, cols, rows // 32), 127, dtype=torch.uint8)
        else:
            tensors[key] = t
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "generation")):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _without(src: Path, dst: Path, drop: str) -> Path:
    """A copy of checkpoint folder ``src`` without tensor ``drop``."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    del tensors[drop]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_quantized_checkpoints_it_cannot_read_are_refused_first_naming_the_format(
    tiny, text, tmp_path, capsys
):
    """MXFP4 (gpt-oss), and an FP8 weight without its scales: exit 2, one line naming the format,
    nothing written."""
    fp8 = _fp8_checkpoint(tiny["deepseek_v3"], tmp_path / "fp8")
    cases = {
        "MXFP4 weights": _mxfp4_checkpoint(tmp_path / "mxfp4"),
        "FP8 block-scaled weights": _without(
            fp8, tmp_path / "fp8-lacking", "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"
        ),
    }
    capsys.readouterr()
    for needle, folder in cases.items():
        out = tmp_path / f"out-{folder.name}"
        assert _prune(folder, text, out, "--sparsity", "0.5") == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"holds {needle}" in lines[0], lines
        assert not out.exists() and not Path(f"{out}-work").exists()


def test_the_streamed_reader_never_reads_a_quantized_tensor_as_plain(tmp_path):
    """The engine's own entry (no preflight): an MXFP4 checkpoint is refused before any tensor is read."""
    from modules.engine.streaming import CheckpointReader, skeleton
    from modules.errors import TopiaryError

    folder = _mxfp4_checkpoint(tmp_path / "mxfp4")
    with pytest.raises(TopiaryError, match="holds MXFP4 weights"):
        CheckpointReader(folder, skeleton(folder))
