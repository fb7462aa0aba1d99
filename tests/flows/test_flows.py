"""The Prefect layer: cache keys (no server), then the pipeline and sweep flows on real Prefect.

The flow tests use a tiny random LLaMA (2 blocks, width 32) with its own byte-level BPE
tokenizer, saved to a temporary folder, a generated .txt file for calibration and
evaluation, and a temporary SQLite MLflow store; the work dir (and so the cache) is
shared by the tests of one module so each run re-uses what the previous one computed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from pathlib import Path

import pytest
import torch

from configs.schema import DataCfg, ModelCfg, PipelineCfg, PruneCfg, SweepCfg
from modules.errors import TopiaryError
from tasks.cache import cache_key_fn, digest, results_dir, stage_key
from tasks.evaluate import perplexity_key, zeroshot_key
from tasks.statistics import gradients_key
from tasks.track import track_key
from tasks.update import prune_key
from tasks.windows import calibration_key
from tests.helpers import tiny_llama, weight_digests
from tracking.tables import sweep_csv, sweep_markdown

WORDS = (
    "the a model prunes weights block layer token window sparse dense matrix row column "
    "gradient norm score mask keep zero update solve factor cache flow task run metric"
).split()


def _text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-block LLaMA (width 32) and a 300-token byte-level BPE, saved as a HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_text(2000, 1)], trainer)
    eos = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos, pad_token=eos
    )
    tiny_llama(len(fast), max_positions=512, tie=True).save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(_text(1500, 2))
    return path


def make_cfg(model: Path, text: Path, root: Path, **sections) -> PipelineCfg:
    """A tiny pipeline config: 4 calibration windows of 32 tokens, eval on the .txt, no zero-shot."""
    tree = {
        "model": {"name": str(model), "device": "cpu"},
        "data": {"calib": str(text), "nsamples": 4, "seqlen": 32, "eval": str(text), "eval_seqlen": 32},
        "prune": {"method": "wanda", "sparsity": 0.5},
        "zeroshot": {"enabled": False},
        "tracking": {
            "uri": f"sqlite:///{root / 'mlflow.db'}",
            "experiment": "test",
            "registered_model": "tiny",
        },
        "gate": {"max_ppl_ratio": 10.0, "max_zeroshot_drop": 100.0},
        "work_dir": str(root / "work"),
    }
    for key, value in sections.items():  # merged into the section; prune is replaced whole
        tree[key] = {**tree[key], **value} if key not in ("prune",) and isinstance(value, dict) else value
    return PipelineCfg.model_validate(tree)


# --------------------------------------------------------------------------- cache keys (no server)

PRINTS = {"model": "m" * 64, "tokenizer": "t" * 64, "calib": "c" * 64, "eval": "e" * 64, "zeroshot": "z" * 64}
DATA = PipelineCfg().data
MODEL = PipelineCfg().model
PRUNE = PipelineCfg().prune


def _with(cfg, **changes):
    """A copy of the config section ``cfg`` with ``changes``, validated."""
    return type(cfg).model_validate({**cfg.model_dump(), **changes})


def test_calibration_key_follows_only_what_changes_the_windows():
    base = calibration_key(DATA, PRINTS)
    assert base == calibration_key(_with(DATA), dict(PRINTS))
    assert calibration_key(_with(DATA, eval_seqlen=64, eval_batch_size=1), PRINTS) == base
    for change in ({"nsamples": 8}, {"seqlen": 64}, {"seed": 1}):
        assert calibration_key(_with(DATA, **change), PRINTS) != base
    assert calibration_key(DATA, {**PRINTS, "tokenizer": "x"}) != base
    assert calibration_key(DATA, {**PRINTS, "calib": "x"}) != base
    assert calibration_key(DATA, {**PRINTS, "model": "x", "eval": "x"}) == base  # weights don't tokenise


def test_prune_key_follows_model_prune_config_and_upstream_hashes():
    calib = {"path": "/a/calib.safetensors", "sha256": "1" * 64}
    base = prune_key(MODEL, PRUNE, PRINTS, calib, None)
    assert prune_key(MODEL, PRUNE, PRINTS, {**calib, "path": "/elsewhere"}, None) == base  # hashes, not paths
    assert prune_key(_with(MODEL, device="cuda"), PRUNE, PRINTS, calib, None) == base
    assert prune_key(_with(MODEL, dtype="bfloat16"), PRUNE, PRINTS, calib, None) != base
    assert prune_key(MODEL, _with(PRUNE, sparsity=0.6), PRINTS, calib, None) != base
    assert prune_key(MODEL, _with(PRUNE, options={"group": "row"}), PRINTS, calib, None) != base
    assert prune_key(MODEL, PRUNE, PRINTS, {**calib, "sha256": "2" * 64}, None) != base
    assert prune_key(MODEL, PRUNE, {**PRINTS, "model": "x"}, calib, None) != base
    assert prune_key(MODEL, PRUNE, PRINTS, calib, {"path": "/g", "sha256": "3" * 64}) != base
    assert gradients_key(MODEL, PRINTS, calib) != gradients_key(MODEL, PRINTS, {"sha256": "2" * 64})


def test_prune_key_tells_n_m_patterns_of_the_same_rate_apart():
    """2:4 and 4:8 both prune half of every weight: only ``pattern`` tells them apart."""
    calib = {"path": "/a/calib.safetensors", "sha256": "1" * 64}
    two, four = (PruneCfg(method="wanda", pattern=p) for p in ("2:4", "4:8"))
    assert two.sparsity == four.sparsity  # the sections differ in their pattern alone
    assert prune_key(MODEL, two, PRINTS, calib) != prune_key(MODEL, four, PRINTS, calib)
    unstructured = PruneCfg(method="wanda", sparsity=0.5)
    assert prune_key(MODEL, two, PRINTS, calib) != prune_key(MODEL, unstructured, PRINTS, calib)


def test_gradients_key_follows_the_model_dtype_and_not_its_device():
    """The gradients of a bfloat16 model are not those of its float32 weights."""
    calib = {"path": "/a/calib.safetensors", "sha256": "1" * 64}
    base = gradients_key(MODEL, PRINTS, calib)
    for dtype in ("bfloat16", "float16"):
        assert gradients_key(_with(MODEL, dtype=dtype), PRINTS, calib) != base
    assert gradients_key(_with(MODEL, device="cuda"), PRINTS, calib) == base


def test_dense_evaluation_keys_ignore_the_prune_config():
    dense = {"name": "embedded", "sha256": PRINTS["model"]}
    ppl = perplexity_key(dense, MODEL, DATA, PRINTS)
    assert perplexity_key(dense, MODEL, _with(DATA, nsamples=1, seed=9), PRINTS) == ppl
    assert perplexity_key(dense, MODEL, _with(DATA, eval_seqlen=64), PRINTS) != ppl
    assert perplexity_key({"name": "/w/models/x", "sha256": "p" * 64}, MODEL, DATA, PRINTS) != ppl
    zs = PipelineCfg().zeroshot
    base = zeroshot_key(dense, MODEL, zs, PRINTS)
    assert zeroshot_key(dense, MODEL, _with(zs, batch_size=1), PRINTS) == base
    assert zeroshot_key(dense, MODEL, _with(zs, limit=5), PRINTS) != base
    assert zeroshot_key(dense, MODEL, zs, {**PRINTS, "zeroshot": "other suite"}) != base
    for dtype in ("bfloat16", "float16"):  # the same weights evaluated in another precision
        assert perplexity_key(dense, _with(MODEL, dtype=dtype), DATA, PRINTS) != ppl
        assert zeroshot_key(dense, _with(MODEL, dtype=dtype), zs, PRINTS) != base


def test_track_key_and_stage_key_are_stable_and_distinct():
    assert stage_key("a", x=1, y={"b": 2, "a": 1}) == stage_key("a", y={"a": 1, "b": 2}, x=1)
    assert stage_key("a", x=1) != stage_key("b", x=1)
    assert track_key(PipelineCfg(), {"prune": {"sha256": "1"}}, "r") != track_key(
        PipelineCfg(), {"prune": {"sha256": "2"}}, "r"
    )
    assert len(digest([1, "x"])) == 64


def test_code_changes_change_every_cache_key(tmp_path, monkeypatch):
    import tasks.cache as cache

    (tmp_path / "modules").mkdir()
    (tmp_path / "tasks").mkdir()
    src = tmp_path / "modules" / "admm.py"
    src.write_text("STEP = 1\n")
    before = cache.code_fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("docs do not count\n")
    assert cache.code_fingerprint.__wrapped__(tmp_path) == before
    src.write_text("STEP = 2\n")
    after = cache.code_fingerprint.__wrapped__(tmp_path)
    assert after != before
    key = stage_key("prune", x=1)
    monkeypatch.setattr(cache, "code_fingerprint", lambda: after)
    assert stage_key("prune", x=1) != key


def test_cache_key_fn_drops_a_record_whose_artifact_is_gone(tmp_path):
    def key(x: int) -> str:
        return stage_key("demo", x=x)

    artifact = tmp_path / "artifact.bin"
    fn = cache_key_fn(key, lambda key: artifact)
    params = {"x": 1, "work_dir": str(tmp_path), "ignored": object()}
    record = results_dir(tmp_path) / key(1)
    record.parent.mkdir(parents=True)
    record.write_text("{}")
    artifact.write_text("data")
    assert fn(None, params) == key(1) and record.exists()
    artifact.unlink()
    assert fn(None, params) == key(1) and not record.exists()


def test_a_task_must_take_what_its_cache_key_reads():
    """A key function binds the task's parameters by name: one the task does not take is refused
    when the task is declared (Prefect would log it at run time and never cache the task)."""
    from tasks.cache import task

    def key(model: str, prune_cfg: str) -> str:
        return stage_key("demo", model=model, prune=prune_cfg)

    def folder(key: str, work_dir: str) -> Path:
        return Path(work_dir) / key

    @task(name="fits", cache_key_fn=cache_key_fn(key, folder))
    def fits(model: str, prune_cfg: str, work_dir: str) -> str:
        return model

    assert fits.fn("m", "p", "w") == "m"
    with pytest.raises(TypeError, match="needs prune_cfg, work_dir"):

        @task(name="renamed", cache_key_fn=cache_key_fn(key, folder))
        def renamed(model: str, prune: str) -> str:
            return model


def test_building_leaves_nothing_half_written(tmp_path):
    from tasks.cache import building

    final = tmp_path / "models" / "m"
    with building(final) as tmp:
        tmp.mkdir()
        (tmp / "w.bin").write_text("v1")
    assert (final / "w.bin").read_text() == "v1"
    with pytest.raises(RuntimeError), building(final) as tmp:
        tmp.mkdir()
        (tmp / "w.bin").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (final / "w.bin").read_text() == "v1"  # the previous artefact is intact
    assert [p.name for p in final.parent.iterdir()] == ["m"]  # and no temporary folder is left
    with building(final) as tmp:
        tmp.mkdir()
        (tmp / "w.bin").write_text("v2")
    assert (final / "w.bin").read_text() == "v2" and [p.name for p in final.parent.iterdir()] == ["m"]


def test_needs_gradients():
    assert PruneCfg(method="gblm").needs_gradients()
    assert PruneCfg(method="admm", options={"selector": "gblm"}).needs_gradients()
    assert not PruneCfg(method="wanda", options={}).needs_gradients()


def test_calibration_task_saves_windows_and_returns_a_hash(tiny_model, text_file, tmp_path):
    from safetensors.torch import load_file

    from tasks.windows import calibration, fingerprints

    cfg = make_cfg(tiny_model, text_file, tmp_path)
    prints = fingerprints.fn(cfg.model.name, cfg.data.calib, cfg.data.eval)
    data = cfg.data
    ref = calibration.fn(cfg.model.name, data, prints, str(tmp_path / "work"))
    ids = load_file(ref["path"])["input_ids"]
    assert tuple(ids.shape) == (4, 32) and ref["shape"] == [4, 32]
    assert Path(ref["path"]).parent == (tmp_path / "work" / "calibration").resolve()
    assert ref["key"] == calibration_key(data, prints)
    again = calibration.fn(cfg.model.name, data, prints, str(tmp_path / "work"))
    assert again["sha256"] == ref["sha256"]  # seeded: the same windows, byte for byte
    assert prints == fingerprints.fn(cfg.model.name, cfg.data.calib, cfg.data.eval)


def test_evaluation_results_carry_their_provenance(tiny_model, text_file, tmp_path):
    from modules.provenance import KEYS
    from tasks.evaluate import perplexity

    short = tmp_path / "short.txt"  # a few windows: the record is the point, not the figure
    short.write_text(_text(120, 3))
    cfg = make_cfg(tiny_model, short, tmp_path)
    target = {"name": str(tiny_model), "sha256": "m" * 64}
    model = _with(cfg.model, dtype="bfloat16")
    result = perplexity.fn(target, model, cfg.data, PRINTS)
    assert result["windows"] >= 1
    assert tuple(result["provenance"]) == KEYS
    assert result["provenance"]["dtype"] == "bfloat16" and result["provenance"]["device"] == "cpu"


def prune_to_dir(model: str, output: Path, work_dir: str = ".topiary", **fields):
    """:func:`flows.prune.prune_to_dir` called with the flags of ``topiary prune`` as keywords."""
    from flows.prune import prune_to_dir as run

    sections = {}
    for name, kind in (("model", ModelCfg), ("data", DataCfg), ("prune", PruneCfg)):
        sections[name] = kind(**{k: fields.pop(k) for k in list(fields) if k in kind.model_fields})
    assert not fields, fields
    sections["model"] = sections["model"].model_copy(update={"name": model})
    return run(sections["model"], sections["data"], sections["prune"], output, work_dir)


def test_prune_to_dir_writes_model_masks_and_report(tiny_model, text_file, tmp_path, monkeypatch):
    import json
    import subprocess
    import sys
    import tempfile
    from importlib.metadata import version

    from modules.engine.models import load_model

    out = tmp_path / "pruned"
    args = dict(model=str(tiny_model), method="wanda", sparsity=None, pattern="2:4", calib=str(text_file))
    args.update(nsamples=4, seqlen=32, seed=0, owl=False, options={}, output=out, device="cpu")
    args["work_dir"] = str(tmp_path / "work")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = f"{dead.pid}-{round(time.time() * 100)}"
    tmpdir = tmp_path / "tmpdir"
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    (tmpdir / f"topiary-grads-{owner}-abc").mkdir(parents=True)  # left by killed runs
    (tmp_path / f".pruned.tmp-{owner}-1").mkdir()
    report = prune_to_dir(**args).to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "tmpdir", "work"]
    assert not list(tmpdir.iterdir())
    assert not list((tmp_path / "work" / "runs").iterdir()), "the resume state outlived the run"
    assert report["setting"] == "2:4" and abs(report["sparsity"] - 0.5) < 1e-6
    written = json.loads((out / "pruning_report.json").read_text())
    assert written["sparsity"] == report["sparsity"]
    assert written["provenance"]["dtype"] == "float32" and written["provenance"]["torch"] == version("torch")
    mode = (out / "config.json").stat().st_mode & 0o777
    for shard in out.glob("model-*.safetensors"):
        assert shard.stat().st_mode & 0o777 == mode  # not save_pretrained's 0600
    assert (out / "model.safetensors.index.json").is_file()
    assert all(abs(b["sparsity"] - 0.5) < 1e-6 for b in report["blocks"])
    net, _ = load_model(str(out), device="cpu")
    w = net.model.layers[0].mlp.down_proj.weight
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()  # 2:4 holds in the saved weights
    assert sorted(p.name for p in (out / "masks").iterdir()) == [
        "block_0000.safetensors",
        "block_0001.safetensors",
    ]
    prune_to_dir(**args)  # a previous Topiary output is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(TopiaryError, match="not a previous Topiary output"):
        prune_to_dir(**{**args, "output": tmp_path / "other"})
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def test_prune_to_dirs_gradient_step_keeps_its_inputs_where_activations_says(
    tiny_model, text_file, tmp_path, caplog
):
    """``topiary prune --activations mmap``: GBLM's gradient step keeps its inputs on disk too."""

    caplog.set_level(logging.INFO, logger="topiary")
    args = dict(model=str(tiny_model), method="gblm", sparsity=0.5, pattern=None, calib=str(text_file))
    args.update(nsamples=4, seqlen=32, seed=0, owl=False, options={}, device="cpu")
    prune_to_dir(**args, output=tmp_path / "out", work_dir=str(tmp_path / "work"), activations="mmap")
    assert "gradients: block inputs on disk by segments (one more forward) (activations: mmap)" in caplog.text


