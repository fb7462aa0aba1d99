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
            assert t.numpy().tobytes() == old.numpy().tobytes(), f"{key} was left alone: same bytes"
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


def _fp8_checkpoint(src: Path, dst: Path) -> Path:
    """``src`` with every block matrix stored FP8 e4m3 beside its 128x128 ``weight_scale_inv``,
    config.json saying so (DeepSeek-V3's published layout)."""
    dst.mkdir()
    tensors = {}
    for key, t in load_file(src / "model.safetensors").items():
        if key.startswith("model.layers.") and key.endswith("proj.weight") and t.dim() == 2:
            scale = t.abs().amax().clamp(min=1e-12) / 448
            tensors[key] = (t / scale).to(torch.float8_e4m3fn)
            blocks = (-(-t.shape[0] // 128), -(-t.shape[1] // 128))
            tensors[key.replace(".weight", ".weight_scale_inv")] = torch.full(blocks, float(scale))
        else:
            tensors[key] = t
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(config))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "generation")):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


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


def test_quantized_checkpoints_are_refused_first_naming_the_format(tiny, text, tmp_path, capsys):
    """FP8 (DeepSeek-V3, Kimi-K2) and MXFP4 (gpt-oss): exit 2, one line naming the format, nothing
    written."""
    cases = {
        "FP8 block-scaled": _fp8_checkpoint(tiny["deepseek_v3"], tmp_path / "fp8"),
        "MXFP4": _mxfp4_checkpoint(tmp_path / "mxfp4"),
    }
    for fmt, folder in cases.items():
        out = tmp_path / f"out-{folder.name}"
        assert _prune(folder, text, out, "--sparsity", "0.5") == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"holds {fmt} weights" in lines[0], lines
        assert not out.exists() and not Path(f"{out}-work").exists()


def test_the_streamed_reader_never_reads_fp8_as_plain(tiny, tmp_path):
    """The engine's own entry (no preflight): an FP8 checkpoint is refused before any tensor is read."""
    from modules.engine.streaming import CheckpointReader, skeleton
    from modules.errors import TopiaryError

    folder = _fp8_checkpoint(tiny["deepseek_v3"], tmp_path / "fp8")
    model = skeleton(folder)
    with pytest.raises(TopiaryError, match="FP8 block-scaled"):
        CheckpointReader(folder, model)
