"""Bad input, tried as a user would: one stderr line naming the key or file, exit 2, nothing written.

Every case of :data:`CASES` runs through ``flows.cli.main`` in this process, in a fresh
work folder (the current directory) with ``TMPDIR`` pointed at a fresh folder; a sample
of :data:`SUBPROCESS_SAMPLE` runs through the real ``topiary`` command too. Each must
end with exit status 2, exactly one line on stderr (``topiary: error: ...``) that
names the key or file, no traceback, and no new path under the work folder, the
output's parent, the fixtures or ``$TMPDIR``. Most cases fail in the preflight
(:mod:`flows.preflight`), before Prefect or any weight; the NaN case loads weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from configs.schema import CONFIG_DIR
from flows.cli import main
from modules.engine.names import REFERENCE_DIR

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = str(CONFIG_DIR / "pipeline.yaml")
SWEEP = str(CONFIG_DIR / "sweep.yaml")
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused


def _pipe(*sets: str) -> list[str]:
    return ["pipeline", "--config", PIPELINE, *[a for s in sets for a in ("--set", s)]]


def _prune(*extra: str, model: str = "embedded", method: str = "wanda") -> list[str]:
    args = ["prune", model, "--method", method, *extra]
    if "--sparsity" not in extra and "--pattern" not in extra:
        args += ["--sparsity", "0.5"]
    return args if "--output" in extra else [*args, "--output", "{out}"]


def _ppl(*extra: str, model: str = "embedded") -> list[str]:
    return ["eval", "ppl", model, "--data", "{fx}/eval.txt", *extra]


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

# (id, argv with {fx} = fixtures folder and {out} = an output path, words the line must hold)
CASES = [
    ("tracking-unreachable", _pipe(f"tracking.uri={UNREACHABLE}"), ["tracking.uri", "127.0.0.1:9"]),
    ("seqlen-over-context", _pipe("data.seqlen=4096"), ["data.seqlen", "4096", "context"]),
    ("eval-seqlen-over-context", _pipe("data.eval_seqlen=4096"), ["data.eval_seqlen"]),
    ("c4-offline", _pipe("data.calib=c4"), ["data.calib", "c4", "TOPIARY_C4_DIR"]),
    ("wikitext2-offline", _pipe("data.eval=wikitext2"), ["data.eval", "wikitext2"]),
    ("option-unknown", _pipe("prune.options.bogus=1"), ["prune.options", "bogus", "alpha_search"]),
    ("option-nan", _pipe("prune.method=sparsegpt", "prune.options.percdamp=.nan"), ["percdamp", "nan"]),
    (
        "option-range",
        _pipe("prune.method=sparsegpt", "prune.options.percdamp=-1"),
        ["prune.options", "percdamp=-1 must be >= 0"],
    ),
    ("option-type", _pipe("prune.method=admm", "prune.options.iters=2.5"), ["iters", "integer"]),
    ("pattern-width", _pipe("prune.pattern=3:7"), ["prune.pattern", "3:7", "width"]),
    ("pattern-malformed", _pipe("prune.pattern=2-4"), ["prune.pattern", "2-4"]),
    ("owl-with-pattern", _pipe("prune.pattern=2:4", "prune.owl=true"), ["owl", "2:4"]),
    (
        "method-and-sparsity",
        _pipe("prune.method=nope", "prune.sparsity=1.5"),
        ["prune.method", "prune.sparsity"],
    ),
    ("nsamples-zero", _pipe("data.nsamples=0"), ["data.nsamples"]),
    ("set-under-a-value", _pipe("model.name.x=1"), ["model.name.x", "model.name"]),
    ("set-without-equals", ["pipeline", "--config", PIPELINE, "--set", "prune.method"], ["key=value"]),
    ("device-cuda", _pipe("model.device=cuda"), ["model.device", "cuda", "GPU"]),
    ("device-unknown", _pipe("model.device=tpu9"), ["model.device", "tpu9"]),
    ("devices-zero", _pipe("model.devices=0"), ["model.devices", "greater than or equal to 1"]),
    (
        "devices-over-windows",
        _pipe("model.devices=3", "data.nsamples=2"),
        ["model.devices", "3 processes", "2 calibration windows"],
    ),
    ("nodes-without-address", _pipe("model.num_nodes=2"), ["num_nodes", "nodes_address"]),
    (
        "strategy-fsdp-on-cpu",
        _pipe("model.devices=2", "model.device=cpu", "model.strategy=fsdp"),
        ["model.strategy", "fsdp", "CUDA"],
    ),
    ("strategy-unknown", _pipe("model.strategy=ddp_spawn"), ["model.strategy", "model_parallel"]),
    (
        "nodes-unreachable",
        _pipe("model.num_nodes=2", "model.nodes_address=tcp://127.0.0.1:9"),
        ["model.nodes_address", "127.0.0.1:9"],
    ),
    ("calib-latin1", _pipe("data.calib={fx}/latin.txt"), ["latin.txt", "UTF-8"]),
    ("calib-bad-jsonl", _pipe("data.calib={fx}/bad.jsonl"), ["bad.jsonl", "line 2"]),
    ("calib-missing-file", _pipe("data.calib={fx}/nothere.txt"), ["data.calib", "nothere.txt"]),
    ("model-no-config", _pipe("model.name={fx}/noconf"), ["model.name", "config.json"]),
    ("model-truncated", _pipe("model.name={fx}/truncated"), ["model.name", "model.safetensors"]),
    ("model-missing-tensor", _pipe("model.name={fx}/missing"), ["model.layers.1.mlp.up_proj.weight"]),
    ("model-bert-as-causal-lm", _pipe("model.name={fx}/bert"), ["BertLMHeadModel", "cls.predictions"]),
    ("model-no-tokenizer", _pipe("model.name={fx}/notok"), ["model.name", "notok has no tokenizer"]),
    ("model-missing-path", _pipe("model.name=./nonexistent-dir"), ["./nonexistent-dir", "does not exist"]),
    (
        "model-hub-offline",
        _pipe("model.name=some-org/no-such-model"),
        ["some-org/no-such-model", "HF_HUB_OFFLINE"],
    ),
    ("work-dir-under-file", _pipe("work_dir={fx}/afile/work"), ["work_dir", "afile"]),
    ("work-dir-read-only", _pipe("work_dir=/proc/topiary-work"), ["work_dir", "/proc"]),
    (
        "tracking-scheme",
        _pipe("tracking.uri=nosuch://x"),
        ["tracking.uri", "nosuch://x", "sqlite:///mlflow.db"],
    ),
    ("tracking-under-file", _pipe("tracking.uri=sqlite:///{fx}/afile/mlflow.db"), ["tracking.uri", "afile"]),
    ("zeroshot-unknown-task", _pipe("zeroshot.tasks=[nosuchtask]"), ["zeroshot.tasks", "nosuchtask"]),
    ("config-missing", ["pipeline", "--config", "{fx}/none.yaml"], ["none.yaml", "does not exist"]),
    ("config-bad-yaml", ["pipeline", "--config", "{fx}/broken.yaml"], ["broken.yaml", "YAML"]),
    (
        "config-duplicate-key",
        ["pipeline", "--config", "{fx}/twice.yaml"],
        ["twice.yaml", "'prune'", "3 and 7"],
    ),
    ("validate-duplicate-key", ["validate", "{fx}/twice.yaml"], ["twice.yaml", "'prune'", "lines 3 and 7"]),
    ("sweep-seqlen", ["sweep", "--config", SWEEP, "--set", "data.seqlen=4096"], ["data.seqlen"]),
    ("sweep-method", ["sweep", "--config", SWEEP, "--set", "methods=[wanda, nope]"], ["nope"]),
    (
        "sweep-pattern-width",
        ["sweep", "--config", SWEEP, "--set", "settings=[3:7]"],
        ["prune.pattern", "3:7"],
    ),
    (
        "sweep-option-range",
        ["sweep", "--config", SWEEP, "--set", "prune.method=sparsegpt", "--set", "methods=[sparsegpt]"]
        + ["--set", "prune.options.blocksize=0"],
        ["prune.options", "blocksize=0 must be >= 1"],
    ),
    ("prune-pattern-width", _prune("--pattern", "3:7"), ["--pattern", "3:7", "width"]),
    ("prune-option-nan", _prune("--option", "percdamp=.nan", method="sparsegpt"), ["--option", "percdamp"]),
    (
        "prune-option-percdamp-negative",
        _prune("--option", "percdamp=-1", method="sparsegpt"),
        ["--option", "percdamp=-1 must be >= 0"],
    ),
    (
        "prune-option-blocksize-zero",
        _prune("--option", "blocksize=0", method="sparsegpt"),
        ["--option", "blocksize=0 must be >= 1"],
    ),
    ("prune-option-unknown", _prune("--option", "bogus=1"), ["--option", "bogus"]),
    ("prune-method-unknown", _prune(method="nope"), ["--method", "nope"]),
    ("prune-output-under-file", _prune("--output", "{fx}/afile/out"), ["--output", "afile"]),
    ("prune-output-read-only", _prune("--output", "/proc/topiary/out"), ["--output", "/proc"]),
    (
        "prune-output-not-ours",
        _prune("--output", "{fx}/notes"),
        ["{fx}/notes", "not a previous Topiary output"],
    ),
    ("prune-device-cuda", _prune("--device", "cuda"), ["--device", "cuda"]),
    ("prune-devices-zero", _prune("--devices", "0"), ["--devices", "at least 1"]),
    (
        "prune-devices-over-windows",
        _prune("--devices", "5", "--nsamples", "4"),
        ["--devices", "5 processes", "4"],
    ),
    (
        "prune-nodes-over-windows",
        _prune("--devices", "2", "--num-nodes", "2", "--nsamples", "3"),
        ["--devices", "4 processes share 3 calibration windows"],
    ),
    ("prune-device-unknown", _prune("--device", "tpu9"), ["--device", "tpu9"]),
    (
        "prune-strategy-deepspeed-on-cpu",
        _prune("--devices", "2", "--device", "cpu", "--strategy", "deepspeed"),
        ["--strategy", "deepspeed", "CUDA"],
    ),
    ("prune-calib-latin1", _prune("--calib", "{fx}/latin.txt"), ["--calib", "latin.txt"]),
    ("prune-calib-c4", _prune("--calib", "c4"), ["--calib", "c4"]),
    ("prune-seqlen", _prune("--seqlen", "4096"), ["--seqlen", "4096"]),
    ("prune-nsamples", _prune("--nsamples", "0"), ["--nsamples"]),
    ("prune-missing-tensor", _prune(model="{fx}/missing"), ["model.layers.1.mlp.up_proj.weight"]),
    ("prune-no-tokenizer", _prune(model="{fx}/notok", method="magnitude"), ["notok has no tokenizer"]),
    ("prune-missing-args", ["prune", "embedded", "--sparsity", "0.5"], ["--output"]),
    ("ppl-batch-size-zero", _ppl("--batch-size", "0"), ["--batch-size", "0"]),
    ("ppl-seqlen", _ppl("--seqlen", "4096"), ["--seqlen", "4096"]),
    ("ppl-latin1", ["eval", "ppl", "embedded", "--data", "{fx}/latin.txt"], ["--data", "latin.txt"]),
    ("ppl-truncated", _ppl(model="{fx}/truncated"), ["model.safetensors"]),
    ("ppl-no-tokenizer", _ppl(model="{fx}/notok"), ["notok has no tokenizer"]),
    ("ppl-no-config", _ppl(model="{fx}/noconf"), ["config.json"]),
    ("ppl-device-unknown", _ppl("--device", "tpu9"), ["--device", "tpu9"]),
    ("ppl-nan-weight", _ppl(model="{fx}/nan"), ["model.layers.0.mlp.down_proj.weight", "NaN"]),
    ("ppl-unknown-flag", _ppl("--bogus"), ["--bogus"]),
    (
        "zeroshot-limit-zero",
        ["eval", "zeroshot", "embedded", "--tasks", "embedded", "--limit", "0"],
        ["--limit"],
    ),
    (
        "zeroshot-unknown",
        ["eval", "zeroshot", "embedded", "--tasks", "nosuchtask"],
        ["--tasks", "nosuchtask"],
    ),
    ("registry-no-store", ["registry", "--config", PIPELINE], ["tracking.uri", "mlflow.db"]),
    ("promote-no-store", ["promote", "0123abcd", "--config", PIPELINE], ["tracking.uri", "mlflow.db"]),
    (
        "registry-unreachable",
        ["registry", "--config", "{fx}/unreachable.yaml"],
        ["tracking.uri", "127.0.0.1:9"],
    ),
]
NEEDS_NO_GPU = {"device-cuda", "prune-device-cuda"}
# Through the real command too: usage errors, config errors and preflight failures (each process
# imports torch and transformers, seconds each, so the sample is small).
SUBPROCESS_SAMPLE = [
    "ppl-unknown-flag",
    "prune-missing-args",
    "set-without-equals",
    "registry-no-store",
    "method-and-sparsity",
    "option-unknown",
    "option-nan",
    "set-under-a-value",
    "tracking-unreachable",
    "model-missing-tensor",
]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """The bad inputs: broken model folders, files in the wrong encoding or format, a file as a folder."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bad-inputs")
    weights = load_file(REFERENCE_DIR / "model.safetensors")
    for name in ("missing", "truncated", "noconf", "nan", "notok"):
        shutil.copytree(REFERENCE_DIR, root / name)
    for path in (root / "notok").glob("tokenizer*"):
        path.unlink()
    save_file(
        {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"},
        root / "missing" / "model.safetensors",
    )
    data = (REFERENCE_DIR / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (root / "noconf" / "config.json").unlink()
    nan = dict(weights)
    nan["model.layers.0.mlp.down_proj.weight"] = nan["model.layers.0.mlp.down_proj.weight"].clone()
    nan["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(nan, root / "nan" / "model.safetensors", metadata={"format": "pt"})
    bert = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(bert).save_pretrained(root / "bert")
    (root / "latin.txt").write_bytes("Caf\xe9 cr\xe8me, na\xefve r\xe9sum\xe9.\n".encode("latin-1") * 50)
    (root / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (root / "eval.txt").write_text("Return the sum of a and b, raising TypeError for strings.\n" * 40)
    (root / "broken.yaml").write_text("model: [unclosed\n")
    twice = "model:\n  name: embedded\nprune:\n  method: wanda\ndata:\n  nsamples: 8\n"
    twice += "prune:\n  method: sparsegpt\n"  # line 7: a second prune section
    (root / "twice.yaml").write_text(twice)
    (root / "afile").write_text("a file, not a folder\n")
    (root / "notes").mkdir()
    (root / "notes" / "keep.txt").write_text("not a Topiary output\n")
    text = Path(PIPELINE).read_text().replace("sqlite:///mlflow.db", UNREACHABLE)
    (root / "unreachable.yaml").write_text(text)
    return root


def _argv(argv: list[str], fx: Path, out: Path) -> list[str]:
    return [a.replace("{fx}", str(fx)).replace("{out}", str(out)) for a in argv]


def _needles(needles: list[str], fx: Path) -> list[str]:
    return [n.replace("{fx}", str(fx)) for n in needles]


def _tree(*roots: Path) -> set[str]:
    """Every path (files and folders) under ``roots``."""
    return {str(p) for root in roots for p in root.rglob("*")}


def _check_stderr(stderr: str, needles: list[str]) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {stderr}"
    line = lines[0]
    assert line.startswith("topiary: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A fresh work folder (the current directory), output parent and TMPDIR."""
    work, parent, tmp = tmp_path / "work", tmp_path / "outputs", tmp_path / "tmp"
    for p in (work, parent, tmp):
        p.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.delenv("TOPIARY_C4_DIR", raising=False)
    monkeypatch.delenv("TOPIARY_WIKITEXT2_DIR", raising=False)
    return work, parent / "pruned", tmp


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
    assert set(SUBPROCESS_SAMPLE) <= {c[0] for c in CASES} and len(SUBPROCESS_SAMPLE) == 10


def _run(argv: list[str]) -> int:
    """``main(argv)``'s exit status; argparse's usage errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code)


@pytest.mark.parametrize(("argv", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_in_process(request, fx, places, capsys, argv, needles):
    if request.node.callspec.id in NEEDS_NO_GPU and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    work, out, tmp = places
    before = _tree(work, out.parent, tmp, fx)
    assert _run(_argv(argv, fx, out)) == 2
    _check_stderr(capsys.readouterr().err, _needles(needles, fx))
    assert _tree(work, out.parent, tmp, fx) == before, "a failed command must write nothing"


def _command() -> list[str]:
    """The installed ``topiary`` console script, else the same entry point through ``-m``."""
    script = shutil.which("topiary", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "flows.cli"]


def _subprocess(argv: list[str], cwd: Path, tmp: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("TOPIARY_C4_DIR", None)
    env.pop("PREFECT_HOME", None)  # the default, under the work folder: a failed command removes it again
    start = time.perf_counter()
    proc = subprocess.run([*_command(), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - start


@pytest.mark.slow
def test_bad_input_through_the_real_command(fx, tmp_path):
    """The sample through real processes (two at a time): exit 2, one line, nothing written."""
    cases = {c[0]: c for c in CASES}
    jobs = []
    for name in SUBPROCESS_SAMPLE:
        work, tmp = tmp_path / name / "work", tmp_path / name / "tmp"
        work.mkdir(parents=True)
        tmp.mkdir()
        out = tmp_path / name / "outputs" / "pruned"
        out.parent.mkdir()
        jobs.append(
            (name, _argv(cases[name][1], fx, out), _needles(cases[name][2], fx), work, out.parent, tmp)
        )
    before = _tree(fx)
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda job: _subprocess(job[1], job[3], job[5]), jobs))
    for (name, _, needles, work, parent, tmp), (proc, seconds) in zip(jobs, runs, strict=True):
        print(f"{name}: exit {proc.returncode} in {seconds:.1f} s")
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
        _check_stderr(proc.stderr, needles)
        assert not _tree(work, parent, tmp), f"{name}: a failed command must write nothing"
    assert _tree(fx) == before


def test_unreachable_tracking_fails_fast_before_any_model_work(fx, places, capsys):
    """The issue's bound: an unreachable tracking server is found in under 15 s, up front."""
    work, _, _ = places
    start = time.perf_counter()
    assert _run(_pipe(f"tracking.uri={UNREACHABLE}")) == 2
    assert time.perf_counter() - start < 15
    _check_stderr(capsys.readouterr().err, ["tracking.uri"])
    assert not (work / ".topiary").exists()


def test_preflight_passes_what_can_run(tmp_path):
    """No false alarm: the shipped configs, a reachable HTTP tracking server, a work folder to create."""
    import http.server
    import threading

    from configs.schema import PipelineCfg, SweepCfg, load_config
    from flows.preflight import preflight_eval, preflight_run
    from flows.sweep import sweep_jobs

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        work = tmp_path / "new" / "work"
        cfg = load_config(PIPELINE, PipelineCfg, {"tracking.uri": uri, "work_dir": str(work)})
        preflight_run(cfg)
    finally:
        server.shutdown()
        server.server_close()
    sweep = load_config(SWEEP, SweepCfg, {"work_dir": str(work)})
    preflight_run(sweep, sweep_jobs(sweep))
    section = {"method": "wanda", "sparsity": None, "pattern": "2:4", "options": {}, "owl": False}
    data = {"calib": "embedded", "eval": "embedded", "nsamples": 8, "seqlen": 64}
    prune = PipelineCfg(model={"device": "cpu"}, data=data, prune=section)
    preflight_run(prune, output=tmp_path / "new" / "out")
    preflight_eval("embedded", "cpu", data="embedded", seqlen=128, batch_size=8)
    # magnitude reads no calibration data: an unreachable source and too few windows do not matter
    magnitude = {"method": "magnitude", "sparsity": 0.5, "options": {}}
    model = {"name": str(REFERENCE_DIR), "device": "cpu", "devices": 2}
    data = {"calib": "c4", "eval": "c4", "nsamples": 1, "seqlen": 64}
    preflight_run(PipelineCfg(model=model, data=data, prune=magnitude), output=tmp_path / "new" / "out")
    preflight_eval("embedded", "auto", tasks=["embedded"], limit=5)
    assert not (tmp_path / "new").exists()


def test_the_tracking_schemes_are_mlflows():
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    from flows.preflight import TRACKING_SCHEMES, TRACKING_STORES

    assert set(TRACKING_SCHEMES) | set(TRACKING_STORES) == set(_tracking_store_registry._registry)


@pytest.mark.slow
def test_magnitude_neither_needs_nor_computes_calibration_data(places, capsys, monkeypatch):
    """``topiary prune FOLDER --method magnitude`` (calibration source: C4, the default for a folder,
    unreachable here) prunes, and computes no calibration windows."""
    work, out, _ = places
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (
        _run(
            ["prune", str(REFERENCE_DIR), "--method", "magnitude", "--sparsity", "0.5", "--output", str(out)]
        )
        == 0
    )
    assert "achieved sparsity 0.5000" in capsys.readouterr().out
    assert not (work / ".topiary" / "calibration").exists()


def test_a_tracking_server_that_never_answers_is_given_up_on_in_time():
    """A server that accepts the connection but never replies: the probe's timeout bounds the wait."""
    import socket

    from flows.preflight import check_tracking
    from modules.errors import TopiaryError

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel completes the handshake; nobody ever reads or answers
        start = time.perf_counter()
        with pytest.raises(TopiaryError, match="tracking.uri.*not reachable"):
            check_tracking(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=1.0)
        assert time.perf_counter() - start < 10


def test_the_process_count_is_devices_times_nodes():
    """Each of ``devices x num_nodes`` processes needs a calibration window of its own."""
    from flows.preflight import check_processes
    from modules.errors import TopiaryError

    check_processes(2, 2, "cpu", 4)
    with pytest.raises(TopiaryError, match="4 processes share 3 calibration windows"):
        check_processes(2, 2, "cpu", 3)


def _sqlite_store(path: Path) -> Path:
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("CREATE TABLE runs (x)")
        con.commit()
    return path


def test_a_locked_tracking_store_is_refused_before_any_work(fx, places, capsys):
    """Another real process holds the SQLite store's write lock: the preflight's bounded write probe
    says so in one line, before any model work, and nothing is written."""
    work, _, _ = places
    store = _sqlite_store(work.parent / "locked.db")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(store)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(work)
        start = time.perf_counter()
        assert _run(_pipe(f"tracking.uri=sqlite:///{store}")) == 2
        assert time.perf_counter() - start < 30
    finally:
        holder.kill()
        holder.wait()
    _check_stderr(capsys.readouterr().err, ["tracking.uri", "locked.db", "write lock", "database is locked"])
    assert _tree(work) == before


_HOLD_LOCK = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(300)
"""


@pytest.fixture
def read_only_store(tmp_path):
    """A SQLite store that cannot be written: immutable (``chattr +i``, which binds root too) or,
    for another user, without write permission."""
    store = _sqlite_store(tmp_path / "readonly.db")
    if os.geteuid() != 0:
        store.chmod(0o444)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(store)]).returncode:
        pytest.skip("root, and this file system cannot make a file immutable")
    yield store
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(store)], check=True)


def test_a_read_only_tracking_store_is_refused_before_any_work(fx, places, capsys, read_only_store):
    work, _, _ = places
    before = _tree(work, read_only_store.parent)
    assert _run(_pipe(f"tracking.uri=sqlite:///{read_only_store}")) == 2
    _check_stderr(capsys.readouterr().err, ["tracking.uri", "readonly.db", "cannot be written"])
    assert _tree(work, read_only_store.parent) == before


def test_check_tracking_refuses_an_unknown_scheme_a_locked_and_a_read_only_store(tmp_path, read_only_store):
    """The preflight's tracking check alone (the CLI cases above run whole commands)."""
    from flows.preflight import check_tracking
    from modules.errors import TopiaryError

    with pytest.raises(TopiaryError, match="'nosuch' is not a tracking store scheme"):
        check_tracking("nosuch://x")
    store = _sqlite_store(tmp_path / "locked.db")
    check_tracking(f"sqlite:///{store}", timeout=0.5)  # free: passes
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(store)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TopiaryError, match="write lock of .*locked.db"):
            check_tracking(f"sqlite:///{store}", timeout=0.5)
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(TopiaryError, match="readonly.db cannot be written"):
        check_tracking(f"sqlite:///{read_only_store}", timeout=0.5)


def _poisoned(fx: Path, name: str, value: float, dtype: torch.dtype) -> Path:
    """The reference model saved in ``dtype`` with ``value`` in block 1's ``q_proj``."""
    from safetensors.torch import load_file, save_file

    folder = fx / name
    if not folder.exists():
        shutil.copytree(REFERENCE_DIR, folder)
        weights = {k: v.to(dtype) for k, v in load_file(REFERENCE_DIR / "model.safetensors").items()}
        weights["model.layers.1.self_attn.q_proj.weight"][2, 3] = value
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    ("name", "value", "stored", "dtype", "method", "needles", "not_said"),
    [
        (
            "nan-fp32",
            float("nan"),
            torch.float32,
            "float32",
            "sparsegpt",
            ["1 NaN", "as stored (float32)"],
            "fp16",
        ),
        ("nan-fp32", float("nan"), torch.float32, "float32", "magnitude", ["1 NaN"], "fp16"),
        ("inf-fp16", float("inf"), torch.float16, "float32", "wanda", ["1 Inf", "fp16 checkpoint"], None),
        ("big-fp32", 1e6, torch.float32, "float16", "wanda", ["overflows float16", "1e+06"], "NaN"),
    ],
)
def test_a_non_finite_weight_is_named_where_it_is_read(
    fx, places, capsys, name, value, stored, dtype, method, needles, not_said
):
    """Block 1's ``q_proj`` is checked as it is read, before anything is computed from it: the line
    names that tensor (not a statistic downstream), hints at fp16 overflow only where fp16 is in
    play, and no resume state or output is left (only the cached calibration windows)."""
    work, out, _ = places
    model = _poisoned(fx, name, value, stored)
    extra = ("--calib", "embedded", "--nsamples", "4", "--seqlen", "32", "--dtype", dtype)
    assert _run(_argv(_prune(*extra, model=str(model), method=method), fx, out)) == 2
    err = capsys.readouterr().err  # block 0's progress lines, then the error
    assert err.count("topiary: error") == 1 and err.startswith("block 1/4")
    line = _check_stderr(err.strip().splitlines()[-1], ["model.layers.1.self_attn.q_proj.weight", *needles])
    assert not_said is None or not_said not in line
    assert not out.exists()
    assert {p.relative_to(work).parts[:2] for p in work.rglob("*") if p.is_file()} <= {
        (".topiary", "calibration"),
        (".topiary", "lock"),
    }
    assert not (work / ".topiary" / "runs").exists()


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (_prune("--output", "{small}/out", method="magnitude"), ["--output", "{small}/out", "MB is free"]),
        (_prune("--work-dir", "{small}/work"), ["--work-dir", "{small}/work", "topiary plan's estimate"]),
        (_pipe("work_dir={small}/work"), ["work_dir", "{small}/work", "12.24 MB on this disk"]),
    ],
    ids=["prune-output", "prune-work-dir", "pipeline-work-dir"],
)
def test_a_disk_too_small_for_the_plan_is_refused_before_any_work(places, capsys, tmp_path, argv, needles):
    """A real 2 MB disk against ``topiary plan``'s estimate of the run (about 6 MB for the work folder
    or the output of the embedded model, 12 MB for a pipeline's work folder that holds both)."""
    from tests.helpers import small_disk

    work, out, _ = places
    with small_disk(tmp_path / "small") as small:
        fill = [a.replace("{small}", str(small)) for a in argv]
        before = _tree(work, out.parent, small)
        assert _run([a.replace("{out}", str(out)) for a in fill]) == 2
        _check_stderr(capsys.readouterr().err, [n.replace("{small}", str(small)) for n in needles])
        assert _tree(work, out.parent, small) == before


def test_the_preflight_names_the_key_an_error_carries_not_its_text():
    """An engine error blames an input as data (``TopiaryError.key``); the preflight reports it under
    the user's name for that input (a config key, or a flag), and never reads a key out of the text."""
    from flows.preflight import CLI_FLAGS, Problems
    from modules.errors import TopiaryError

    def fails(error: TopiaryError) -> None:
        raise error

    keys = {"": "data.calib", "seqlen": "data.seqlen"}
    for names, seqlen, calib in ((None, "data.seqlen", "data.calib"), (CLI_FLAGS, "--seqlen", "--calib")):
        problems = Problems(names)
        problems.run(keys, fails, TopiaryError("4096 is longer than the context", key="seqlen"))
        problems.run(keys, fails, TopiaryError("seqlen: reads like a label, but is text"))
        problems.run(keys, fails, TopiaryError("no documents", key="data source"))
        assert problems.items == [
            f"{seqlen}: 4096 is longer than the context",
            f"{calib}: seqlen: reads like a label, but is text",
            f"{calib}: no documents",
        ]
    assert str(TopiaryError("no documents", key="data source")) == "data source: no documents"