def _masks(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted((folder / "masks").iterdir()) for k, v in load_file(str(f)).items()}


def test_prune_to_dir_masks_from_runs_the_source_once_and_updates_on_its_masks(
    tiny_model, text_file, tmp_path
):
    """``topiary prune --method admm --masks-from wanda``: Wanda's prune goes to the work folder's
    models (as the pipeline's would), ADMM updates on exactly its masks; a second call finds it."""
    from modules.engine.models import load_model

    args = dict(model=str(tiny_model), sparsity=0.5, pattern=None, calib=str(text_file), nsamples=4)
    args.update(
        seqlen=32, seed=0, owl=False, options={"iters": 3}, device="cpu", work_dir=str(tmp_path / "w")
    )
    prune_to_dir(**args, method="admm", masks_from="wanda", output=tmp_path / "admm")
    (source,) = (tmp_path / "w" / "models").iterdir()
    assert source.name.startswith("wanda-0.5-")
    wanda = _masks(source)
    assert wanda.keys() == _masks(tmp_path / "admm").keys()
    assert all(torch.equal(wanda[k], m) for k, m in _masks(tmp_path / "admm").items())
    admm, _ = load_model(str(tmp_path / "admm"), device="cpu")
    plain, _ = load_model(str(source), device="cpu")
    w_admm, w_wanda = admm.model.layers[1].mlp.up_proj.weight, plain.model.layers[1].mlp.up_proj.weight
    assert torch.equal(w_admm != 0, w_wanda != 0) and not torch.equal(w_admm, w_wanda)  # updated, same mask
    mtime = (source / "pruning_report.json").stat().st_mtime_ns
    prune_to_dir(**args, method="admm", masks_from="wanda", output=tmp_path / "again")
    assert (source / "pruning_report.json").stat().st_mtime_ns == mtime, "the source was pruned again"
    assert [p.name for p in (tmp_path / "w" / "models").iterdir()] == [source.name]


