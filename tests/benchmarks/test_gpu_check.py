"""``make gpu-check``'s CPU dry run (``--device cpu --small``): the report's fields, and every
ratio computed from what was measured, beside ``topiary plan``'s prediction recomputed here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from modules.engine.plan import arch_from_config, host_memory, make_plan

ROOT = Path(__file__).resolve().parents[2]
STAGES = {  # each method's stages, by topiary plan's names
    "wanda": ["windows", "statistics", "masks", "propagate", "assemble"],
    "sparsegpt": ["windows", "statistics", "update", "propagate", "assemble"],
    "admm-grad": ["windows", "statistics", "update", "propagate", "assemble"],
}
CUDA_CASES = 10  # tests/engine/test_cuda.py's 8 and test_ddp.py's fsdp and deepspeed


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), "--device", "cpu", "--small"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


@pytest.mark.slow
def test_dry_run_reports_versions_skipped_cuda_tests_and_moe(dry_run):
    report, md = dry_run
    assert report["complete"] and report["device"] == "cpu" and report["small"]
    v = report["versions"]
    assert v["gpu"] == "cpu" and v["torch"] == torch.__version__ and v["cuda"] == "none"
    assert all(v[k] not in ("", "not installed") for k in ("transformers", "lightning", "safetensors"))
    assert len(v["topiary_commit"]) == 40 and v["commit_from"] == "git"
    tests = report["cuda_tests"]
    ids = [c["id"] for c in tests["cases"]]
    assert len(ids) == CUDA_CASES and sum("test_ddp.py::" in i for i in ids) == 2
    assert {c["outcome"] for c in tests["cases"]} == {"skipped"}  # never "passed" without CUDA
    assert tests["counts"] == {"passed": 0, "failed": 0, "error": 0, "skipped": CUDA_CASES}
    assert report["moe"] == "skipped: mixture-of-experts pruning not supported yet"
    assert f"{CUDA_CASES} of {CUDA_CASES} skipped" in md and "| passed |" not in md
    assert "## Mixture of experts" in md and report["moe"] in md


def plan_of(size: dict, method: str, blocks: int):
    """topiary plan's estimate for the dry run's checkpoint, computed here on its own."""
    cfg = {
        "hidden_size": size["hidden"],
        "intermediate_size": size["intermediate"],
        "num_attention_heads": size["heads"],
        "num_key_value_heads": size["kv_heads"],
        "num_hidden_layers": blocks,
        "vocab_size": 4096,
    }
    return make_plan(
        arch_from_config(cfg),
        method=method,
        device_memory=host_memory(),
        host_memory=host_memory(),
        nsamples=size["nsamples"],
        seqlen=size["seqlen"],
        dtype=size["dtype"],
    )


@pytest.mark.slow
def test_every_stage_is_measured_and_every_ratio_comes_from_the_measurement(dry_run):
    report, md = dry_run
    size = report["blocks"]["size"]
    n = size["blocks"]
    assert n == 2 and (size["nsamples"], size["seqlen"]) == (8, 64)
    assert report["memory_measure"].startswith("process peak resident set")
    assert list(report["blocks"]["methods"]) == list(STAGES)
    for method, row in report["blocks"]["methods"].items():
        assert row["status"] == "ran", (method, row["status"])
        assert list(row["stages"]) == STAGES[method], method
        plan = plan_of(size, method, n)
        for name, st in row["stages"].items():
            per = n if name in gpu_check.PER_BLOCK else 1
            runs = st["runs"]
            blocks = sorted(r["block"] for r in runs)
            assert blocks == (list(range(n)) if per == n else [None]), (method, name)
            assert all(r["seconds"] > 0 and r["peak_bytes"] > 0 for r in runs), (method, name)
            seconds = sum(r["seconds"] for r in runs) / per
            assert st["seconds"] == pytest.approx(seconds, abs=1e-4), (method, name)
            assert st["peak_bytes"] == max(r["peak_bytes"] for r in runs), (method, name)
            predicted = plan.stage(name)
            assert st["plan_seconds"] == pytest.approx(predicted.seconds / per), (method, name)
            assert st["plan_peak_bytes"] == predicted.device, (method, name)
            for key, measured, plan_value in (
                ("time_ratio", seconds, predicted.seconds / per),
                ("peak_ratio", st["peak_bytes"], predicted.device),
            ):
                if plan_value:  # a ratio where plan predicts something, from the measured figure
                    assert st[key] == pytest.approx(measured / plan_value, rel=1e-3), (method, name, key)
                else:
                    assert st[key] is None, (method, name, key)
            assert f"| {name} | {'block' if per == n else 'run'} |" in md
        whole = row["extrapolated"]
        stages = row["stages"]
        expect = sum(80 * st["seconds"] for k, st in stages.items() if k in gpu_check.PER_BLOCK)
        expect += stages["windows"]["seconds"] + stages["assemble"]["seconds"] * 80 / n
        assert whole["blocks"] == 80 and whole["seconds"] == pytest.approx(expect, abs=0.1)
        assert whole["peak_bytes"] == max(st["peak_bytes"] for st in stages.values())
        full = plan_of(size, method, 80)
        assert whole["plan_seconds"] == pytest.approx(
            sum(s.seconds for s in full.stages if s.name != "eval"), abs=0.1
        )


def test_junit_outcomes(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.a" name="t_ok" time="1.5"/>'
        '<testcase classname="tests.a" name="t_bad" time="2"><failure message="assert 1 == 2">x</failure>'
        '</testcase><testcase classname="tests.b" name="t_err"><error message="boom"/></testcase>'
        '<testcase classname="tests.b" name="t_skip"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    cases = gpu_check.junit_cases(xml)
    assert [(c["id"], c["outcome"], c["message"]) for c in cases] == [
        ("tests/a.py::t_ok", "passed", ""),
        ("tests/a.py::t_bad", "failed", "assert 1 == 2"),
        ("tests/b.py::t_err", "error", "boom"),
        ("tests/b.py::t_skip", "skipped", "needs a CUDA device"),
    ]


@pytest.mark.parametrize(
    "args",
    [["--device", "tpu9"], ["--device", "cpu", "--budget-s", "0"], ["--device", "cpu", "--blocks", "1"]],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args):
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: error:")
    assert not out.exists()


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert "not a folder" in capsys.readouterr().err and (tmp_path / "out").read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cuda_asked_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "cuda" in capsys.readouterr().err and not (tmp_path / "out").exists()
