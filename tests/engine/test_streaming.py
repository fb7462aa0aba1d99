"""Streamed prune and perplexity equal the whole-model path, tensor for tensor and to 1e-6.

The reference is today's path: ``load_model`` -> ``prune_model`` -> ``save_pretrained``
(weights, config, generation config) and the tokenizer's ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modules.engine.loop import prune_checkpoint
from modules.engine.masks import save_block_masks
from modules.engine.models import load_model
from modules.engine.names import REFERENCE_DIR
from modules.engine.streaming import (
    INDEX_NAME,
    ActivationStore,
    CheckpointReader,
    ShardWriter,
    outer_modules,
    skeleton,
)
from modules.errors import TopiaryError
from modules.evaluation.perplexity import perplexity, perplexity_streamed
from modules.process import PAUSE_ENV
from modules.pruning.sparsity import parse_spec
from tests import helpers

ROOT = Path(__file__).resolve().parents[2]
SEQLEN, N = 32, 4
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def request_of(method: str, **options):
    from modules.engine.request import PruneRequest

    return PruneRequest(method, parse_spec(0.5, None), options=options)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bits (compared as bytes, so NaN and -0.0 count too)."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    """Windows of real text (this repository's Python), in the embedded model's vocabulary."""
    return helpers.text_windows(N, SEQLEN)


def save_tiny(folder: Path, dtype: torch.dtype, tie: bool = False) -> Path:
    """A 3-block LLaMA of the embedded vocabulary, saved like a Hub checkpoint with a tokenizer."""
    model = helpers.tiny_llama(4096, layers=3, max_positions=SEQLEN, tie=tie, seed=3, dtype=dtype)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE_DIR / name, folder / name)
    return folder


def save_opt(folder: Path) -> Path:
    """A 2-block OPT (learned positions, tied head, final norm inside the decoder)."""
    helpers.tiny_opt(4096, seed=4, max_positions=SEQLEN).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "fp16": save_tiny(root / "fp16", torch.float16),
        "fp32": save_tiny(root / "fp32", torch.float32),
        "opt": save_opt(root / "opt"),
    }


def in_memory(model_dir: str, out: Path, p, ids: torch.Tensor, dtype: str, grads_dir=None) -> Path:
    """Today's whole-model path."""
    from tests.engine.oracle import prune_model

    net, tok = load_model(model_dir, dtype, "cpu")
    prune_model(net, ids, p, grads_dir=grads_dir)
    net.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def assert_same_output(mem: Path, streamed: Path) -> None:
    assert_same_tensors(tensors(mem), tensors(streamed))
    for name in FILES:
        assert (mem / name).read_bytes() == (streamed / name).read_bytes(), name


@pytest.fixture(scope="module")
def embedded_wanda(tmp_path_factory, ids) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("wanda")
    mem = in_memory("embedded", root / "mem", request_of("wanda"), ids, "float32")
    report = prune_checkpoint("embedded", root / "streamed", request_of("wanda"), ids, activations="memory")
    return mem, root / "streamed", report


def test_streamed_wanda_equals_in_memory_and_writes_an_index(embedded_wanda, tmp_path):
    mem, streamed, report = embedded_wanda
    assert_same_output(mem, streamed)
    index = json.loads((streamed / INDEX_NAME).read_text())
    shards = sorted(p.name for p in streamed.glob("*.safetensors"))
    assert shards == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    assert sorted(set(index["weight_map"].values())) == shards
    assert sorted(index["weight_map"]) == sorted(tensors(mem))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(mem).values())
    # save_pretrained's count: the tied head once, whatever the skeleton's loads untied
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors(mem).values())
    assert report.num_blocks == 4 and report.phases["streaming"]["activations"] == "memory"
    weights = tensors(streamed)
    masks = sorted((streamed / "masks").iterdir())
    assert [m.name for m in masks] == [f"block_{i:04d}.safetensors" for i in range(4)]
    for i, path in enumerate(masks):  # each block's file holds its own linears' keep-masks
        keep = load_file(str(path))
        assert path.read_bytes() == save_block_masks(tmp_path, i, keep).read_bytes()
        assert keep and all(name.startswith(f"model.layers.{i}.") for name in keep), path.name
        for name, mask in keep.items():
            assert torch.equal(mask, weights[name] != 0), name