def test_masks_from_options_are_the_sources_options(tiny_model, text_file, tmp_path):
    """``--masks-from sparsegpt --masks-from-option percdamp=0.2``: the source prune runs with
    that option (its report says so, and it is another cached prune than the defaults'), and
    ADMM updates on its masks."""

    args = dict(model=str(tiny_model), sparsity=0.5, pattern=None, calib=str(text_file), nsamples=4)
    args.update(seqlen=32, seed=0, owl=False, device="cpu", work_dir=str(tmp_path / "w"))
    prune_to_dir(**args, method="admm", options={"iters": 3}, masks_from="sparsegpt",
                 masks_from_options={"percdamp": 0.2}, output=tmp_path / "admm")  # fmt: skip
    (source,) = (tmp_path / "w" / "models").iterdir()
    report = json.loads((source / "pruning_report.json").read_text())
    assert report["method"] == "sparsegpt" and report["plan"]["options"]["percdamp"] == 0.2
    admm = _masks(tmp_path / "admm")
    assert admm and all(torch.equal(m, admm[k]) for k, m in _masks(source).items())
    prune_to_dir(
        **args, method="admm", options={"iters": 3}, masks_from="sparsegpt", output=tmp_path / "admm2"
    )
    assert len(list((tmp_path / "w" / "models").iterdir())) == 2  # the defaults' source is another prune


