"""Model loading: `embedded`, offline errors, and loads from several threads at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from modules.engine.models import load_model


def test_threads_can_load_at_the_same_time():
    """The sweep's thread runner loads one model per member concurrently."""
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: load_model("embedded", device="cpu")[0], range(4)))
    first = models[0].state_dict()
    for other in models[1:]:
        assert all(torch.equal(first[k], v) for k, v in other.state_dict().items())


def test_unknown_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_model("some-org/some-model")


@pytest.fixture
def broken_copy(tmp_path):
    """A copy of the embedded model whose model.safetensors lacks one block weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    from modules.engine.names import REFERENCE_DIR

    out = tmp_path / "broken"
    shutil.copytree(REFERENCE_DIR, out)
    weights = load_file(out / "model.safetensors")
    del weights["model.layers.2.self_attn.k_proj.weight"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_inspect_model_reads_widths_and_context_without_weights():
    from modules.engine.models import inspect_model

    info = inspect_model("embedded")
    assert info.architecture == "LlamaForCausalLM" and info.context == 128
    assert info.widths["model.layers.0.self_attn.q_proj"] == 128
    assert info.widths["model.layers.3.mlp.down_proj"] == 352
    assert len(info.widths) == 4 * 7
    assert "lm_head.weight" not in info.tensors  # tied to the embeddings: legitimately absent


def test_a_missing_tensor_is_found_before_loading_and_at_load_time(broken_copy):
    from modules.engine.models import inspect_model
    from modules.errors import TopiaryError

    with pytest.raises(
        TopiaryError, match=r"lacks 1 tensor\(s\).*model\.layers\.2\.self_attn\.k_proj\.weight"
    ):
        inspect_model(str(broken_copy))
    with pytest.raises(TopiaryError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight"):
        load_model(str(broken_copy), device="cpu")  # no preflight: the load itself refuses


def test_sharded_checkpoint_keys_come_from_every_shard(tmp_path):
    """An index naming a shard that is not there, and shards that miss a tensor, are errors."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from modules.engine.models import inspect_model
    from modules.engine.names import REFERENCE_DIR
    from modules.errors import TopiaryError

    out = tmp_path / "sharded"
    shutil.copytree(REFERENCE_DIR, out)
    weights = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    save_file({k: weights[k] for k in names[:half]}, out / "model-00001-of-00002.safetensors")
    save_file({k: weights[k] for k in names[half:]}, out / "model-00002-of-00002.safetensors")
    shards = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    assert inspect_model(str(out)).tensors == set(names)
    save_file({k: weights[k] for k in names[half + 1 :]}, out / "model-00002-of-00002.safetensors")
    with pytest.raises(TopiaryError, match=names[half].replace(".", r"\.")):
        inspect_model(str(out))
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(TopiaryError, match="model-00002-of-00002.safetensors is missing"):
        inspect_model(str(out))


@pytest.mark.parametrize(
    ("device", "needle"),
    [("tpu9", "is not a device"), ("cuda", "no CUDA GPU"), ("cuda:7", "CUDA GPU"), ("meta", "not supported")],
)
def test_devices_that_are_not_here_are_one_clear_error(device, needle):
    from modules.engine.names import check_device
    from modules.errors import TopiaryError

    if device == "cuda" and torch.cuda.is_available() or device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    with pytest.raises(TopiaryError, match=needle):
        check_device(device)
    assert check_device("cpu") == torch.device("cpu")


def test_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from modules.engine.names import looks_like_path, resolve_model
    from modules.errors import TopiaryError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    assert looks_like_path("./model") and looks_like_path("/tmp/x") and looks_like_path("outputs/pruned")
    assert not looks_like_path("meta-llama/Llama-2-7b-hf") and not looks_like_path("gpt2")
    for name in ("./nonexistent-dir", "/tmp/x-topiary-absent", "outputs/pruned"):
        with pytest.raises(TopiaryError, match="does not exist"):
            resolve_model(name)
    assert resolve_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_a_checked_model_is_checked_again_only_when_its_files_change(tmp_path, monkeypatch):
    """``inspect_cached`` answers as ``inspect_model``; a changed config or weight file is
    checked again (here: the weight file loses a tensor), and a failed check is not kept."""
    import shutil

    from safetensors.torch import load_file, save_file

    from flows.preflight import inspect_cached
    from modules.engine.models import inspect_model
    from modules.engine.names import REFERENCE_DIR
    from modules.errors import TopiaryError

    monkeypatch.setenv("TOPIARY_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(REFERENCE_DIR, model)
    first = inspect_cached(str(model))
    assert first == inspect_model(str(model)) and len(list((tmp_path / "cache" / "inspect").iterdir())) == 1
    assert inspect_cached(str(model)) == first  # from the cache
    weights = load_file(model / "model.safetensors")
    del weights["model.layers.2.self_attn.k_proj.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    for _ in range(2):
        with pytest.raises(TopiaryError, match=r"lacks 1 tensor"):
            inspect_cached(str(model))


def test_a_cached_check_names_the_folder_asked_for(tmp_path, monkeypatch):
    """The same files in two folders share a cache entry; each answer names its own folder (an error
    naming the other folder would send a user to the wrong model)."""
    import shutil

    from flows.preflight import inspect_cached
    from modules.engine.names import REFERENCE_DIR

    monkeypatch.setenv("TOPIARY_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("one", "two"):
        shutil.copytree(REFERENCE_DIR, tmp_path / name)
        assert inspect_cached(str(tmp_path / name)).path == tmp_path / name
    assert len(list((tmp_path / "cache" / "inspect").iterdir())) == 1


def test_the_warm_checks_and_fingerprints_never_import_transformers(tmp_path):
    """A run whose model was checked before fingerprints and checks it without transformers
    (about 7 s of import here): ``tasks.cache.model_fingerprint`` and ``inspect_cached``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "from tasks.cache import model_fingerprint\n"
        "from flows.preflight import inspect_cached\n"
        "from modules.engine.names import check_device\n"
        "check_device('auto'); model_fingerprint('embedded'); info = inspect_cached('embedded')\n"
        "print(info.architecture, 'transformers' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "TOPIARY_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)]
    runs.append(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    )
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    assert [r.stdout.strip() for r in runs] == ["LlamaForCausalLM True", "LlamaForCausalLM False"]