def test_only_one_block_is_held_at_a_time(embedded_wanda):
    """The most weights held at once: the capture step's (all but the head, and the first block)."""
    *_, report = embedded_wanda
    model = skeleton(REFERENCE_DIR)
    head = model.get_output_embeddings()
    capture = sum(
        t.numel() * t.element_size()
        for _, m in outer_modules(model, "model.layers")
        if m is not head
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    )
    assert (
        report.phases["streaming"]["peak_loaded_bytes"]
        == capture + report.phases["streaming"]["largest_block_bytes"]
    )


def test_streamed_output_loads_with_from_pretrained(embedded_wanda):
    from transformers import AutoModelForCausalLM

    mem, streamed, _ = embedded_wanda
    model, info = AutoModelForCausalLM.from_pretrained(streamed, output_loading_info=True)
    assert not any(info.values()), info
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_tensors(AutoModelForCausalLM.from_pretrained(mem).state_dict(), model.state_dict())


@pytest.mark.parametrize(
    ("model_name", "dtype", "method", "activations"),
    [
        ("embedded", "float32", "sparsegpt", "memory"),
        ("embedded", "float32", "magnitude", "memory"),
        ("embedded", "float32", "admm", "mmap"),
        ("fp16", "float16", "wanda", "mmap"),
        ("fp16", "float16", "sparsegpt", "memory"),
        ("fp32", "float32", "admm", "memory"),
        ("fp16", "float32", "magnitude", "memory"),  # an fp16 checkpoint pruned in fp32
        ("opt", "float32", "wanda", "memory"),
    ],
)
def test_streamed_prune_equals_in_memory(tmp_path, tiny, ids, model_name, dtype, method, activations):
    model_dir = str(tiny.get(model_name, model_name))
    p = request_of(method, iters=5) if method == "admm" else request_of(method)  # 5 ADMM steps keep it fast
    mem = in_memory(model_dir, tmp_path / "mem", p, ids, dtype)
    out = tmp_path / "streamed"
    report = prune_checkpoint(model_dir, out, p, ids, dtype=getattr(torch, dtype), activations=activations)
    assert_same_output(mem, out)
    assert report.phases["streaming"]["activations"] == (None if method == "magnitude" else activations)
    if method == "magnitude":  # data-free: no capture step, one block at a time
        assert (
            report.phases["streaming"]["peak_loaded_bytes"]
            == report.phases["streaming"]["largest_block_bytes"]
        )


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_streamed_true_sequential_equals_in_memory(tmp_path, tiny, ids, method):
    """Groups pruned in turn: each later group's statistics come from the block with the
    earlier groups' pruned weights applied."""
    from modules.engine.request import PruneRequest

    p = PruneRequest(method, parse_spec(0.5, None), true_sequential=True)
    mem = in_memory(str(tiny["fp32"]), tmp_path / "mem", p, ids, "float32")
    prune_checkpoint(tiny["fp32"], tmp_path / "streamed", p, ids, activations="mmap")
    assert_same_output(mem, tmp_path / "streamed")


def test_streamed_owl_equals_in_memory(tmp_path, tiny, ids):
    """OWL: a dense streamed pass for the per-block rates, then the pruning pass."""
    from modules.engine.request import PruneRequest
    from tests.engine.oracle import owl_block_rates

    p = PruneRequest("wanda", parse_spec(0.5, None), owl=True, owl_m=2.0)
    mem = in_memory(str(tiny["fp32"]), tmp_path / "mem", p, ids, "float32")
    report = prune_checkpoint(tiny["fp32"], tmp_path / "streamed", p, ids)
    assert_same_output(mem, tmp_path / "streamed")
    whole, _ = load_model(str(tiny["fp32"]), "float32", "cpu")
    ratios, rates = owl_block_rates(whole, ids, p)
    assert report.owl["ratios"] == ratios and report.owl["rates"] == rates
    assert len(set(rates)) > 1  # the blocks got different rates