def test_the_direct_prune_path_never_imports_prefect():
    """``topiary prune`` calls the tasks' functions (``.fn``) and never needs Prefect (1.3 s
    of import): every module on its path declares tasks with ``tasks.cache.task``."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, flows.prune, tasks.windows, tasks.statistics, tasks.masks, tasks.update\n"
        "assert callable(tasks.update.update.fn)\n"
        "print('prefect' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stderr


def test_masks_from_is_checked_with_the_method():
    from pydantic import ValidationError

    from configs.schema import PruneCfg

    assert PruneCfg(method="admm", masks_from="sparsegpt").masks_from == "sparsegpt"
    for bad, why in [
        ({"method": "wanda", "masks_from": "sparsegpt"}, "takes no mask"),
        ({"method": "admm", "masks_from": "admm"}, "the method itself"),
        ({"method": "admm", "masks_from": "nope"}, "is not one of"),
        ({"method": "admm", "masks_from": "wanda", "options": {"selector": "gblm"}}, "drop them"),
        ({"method": "admm", "masks_from_options": {"percdamp": 0.1}}, "only with masks_from"),
        ({"method": "admm", "masks_from": "sparsegpt", "masks_from_options": {"alpha": 1}}, "not an option"),
    ]:
        with pytest.raises(ValidationError, match=why):
            PruneCfg(**bad)


def test_sweep_table_renders_methods_by_settings():
    rows = [
        {
            "method": "wanda",
            "setting": "0.5",
            "sparsity": 0.5,
            "ppl": 12.5,
            "seqlen": 32,
            "zeroshot_mean": 0.5,
        },
        {
            "method": "wanda",
            "setting": "2:4",
            "sparsity": 0.5,
            "ppl": 20.0,
            "seqlen": 32,
            "zeroshot_mean": None,
        },
        {"method": "magnitude", "setting": "0.5", "sparsity": 0.5, "ppl": 15.25, "seqlen": 32},
    ]
    md = sweep_markdown(rows, {"ppl": 10.0, "seqlen": 32, "zeroshot_mean": 0.55})
    lines = md.splitlines()
    assert "window 32" in lines[0]
    assert lines[2] == "| method | 0.5 | 2:4 |"
    assert lines[4] == "| dense | 10.000 / 0.5500 | 10.000 / 0.5500 |"
    assert lines[5] == "| wanda | 12.500 / 0.5000 | 20.000 / - |"
    assert lines[6] == "| magnitude | 15.250 / - | - |"
    csv = sweep_csv(rows).splitlines()
    assert csv[0] == "method,setting,sparsity,ppl,seqlen,zeroshot_mean,run_id"
    assert csv[3] == "magnitude,0.5,0.5,15.25,32,,"


def test_bad_zeroshot_task_fails_before_any_work(tiny_model, text_file, tmp_path):
    from flows.pipeline import run_pipeline

    cfg = make_cfg(tiny_model, text_file, tmp_path, zeroshot={"enabled": True, "tasks": ["no_such_task"]})
    with pytest.raises(TopiaryError, match="no_such_task"):
        run_pipeline(cfg)
    assert not (tmp_path / "work").exists()  # refused before Prefect or any model started


def test_missing_model_fails_before_any_work(text_file, tmp_path):
    from flows.pipeline import run_pipeline

    cfg = make_cfg(tmp_path / "nowhere", text_file, tmp_path)
    with pytest.raises((TopiaryError, FileNotFoundError), match="nowhere"):
        run_pipeline(cfg)
    assert not (tmp_path / "work").exists()


# --------------------------------------------------------------------------- flows on real Prefect


def _runs(cfg: PipelineCfg) -> list:
    from mlflow import MlflowClient

    mc = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    exp = mc.get_experiment_by_name(cfg.tracking.experiment)
    return [] if exp is None else mc.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def flow_root(tmp_path_factory, tiny_model, text_file, prefect_harness):
    """A shared root (work dir, MLflow store) and the first pipeline run in it (zero-shot on, limit 4)."""
    import os

    from flows.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("flow")
    cwd = os.getcwd()
    os.chdir(root)  # MLflow puts a SQLite store's artifacts in ./mlruns
    try:
        cfg = make_cfg(
            tiny_model, text_file, root, zeroshot={"enabled": True, "tasks": ["topiary_order"], "limit": 4}
        )
        first = run_pipeline(cfg)
        yield root, cfg, first
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_pipeline_runs_end_to_end(flow_root):
    root, cfg, first = flow_root
    assert not any(s["cached"] for s in first["stages"].values())
    assert {
        "calibration",
        "prune",
        "save",
        "ppl_dense",
        "ppl_pruned",
        "zeroshot_dense",
        "track",
        "promote",
    } <= set(first["stages"])
    m = first["metrics"]
    assert m["method"] == "wanda" and m["setting"] == "0.5" and m["seqlen"] == 32
    assert abs(m["sparsity"] - 0.5) < 1e-6
    assert m["ppl_pruned"] > 0 and m["ppl_dense"] > 0 and 0 <= m["zeroshot_pruned_mean"] <= 1
    model_dir = Path(first["model_dir"])
    assert (model_dir / "model.safetensors.index.json").is_file() and (
        model_dir / "pruning_report.json"
    ).is_file()
    assert len(list(model_dir.glob("model-*-of-00003.safetensors"))) == 3  # one shard a block, one outside
    assert sorted(p.name for p in (model_dir / "masks").iterdir()) == [
        "block_0000.safetensors",
        "block_0001.safetensors",
    ]
    assert not [p for p in model_dir.parent.iterdir() if ".tmp" in p.name]
    assert first["promoted"] and first["promotion"]["version"] == 1
    (run,) = _runs(cfg)
    assert run.info.run_id == first["run_id"] and run.info.status == "FINISHED"
    assert run.data.metrics["ppl_pruned_w32"] == pytest.approx(m["ppl_pruned"])
    paired = m["paired"]  # the same windows and items, compared pair by pair
    assert paired["ppl"]["ratio_lo"] <= paired["ppl"]["ratio"] <= paired["ppl"]["ratio_hi"]
    assert run.data.metrics["ppl_ratio_w32_hi95"] == pytest.approx(paired["ppl"]["ratio_hi"])
    assert run.data.metrics["zeroshot_diff_mean_lo95"] == pytest.approx(paired["zeroshot"]["mean"]["lo"])
    assert len(list(results_dir(cfg.work_dir).iterdir())) >= 8  # one persisted record per cached step
    # every figure says what produced it: the run's params and tags, evaluation.json, the report
    import json

    from mlflow import MlflowClient

    from modules.provenance import KEYS

    for key in KEYS:
        assert run.data.params[f"provenance.{key}"] == run.data.tags[f"topiary.provenance.{key}"], key
    assert run.data.params["provenance.dtype"] == "float32" and run.data.params["provenance.device"] == "cpu"
    mc = MlflowClient(tracking_uri=cfg.tracking.uri)
    evaluation = json.loads(
        Path(mc.download_artifacts(run.info.run_id, "evaluation.json", str(root))).read_text()
    )
    assert tuple(evaluation["provenance"]) == KEYS
    for variant in ("dense", "pruned"):
        assert tuple(evaluation[variant]["ppl"]["provenance"]) == KEYS
        assert tuple(evaluation[variant]["zeroshot"]["provenance"]) == KEYS
    assert tuple(json.loads((model_dir / "pruning_report.json").read_text())["provenance"]) == KEYS


@pytest.mark.slow
def test_second_run_is_served_from_cache(flow_root, capsys, monkeypatch):
    import modules.provenance
    from flows.pipeline import run_pipeline

    root, cfg, first = flow_root
    # another commit, a dirty tree: provenance is recorded, never part of a cache key
    monkeypatch.setattr(modules.provenance, "git_state", lambda root=None: ("f" * 40, "true"))
    second = run_pipeline(cfg)
    cached = {name for name, s in second["stages"].items() if s["cached"]}
    # never cached: the input fingerprints (cheap) and the gate (it re-reads the registry)
    assert cached == set(second["stages"]) - {"fingerprints", "promote"}
    assert second["metrics"] == first["metrics"]
    assert second["run_id"] == first["run_id"]  # no duplicate MLflow run
    assert len(_runs(cfg)) == 1
    assert not second["promoted"] and second["promotion"]["champion"] == 1
    out = capsys.readouterr().out
    assert "calibration" in out and "cached" in out and "already the champion" in out


@pytest.mark.slow
def test_changed_prune_config_reuses_the_dense_baseline(flow_root, tiny_model, text_file):
    from flows.pipeline import run_pipeline

    root, cfg, first = flow_root
    changed = make_cfg(
        tiny_model,
        text_file,
        root,
        prune={"method": "magnitude", "sparsity": 0.5},
        zeroshot={"enabled": True, "tasks": ["topiary_order"], "limit": 4},
    )
    third = run_pipeline(changed, echo=False)
    stages = third["stages"]
    assert "calibration" not in stages  # magnitude reads no calibration data, so computes none
    assert stages["ppl_dense"]["cached"] and stages["zeroshot_dense"]["cached"]
    assert (
        not stages["prune"]["cached"] and not stages["ppl_pruned"]["cached"] and not stages["track"]["cached"]
    )
    assert third["metrics"]["ppl_dense"] == first["metrics"]["ppl_dense"]
    assert third["metrics"]["method"] == "magnitude" and third["run_id"] != first["run_id"]
    assert Path(third["model_dir"]) != Path(first["model_dir"])


@pytest.mark.slow
def test_a_toy_method_registered_in_a_test_runs_through_the_flow(
    flow_root, tiny_model, text_file, monkeypatch
):
    from flows.pipeline import run_pipeline
    from modules.pruning.registry import METHODS
    from tests.helpers import toy_method

    calls: list = []
    monkeypatch.setitem(METHODS, "toy", toy_method(calls))
    root, _, first = flow_root
    cfg = make_cfg(
        tiny_model, text_file, root, prune={"method": "toy", "sparsity": 0.5, "options": {"power": 2}}
    )
    result = run_pipeline(cfg, echo=False)
    assert calls == [2] * 14  # every linear of the 2 blocks, with the config's option
    assert result["metrics"]["method"] == "toy" and result["stages"]["ppl_dense"]["cached"]
    assert result["metrics"]["ppl_pruned"] != first["metrics"]["ppl_pruned"]


@pytest.mark.slow
def test_admm_on_sparsegpts_masks_comes_through_the_cache(flow_root, tiny_model, text_file):
    """A pipeline of ADMM with ``masks_from: sparsegpt`` finds SparseGPT's prune (run before
    by another pipeline) in the cache, and its update keeps exactly SparseGPT's masks."""
    from flows.pipeline import run_pipeline

    root, _, _ = flow_root
    sparsegpt = run_pipeline(make_cfg(tiny_model, text_file, root, prune={"method": "sparsegpt"}), echo=False)
    cfg = make_cfg(
        tiny_model,
        text_file,
        root,
        prune={"method": "admm", "masks_from": "sparsegpt", "options": {"iters": 3}},
    )
    admm = run_pipeline(cfg, echo=False)
    assert admm["stages"]["masks_from"]["cached"] and not admm["stages"]["prune"]["cached"]
    ours, theirs = _masks(Path(admm["model_dir"])), _masks(Path(sparsegpt["model_dir"]))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert admm["metrics"]["ppl_pruned"] != sparsegpt["metrics"]["ppl_pruned"]  # another update
    again = run_pipeline(cfg, echo=False)
    assert again["stages"]["masks_from"]["cached"] and again["stages"]["prune"]["cached"]


