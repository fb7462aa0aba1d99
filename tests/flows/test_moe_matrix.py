"""Issue 24's matrix: every architecture x every method x (50%, 2:4) through ``topiary prune``.

Tiny random checkpoints of :data:`tests.helpers.TINY_ARCHS` (six mixtures of experts, six dense
models; 2 blocks, hidden 64, written by ``save_pretrained``). Each run is checked from the saved
tensors, not from the report: every weight matrix of the blocks but the routers (each expert's
matrix of a fused tensor, each per-expert tensor, each linear) holds exactly half zeros, or two
zeros in every group of four of its inputs; the routers are byte-identical to the input; the
printed achieved sparsity is the saved one; ``from_pretrained`` loads the output with no
missing or unexpected key and gives a finite perplexity.

The fast tier runs one row per architecture, the twelve (method, setting) pairs dealt one to
each, so that it covers every method and both settings; the rest is marked slow.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.cli import main
from tests.helpers import TINY_ARCHS, save_tiny

METHODS = ("magnitude", "wanda", "sparsegpt", "gblm", "admm", "admm-grad")
SETTINGS = {"0.5": ("--sparsity", "0.5"), "2:4": ("--pattern", "2:4")}
PAIRS = [(m, s) for s in SETTINGS for m in METHODS]
FAST = dict(zip(TINY_ARCHS, PAIRS, strict=True))  # architecture -> its fast row
MOE = {"gpt_oss", "llama4_text", "mixtral", "qwen3_moe", "olmoe"}  # and deepseek_v3, block 0 dense
TRANSPOSED = {"gpt_oss", "llama4_text"}  # fused expert tensors saved as (experts, in, out)
ROUTER = re.compile(r"\.(gate|router)\.weight$")


def _cases():
    for arch in TINY_ARCHS:
        for pair in PAIRS:
            marks = () if FAST[arch] == pair else (pytest.mark.slow,)
            yield pytest.param(arch, *pair, id=f"{arch}-{pair[0]}-{pair[1]}", marks=marks)


@pytest.fixture(scope="module")
def one_thread():
    """One BLAS thread: these matrices are tiny, and two threads on a loaded machine are ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``model_type -> folder``, each tiny checkpoint written once, when first asked for."""
    root, made = tmp_path_factory.mktemp("matrix"), {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = save_tiny(arch, root / arch)
        return made[arch]

    return get


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("matrix-data") / "calib.txt"
    path.write_text(Path("modules/process.py").read_text())
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _matrices(name: str, t: torch.Tensor, transposed: bool) -> list[torch.Tensor]:
    """The ``(out, in)`` matrices a block parameter holds: itself, or each expert's of a fused one."""
    if t.dim() == 2:
        return [t]
    return [t[e].T if transposed else t[e] for e in range(t.shape[0])]


def _check_pruned(name: str, W: torch.Tensor, setting: str) -> None:
    zeros = W == 0
    if setting == "2:4":
        groups = zeros.reshape(W.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), f"{name}: not 2:4 along its inputs"
    else:
        assert int(zeros.sum()) == W.numel() // 2, f"{name}: {int(zeros.sum())} zeros of {W.numel()}"


def _block_zeros(after: dict[str, torch.Tensor]) -> float:
    blocks = [
        t for k, t in after.items() if k.startswith("model.layers.") and t.dim() >= 2 and "bias" not in k
    ]
    return sum(t.numel() - int(torch.count_nonzero(t)) for t in blocks) / sum(t.numel() for t in blocks)


@pytest.mark.parametrize(("arch", "method", "setting"), list(_cases()))
def test_every_matrix_is_pruned_to_the_target_and_the_output_loads(
    arch, method, setting, checkpoints, calib, tmp_path, capsys, one_thread
):
    from transformers import AutoModelForCausalLM

    src, out = checkpoints(arch), tmp_path / "out"
    argv = ["prune", str(src), "--method", method, *SETTINGS[setting], "--calib", str(calib)]
    argv += ["--nsamples", "4", "--seqlen", "32", "--output", str(out), "--work-dir", str(tmp_path / "work")]
    if method in ("admm", "admm-grad"):  # fewer iterations: the masks' sparsity does not depend on them
        argv += ["--option", "iters=4"] + (["--option", "ks=2"] if method == "admm-grad" else [])
    assert main(argv) == 0
    printed = re.search(r"achieved sparsity (\d\.\d+)", capsys.readouterr().out).group(1)
    before, after = _tensors(src), _tensors(out)
    assert float(printed) == pytest.approx(_block_zeros(after), abs=5e-5), (
        "the printed figure is the saved one"
    )
    routers = [k for k in after if k.startswith("model.layers.") and ROUTER.search(k)]
    assert all(torch.equal(after[k], before[k]) for k in routers), "routers stay dense, byte for byte"
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    pruned = 0  # on the saved tensors as transformers holds them: Mixtral's w1 and w3 are one matrix
    for name, t in model.model.layers.named_parameters():
        if t.dim() >= 2 and not name.endswith("bias") and not ROUTER.search(f".{name}"):
            for W in _matrices(name, t.detach(), arch in TRANSPOSED):
                _check_pruned(name, W, setting)
                pruned += 1
    assert pruned >= 8, "every block's attention and MLP (or experts) matrices"
    assert len(routers) == (2 if arch in MOE else 1 if arch == "deepseek_v3" else 0)
    ids = torch.arange(1, 65)[None] * 37 % 4000
    with torch.no_grad():
        assert math.isfinite(math.exp(float(model(ids, labels=ids).loss))), "finite perplexity"