def test_streamed_gblm_reads_the_gradients_folder(tmp_path, tiny, ids):
    from modules.engine.gradients import compute_gradients

    net, _ = load_model(str(tiny["fp32"]), "float32", "cpu")
    compute_gradients(net, ids, tmp_path / "grads")
    for name, p in {"gblm": request_of("gblm"), "admm": request_of("admm", iters=5, selector="gblm")}.items():
        mem = in_memory(str(tiny["fp32"]), tmp_path / name, p, ids, "float32", grads_dir=tmp_path / "grads")
        prune_checkpoint(tiny["fp32"], tmp_path / f"{name}-streamed", p, ids, grads_dir=tmp_path / "grads")
        assert_same_output(mem, tmp_path / f"{name}-streamed")
    p = request_of("gblm")
    with pytest.raises(TopiaryError, match="gradient"):
        prune_checkpoint(tiny["fp32"], tmp_path / "none", p, ids)


def test_streamed_perplexity_equals_in_memory(embedded_wanda, tiny, ids):
    """Dense embedded (tied head, one file), its streamed prune (index and shards), an untied
    fp32 LLaMA, an OPT."""
    _, streamed, _ = embedded_wanda
    cases = ((REFERENCE_DIR, "memory"), (streamed, "mmap"), (tiny["fp32"], "memory"), (tiny["opt"], "memory"))
    for folder, acts in cases:
        whole = perplexity(load_model(str(folder), "float32", "cpu")[0], ids, progress=False)
        streamed_ppl = perplexity_streamed(folder, ids, activations=acts, batch_size=3)
        # Same maths on the same windows; the batching of the blocks differs (3 vs 8).
        assert streamed_ppl["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)
        assert streamed_ppl["window_nll"] == pytest.approx(whole["window_nll"], rel=1e-6)
        assert streamed_ppl["tokens"] == whole["tokens"]


def test_rotary_buffers_match_from_pretrained(tiny):
    """Non-persistent buffers are not in the checkpoint: they are recomputed as from_pretrained does."""
    whole, _ = load_model(str(tiny["fp16"]), "float16", "cpu")
    model = skeleton(tiny["fp16"])
    with CheckpointReader(tiny["fp16"], model) as reader:
        reader.materialize(model.model.rotary_emb, "model.rotary_emb", "cpu")
        for name, buf in whole.model.rotary_emb.named_buffers():
            got = dict(model.model.rotary_emb.named_buffers())[name]
            assert got.dtype == buf.dtype and torch.equal(got, buf), name


def test_concurrent_prunes_of_one_checkpoint_in_threads_equal_their_serial_runs(tmp_path, tiny, ids):
    """Two sweep steps on one Dask or thread pool worker: each loads and frees its own blocks.

    With one skeleton per process, one run put a block back on the meta device while the
    other was computing with it (``Tensor on device cpu is not on the expected device meta``).
    """
    from concurrent.futures import ThreadPoolExecutor

    requests = {
        "wanda": request_of("wanda"),
        "sparsegpt": request_of("sparsegpt"),
        "magnitude": request_of("magnitude"),
    }
    serial, peaks = {}, {}
    for name, p in requests.items():
        report = prune_checkpoint(tiny["fp32"], tmp_path / "serial" / name, p, ids)
        serial[name] = tensors(tmp_path / "serial" / name)
        peaks[name] = report.phases["streaming"]["peak_loaded_bytes"]
    for attempt in range(2):  # the overlap is left to the scheduler: two tries
        with ThreadPoolExecutor(len(requests)) as pool:
            reports = {
                name: pool.submit(prune_checkpoint, tiny["fp32"], tmp_path / f"{attempt}" / name, p, ids)
                for name, p in requests.items()
            }
            reports = {name: r.result() for name, r in reports.items()}
        for name in requests:
            assert_same_tensors(serial[name], tensors(tmp_path / f"{attempt}" / name))
            # each run counts only what it loaded (a shared reader counted both runs' blocks)
            assert reports[name].phases["streaming"]["peak_loaded_bytes"] == peaks[name], name


def test_materialize_reads_one_module_and_release_frees_it():
    model = skeleton(REFERENCE_DIR)
    whole = load_file(str(REFERENCE_DIR / "model.safetensors"))
    with CheckpointReader(REFERENCE_DIR, model) as reader:
        reader.materialize(model.model.layers[2], "model.layers.2", "cpu")
        loaded = {n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "cpu"}
        assert loaded == {k for k in whole if k.startswith("model.layers.2.")}
        assert torch.equal(
            model.model.layers[2].mlp.down_proj.weight, whole["model.layers.2.mlp.down_proj.weight"]
        )
        reader.materialize(model.lm_head, "lm_head", "cpu")  # tied: read under embed_tokens' name
        assert torch.equal(model.lm_head.weight, whole["model.embed_tokens.weight"])
        assert model.model.embed_tokens.weight.device.type == "meta"
        reader.release(model.model.layers[2])
        reader.release(model.lm_head)
        assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
        assert reader.resident_bytes == 0


def test_a_failing_run_leaves_no_output_and_keeps_the_previous_one(tmp_path, tiny, ids):
    """A NaN in block 1 stops the run after block 0's shard was written: nothing under the final name."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny["fp32"], broken)
    state = load_file(str(broken / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(TopiaryError, match="NaN|non-finite"):
        prune_checkpoint(broken, out, request_of("magnitude"), ids)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no temporary sibling left
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    with pytest.raises(TopiaryError):
        prune_checkpoint(broken, out, request_of("magnitude"), ids)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_bad_checkpoints_fail_with_one_clear_error(tmp_path, tiny, ids):
    """A .bin-only folder and a truncated shard: a TopiaryError naming the problem, no output."""
    pt = tmp_path / "pt"
    shutil.copytree(tiny["fp32"], pt)
    state = load_file(str(pt / "model.safetensors"))
    (pt / "model.safetensors").unlink()
    torch.save(state, pt / "pytorch_model.bin")
    with pytest.raises(TopiaryError, match="streaming reads only safetensors checkpoints"):
        prune_checkpoint(pt, tmp_path / "out", request_of("magnitude"), ids)
    cut = tmp_path / "cut"
    shutil.copytree(tiny["fp32"], cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(TopiaryError, match="truncated"):
        prune_checkpoint(cut, tmp_path / "out", request_of("magnitude"), ids)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_kill_during_a_shard_write_leaves_no_file_under_its_final_name(tmp_path, tiny, ids, monkeypatch):
    """SIGKILL while the first shard is written: only temporary names exist, which the next start
    removes, and the next call removes the temporary folder the killed one had in ``$TMPDIR``."""
    import tempfile

    from modules.process import remove_stale

    script = (
        "import sys, torch; from modules.engine.loop import prune_checkpoint; "
        "from modules.engine.request import PruneRequest; from modules.pruning.sparsity import parse_spec; "
        "prune_checkpoint(sys.argv[1], sys.argv[2], PruneRequest('magnitude', parse_spec(0.5, None)), "
        "torch.zeros(1, 4, dtype=torch.long), folder=sys.argv[3])"
    )
    out, work, tmpdir = tmp_path / "out", tmp_path / "work", tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), PAUSE_ENV: "streaming-shard", "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tiny["fp32"]), str(out), str(work)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stderr:
            if line.startswith("TOPIARY_PAUSED streaming-shard"):
                break
        else:
            pytest.fail(f"the run ended (rc {proc.wait()}) without reaching the shard write")
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    (partial,) = (work / "shards").iterdir()  # block 0's shard, under its temporary name only
    assert partial.name.startswith(".model-00001-of-00004.safetensors.tmp-"), partial.name
    assert remove_stale([work / "shards"]) == [partial]
    assert not any((work / "shards").iterdir())
    (left,) = tmpdir.iterdir()  # the killed call's calibration file
    assert left.name.startswith(f"topiary-stream-{proc.pid}-"), left.name
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    prune_checkpoint(tiny["fp32"], tmp_path / "next", request_of("magnitude"), ids)
    assert not any(tmpdir.iterdir())


def test_write_safetensors_writes_the_bytes_of_save_file(tmp_path):
    """Same file as safetensors' own writer, for every dtype Topiary reads, any names and metadata."""
    from safetensors.torch import save

    from modules.engine.streaming import SAFETENSORS_DTYPES, write_safetensors

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    tensors = {
        f"layer.{i}.{name}": (base * 10).to(dtype)[: i + 1].contiguous()
        for i, (name, dtype) in enumerate(sorted(SAFETENSORS_DTYPES.items()))
    }
    tensors["z.scalar"] = torch.tensor(3.5)
    tensors["a.empty"] = torch.zeros(0, 4, dtype=torch.float16)
    tensors["m.offset"] = base[2:]  # a contiguous view with a storage offset
    for metadata in ({"format": "pt"}, None):  # what Topiary writes: one key, or none
        write_safetensors(tmp_path / "ours.safetensors", tensors, metadata)
        assert (tmp_path / "ours.safetensors").read_bytes() == save(tensors, metadata=metadata)
    # more keys: safetensors orders them by a per-process hash map, ours sorted; same content
    metadata = {"format": "pt", "alias": "{}"}
    write_safetensors(tmp_path / "ours.safetensors", tensors, metadata)
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in tensors.items()}
    flat = {k: v.reshape(-1) for k, v in tensors.items()}  # (a 0-dim tensor has no byte view)
    assert_same_tensors({k: v.reshape(-1) for k, v in got.items()}, flat)
    with pytest.raises(ValueError, match="contiguous host tensor"):
        write_safetensors(tmp_path / "t.safetensors", {"w": base.t()})