@pytest.mark.slow
def test_the_pipeline_runs_its_gradient_and_prune_steps_on_two_processes(
    prefect_harness, tiny_model, text_file, tmp_path, monkeypatch
):
    """``model.devices: 2``: GBLM's gradients and ADMM's per-block stages run on two gloo ranks
    in a child process (``modules.engine.launch``). The masks equal a one-process pipeline's and the
    perplexity agrees to fp32 rounding; the figures say how many processes computed each step."""
    from flows.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns
    prune = {"method": "admm", "sparsity": 0.5, "options": {"selector": "gblm", "iters": 3}}
    runs = {}
    for devices in (1, 2):  # separate work folders: the processes are not part of the cache key
        root = tmp_path / f"devices-{devices}"
        root.mkdir()
        cfg = make_cfg(tiny_model, text_file, root, prune=prune)
        cfg.model.devices = devices
        runs[devices] = run_pipeline(cfg, echo=False)
    for devices, run in runs.items():
        assert {run["stages"][s]["processes"] for s in ("gradients", "prune")} == {devices}
    one, two = _masks(Path(runs[1]["model_dir"])), _masks(Path(runs[2]["model_dir"]))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert runs[2]["metrics"]["ppl_pruned"] == pytest.approx(runs[1]["metrics"]["ppl_pruned"], rel=1e-5)