def test_write_safetensors_each_holds_one_tensor_at_a_time(tmp_path):
    """The stages' writer: the bytes of ``save_file``, each tensor made when the file reaches it
    and dropped once written (a masks or update stage holds one linear, not the block)."""
    import gc
    import weakref

    from safetensors.torch import save

    from modules.engine.streaming import write_safetensors_each

    g = torch.Generator().manual_seed(0)
    tensors = {"b.w": torch.randn(4, 3, generator=g), "a.w": torch.randn(2, 3, generator=g).half()}
    tensors["a.w.keep"] = tensors["a.w"] > 0
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    made, alive = [], []

    def produce(name):
        gc.collect()
        alive.append(sum(r() is not None for r in made))
        t = tensors[name].clone()
        made.append(weakref.ref(t))
        return t

    write_safetensors_each(tmp_path / "t.safetensors", layout, produce, {"format": "pt"})
    assert (tmp_path / "t.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})
    assert alive == [0, 0, 0], "an earlier tensor was still held when the next one was made"
    with pytest.raises(ValueError, match="its header says"):
        write_safetensors_each(tmp_path / "t.safetensors", layout, lambda k: torch.zeros(1), None)


def test_shard_writer_renames_complete_files_and_needs_every_shard(tmp_path):
    writer = ShardWriter(tmp_path, 2)
    path = writer.write(1, {"a": torch.ones(3)})
    with pytest.raises(TopiaryError, match="never written"):
        writer.finish(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # renamed: no temporary file left
    writer.write(2, {"b": torch.zeros(2, dtype=torch.float16)})
    index = json.loads(writer.finish(5).read_text())
    assert index == {
        "metadata": {"total_parameters": 5, "total_size": 16},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    with safe_open(str(path), "pt") as sf:
        assert sf.metadata() == {"format": "pt"}


def test_activation_store_kinds(tmp_path):
    with ActivationStore((4, 3, 2), torch.float16, "auto", tmp_path, fraction=1e-12) as store:
        assert store.kind == "mmap" and len(list(store.folder.iterdir())) == 2
        store.outputs.fill_(2.0)
        store.swap()
        assert bool((store.inputs == 2.0).all()) and store.inputs.dtype == torch.float16
        folder = store.folder
    assert not folder.exists()
    with ActivationStore((4, 3, 2), torch.float32, "auto", tmp_path, fraction=0.5) as store:
        assert store.kind == "memory"
    with pytest.raises(TopiaryError, match="activations: 'disk' is not one of memory, mmap, auto"):
        ActivationStore((1,), torch.float32, "disk")