@pytest.fixture(scope="module")
def dask_nodes():
    """A Dask scheduler with two worker processes: two "machines" (both this one)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_more_nodes_than_the_schedulers_workers_fail_the_preflight(dask_nodes):
    from flows.preflight import check_nodes

    check_nodes(dask_nodes, 2)
    with pytest.raises(TopiaryError, match=r"model.num_nodes: 3, but the Dask scheduler at .* has 2 worker"):
        check_nodes(dask_nodes, 3)


@pytest.mark.slow
def test_the_pipeline_runs_its_gradient_and_prune_steps_on_two_nodes_of_a_dask_cluster(
    prefect_harness, tiny_model, text_file, tmp_path, monkeypatch, dask_nodes
):
    """``model.num_nodes: 2``: each node's child runs on a Dask worker of its own and joins one
    DDP run: the same bytes as ``model.devices: 2`` on one machine, node 0's log in the step's,
    and nothing of the nodes left in the work folder."""
    from flows.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    prune = {"method": "admm", "sparsity": 0.5, "options": {"selector": "gblm", "iters": 3}}
    runs = {}
    for name, model in (
        ("devices", {"devices": 2}),
        ("nodes", {"num_nodes": 2, "nodes_address": dask_nodes}),
    ):
        root = tmp_path / name
        root.mkdir()
        cfg = make_cfg(tiny_model, text_file, root, prune=prune)
        for key, value in model.items():
            setattr(cfg.model, key, value)
        runs[name] = run_pipeline(cfg, echo=False)
    for run in runs.values():
        assert {run["stages"][s]["processes"] for s in ("gradients", "prune")} == {2}
    nodes, devices = (weight_digests(Path(runs[k]["model_dir"])) for k in ("nodes", "devices"))
    assert nodes == devices
    assert runs["nodes"]["metrics"]["ppl_pruned"] == runs["devices"]["metrics"]["ppl_pruned"]
    assert not list((tmp_path / "nodes").rglob("*nodes.tmp-*")), "a node's request folder was left"


def _spawned() -> list[int]:
    """Pids of the ``modules.engine.launch`` children running on this machine."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"modules.engine.launch" in cmdline.read_bytes().split(b"\0")[:3]:
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_killed_flow_takes_its_nodes_children_and_leaves_the_workers(tmp_path, dask_nodes):
    """SIGKILL of a flow whose step runs on two nodes: each node's child (a child of its Dask
    worker, not of the flow) is killed once the flow's beat stops, the workers stay, and the
    step's folder in the work folder goes with the next clean-up."""
    import os
    import signal
    import subprocess
    import sys

    from distributed import Client

    from modules.engine.launch import STALE_S
    from modules.process import remove_stale

    model = {"device": "cpu", "devices": 1, "num_nodes": 2, "nodes_address": dask_nodes}
    kwargs = {"seconds": 600, "work_dir": str(tmp_path)}
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from modules.engine.launch import Ranks, on_ranks\n"
        f"on_ranks('tests.helpers:spawned_wait', {kwargs!r}, Ranks.of({model!r}))\n"
    )
    root = Path(__file__).resolve().parents[2]
    log = tmp_path / "flow.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(root)},
                                stdout=out, stderr=out)  # fmt: skip
    deadline = time.monotonic() + 300
    logs = lambda: [log, *tmp_path.glob(".nodes.tmp-*/node-*.log")]  # noqa: E731 - the flow's, the nodes'
    while len(logs()) < 3 or not all("TOPIARY_SPAWNED_WAITING" in f.read_text() for f in logs()):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.3)
    children = _spawned()
    try:
        assert len(children) == 2, children
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + STALE_S + 30
        while set(children) & set(_spawned()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not set(children) & set(_spawned()), "a node's child outlived the flow"
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with Client(dask_nodes, set_as_default=False) as client:
        assert len(client.scheduler_info()["workers"]) == 2
    assert list(tmp_path.glob(".nodes.tmp-*"))
    remove_stale([tmp_path])
    assert not list(tmp_path.glob(".nodes.tmp-*"))


@pytest.mark.slow
def test_failure_before_evaluation_is_never_registered(flow_root, tiny_model, text_file, tmp_path):
    from mlflow import MlflowClient

    from flows.pipeline import run_pipeline

    root, _, _ = flow_root
    # 2:3 passes the config (a valid N:M) but 3 divides no width of the tiny model (32, 64):
    # the driver refuses it in the prune step, after calibration.
    cfg = make_cfg(
        tiny_model,
        text_file,
        root,
        prune={"method": "wanda", "pattern": "2:3"},
        tracking={"uri": f"sqlite:///{tmp_path / 'failed.db'}"},
    )
    with pytest.raises(TopiaryError, match="2:3"):
        run_pipeline(cfg, echo=False)
    assert _runs(cfg) == []
    registry = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    assert registry.search_registered_models() == []


@pytest.mark.slow
def test_a_sweep_in_a_fresh_process_runs_its_first_steps_in_threads(
    prefect_harness, tiny_model, text_file, tmp_path
):
    """``topiary sweep`` in a new process: the calibration and dense steps start at once on two
    threads, each importing transformers for the first time. Its lazy names are not safe for
    that ("cannot import name 'AutoConfig'"), so the sweep imports them before its threads.
    (The other flow tests cannot see this: their process imported transformers long before.)"""
    import os
    import subprocess
    import sys

    import yaml
    from prefect.settings import PREFECT_API_URL

    from flows.preflight import inspect_cached

    inspect_cached(str(tiny_model))  # as a run before: the sweep's model check imports nothing
    cfg = make_cfg(tiny_model, text_file, tmp_path).model_dump(mode="json")
    cfg |= {"methods": ["wanda", "magnitude"], "settings": ["0.5"], "dask_workers": 2}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [sys.executable, "-m", "flows.cli", "sweep", "--config", str(tmp_path / "sweep.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| wanda |" in done.stdout and "| magnitude |" in done.stdout


@pytest.mark.slow
def test_sweep_on_a_local_dask_cluster(flow_root, tiny_model, text_file, capsys):
    from mlflow import MlflowClient

    from flows.sweep import run_sweep

    root, cfg, first = flow_root
    sweep = SweepCfg.model_validate(
        {
            **cfg.model_dump(mode="json"),
            "zeroshot": {"enabled": False},
            "tracking": {**cfg.tracking.model_dump(), "experiment": "sweep"},
            "methods": ["wanda", "magnitude", "admm@wanda"],
            "settings": ["0.5", "2:4"],
            "runner": "dask",
            "dask_workers": 2,
            "dask_processes": False,
        }
    )
    summary = run_sweep(sweep)
    rows = {(r["method"], r["setting"]): r for r in summary["rows"]}
    assert set(rows) == {
        *[(m, s) for m in ("wanda", "magnitude", "admm@wanda") for s in ("0.5", "2:4")],
    }
    stages = summary["stages"]
    # ADMM on Wanda's masks: the wanda members' own prunes, one step each (one future)
    assert stages["admm@wanda-0.5 masks_from"]["cached"] and not stages["admm@wanda-2:4 masks_from"]["cached"]
    assert stages["admm@wanda-2:4 masks_from"]["seconds"] == stages["wanda-2:4 prune"]["seconds"]
    # the 0.5 members were computed by the pipeline tests and are re-used; 2:4 runs on the workers
    assert stages["calibration"]["cached"] and stages["ppl_dense"]["cached"]
    assert stages["wanda-0.5 prune"]["cached"] and stages["magnitude-0.5 prune"]["cached"]
    assert not stages["wanda-2:4 prune"]["cached"] and not stages["magnitude-2:4 ppl_pruned"]["cached"]
    assert rows[("wanda", "0.5")]["ppl"] == pytest.approx(first["metrics"]["ppl_pruned"])
    assert rows[("wanda", "2:4")]["sparsity"] == pytest.approx(0.5)
    assert summary["dense"]["ppl"] == pytest.approx(first["metrics"]["ppl_dense"])
    out = capsys.readouterr().out
    assert "| method | 0.5 | 2:4 |" in out and "| wanda |" in out and "| admm@wanda |" in out
    mc = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    artifacts = {a.path for a in mc.list_artifacts(summary["run_id"])}
    assert {"sweep.md", "sweep.csv", "sweep.json", "plots"} <= artifacts
    assert [a.path for a in mc.list_artifacts(summary["run_id"], "plots")] == ["plots/ppl_vs_sparsity.png"]
    parent = mc.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED"
    children = mc.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary['run_id']}'"
    )
    assert {c.info.run_id for c in children} == {r["run_id"] for r in summary["rows"]}


def _said(caplog, start: str) -> list[str]:
    """The distinct records logged that start with ``start`` (one the handler saw twice, through
    a logger and its parent, once)."""
    records = {id(r): r.getMessage() for r in caplog.records if r.getMessage().startswith(start)}
    return list(records.values())


@pytest.mark.slow
def test_a_sweeps_gradient_step_is_shared_and_keeps_its_inputs_where_prune_activations_says(
    prefect_harness, tiny_model, text_file, tmp_path, monkeypatch, caplog, request
):
    """Two GBLM members share one gradient step, which keeps the blocks' inputs on disk as
    ``prune.activations: mmap`` says, in the step's log; the pipeline's GBLM with
    ``activations: memory`` says so and gets the same perplexity (the setting is where, not what)."""
    from flows.pipeline import run_pipeline
    from flows.sweep import run_sweep

    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts in ./mlruns
    task_log = logging.getLogger("prefect.task_runs")  # a step's log: what the Prefect UI shows
    task_log.addHandler(caplog.handler)
    request.addfinalizer(lambda: task_log.removeHandler(caplog.handler))
    said = "gradients: block inputs {} (activations: {})"
    cfg = make_cfg(tiny_model, text_file, tmp_path / "sweep", prune={"method": "gblm", "activations": "mmap"})
    sweep = SweepCfg.model_validate(
        {**cfg.model_dump(mode="json"), "methods": ["gblm"], "settings": ["0.5", "2:4"], "dask_workers": 2}
    )
    summary = run_sweep(sweep, echo=False)
    assert not summary["stages"]["gradients"]["cached"]
    assert _said(caplog, "gradients: block inputs") == [
        said.format("on disk by segments (one more forward)", "mmap")
    ]
    caplog.clear()
    prune = {"method": "gblm", "sparsity": 0.5, "activations": "memory"}
    one = run_pipeline(make_cfg(tiny_model, text_file, tmp_path / "one", prune=prune), echo=False)
    assert _said(caplog, "gradients: block inputs") == [said.format("in memory", "memory")]
    rows = {r["setting"]: r for r in summary["rows"]}
    assert rows["0.5"]["ppl"] == one["metrics"]["ppl_pruned"]


def test_perplexity_task_streams_a_large_model_to_the_same_result(tiny_model, text_file, monkeypatch):
    """A model over half the free memory is evaluated block by block; the figures are the same."""
    from tasks.evaluate import perplexity

    cfg = make_cfg(tiny_model, text_file, Path("/nonexistent"))
    target, model, data = {"name": str(tiny_model)}, cfg.model, cfg.data
    results = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("TOPIARY_STREAM_EVAL", forced)
        results[forced] = perplexity.fn(target, model, data, PRINTS)
    assert not results["0"]["streamed"] and results["1"]["streamed"]
    assert results["1"]["ppl"] == pytest.approx(results["0"]["ppl"], rel=1e-6)
    assert results["1"]["window_nll"] == pytest.approx(results["0"]["window_nll"], rel=1e-6)


@pytest.mark.slow
def test_a_flow_run_left_running_by_a_killed_process_is_marked_crashed(prefect_harness):
    import socket
    import subprocess
    import sys

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.server import OWNER_PREFIX, crash_stale_runs, owner_tags

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    with get_client(sync_client=True) as client:
        stale = client.create_flow_run(
            flow(name="topiary-test-stale")(lambda: None), tags=[f"{OWNER_PREFIX}{host}/{dead.pid}-1"]
        )
        alive = client.create_flow_run(flow(name="topiary-test-stale")(lambda: None), tags=owner_tags())
        for run in (stale, alive):
            client.set_flow_run_state(run.id, Running(), force=True)
        crashed = crash_stale_runs()
        assert stale.name in crashed and alive.name not in crashed
        assert client.read_flow_run(stale.id).state.type.value == "CRASHED"
        assert client.read_flow_run(alive.id).state.type.value == "RUNNING"


def test_the_recipe_gives_windows_and_gradients_only_to_the_prunes_that_read_them():
    """One recipe for the pipeline, the sweep and ``topiary prune``: calibration and gradients run
    once, only when a prune reads them; each prune gets them only if its method reads them; a
    ``masks_from`` source that is also a member's prune runs once, and feeds the update."""
    from flows.prune import prune, prune_recipe
    from tasks.statistics import gradients
    from tasks.windows import calibration

    calls = []

    def step(name, task, *args):
        calls.append((name, task, args))
        return f"<{name} {len(calls)}>"

    members = [
        PruneCfg(method="magnitude"),
        PruneCfg(method="admm", masks_from="magnitude", options={"iters": 3}),
        PruneCfg(method="gblm"),
    ]
    steps = prune_recipe(MODEL, DATA, members, "/w", step)
    names = [name for name, _, _ in calls]
    assert names == ["fingerprints", "calibration", "gradients", "prune", "prune", "prune"]
    assert calls[1][1] is calibration and calls[2][1] is gradients
    prunes = {args[1].method: args for name, task, args in calls if task is prune}
    assert prunes["magnitude"][3] is None and prunes["magnitude"][4] is None  # data-free: neither
    assert prunes["admm"][3] == steps.calibration and prunes["admm"][4] is None
    assert prunes["admm"][6] == steps.prunes[0]["prune"]  # updates on the magnitude member's masks
    assert steps.prunes[1]["masks_from"] is steps.prunes[0]["prune"]
    assert prunes["gblm"][3] == steps.calibration and prunes["gblm"][4] == steps.gradients
    calls.clear()
    prune_recipe(MODEL, DATA, [PruneCfg(method="magnitude")], "/w", step)
    assert [name for name, _, _ in calls] == ["fingerprints", "prune"]  # no windows, no gradients
