"""MLflow tracking of a run (config, results, artifacts) and the PNG plots, on a real store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from configs.schema import GateCfg, PipelineCfg, PruneCfg, SweepCfg, TrackingCfg, ZeroShotCfg
from modules.errors import TopiaryError
from tests.helpers import report_dict  # noqa: E402
from tracking.plots import plot_blocks, plot_ppl_vs_sparsity
from tracking.runs import (
    block_rows,
    client,
    end_run,
    ensure_experiment,
    flatten,
    load_run_config,
    log_config,
    log_model,
    log_results,
    log_sweep,
    results_metrics,
    start_run,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

REPORT = report_dict([0.48, 0.50, 0.52], [0.01, 0.02, 0.04])  # as modules.engine.report writes it
RESULTS = {
    "dense": {
        "ppl": {"ppl": 10.0, "nll": math.log(10.0), "tokens": 1270, "windows": 10, "seqlen": 128},
        "zeroshot": {"tasks": {"boolq": {"acc": 0.6, "acc_norm": 0.62}, "rte": {"acc": 0.5}}, "mean": 0.55},
    },
    "pruned": {
        "ppl": {"ppl": 12.5, "nll": math.log(12.5), "tokens": 1270, "windows": 10, "seqlen": 128},
        "zeroshot": {"tasks": {"boolq": {"acc": 0.58, "acc_norm": 0.6}, "rte": {"acc": 0.48}}},
    },
    "pruning": REPORT,
    "stages": {"calibrate": {"seconds": 1.5, "peak_mem_mb": 300.0}, "prune": {"seconds": 2.0}},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store with its artifact root in a temporary folder, shared by the module."""
    root = tmp_path_factory.mktemp("mlflow")
    return {"root": root, "tracking": TrackingCfg(uri=f"sqlite:///{root}/mlflow.db", experiment="tests")}


def _start(store: dict, cfg: PipelineCfg | None = None) -> tuple[str, PipelineCfg]:
    cfg = cfg or PipelineCfg(tracking=store["tracking"])
    return start_run(cfg, "test", artifact_location=str(store["root"] / "artifacts")), cfg


def _download(store: dict, run_id: str, path: str, tmp_path: Path) -> Path:
    return Path(client(store["tracking"]).download_artifacts(run_id, path, str(tmp_path)))


def test_flatten_nests_with_dots():
    tree = {"a": {"b": 1, "c": {"d": None}, "e": {}}, "f": [1, "x"], "g": True}
    assert flatten(tree) == {"a.b": "1", "a.c.d": "None", "a.e": "{}", "f": '[1, "x"]', "g": "True"}


def test_config_is_logged_as_params_and_yaml_that_round_trips(store, tmp_path):
    cfg = PipelineCfg(
        prune=PruneCfg(method="admm", pattern="2:4", options={"iters": 5, "lam": 0.2}),
        zeroshot=ZeroShotCfg(tasks=["boolq", "rte"], limit=10),
        gate=GateCfg(max_ppl_ratio=1.5, primary_metric="zeroshot_mean"),
        tracking=store["tracking"],
    )
    run_id, _ = _start(store, cfg)
    log_config(run_id, cfg)
    run = client(store["tracking"]).get_run(run_id)
    params = run.data.params
    assert params["prune.method"] == "admm" and params["prune.pattern"] == "2:4"
    assert params["prune.sparsity"] == "None"
    assert params["prune.options.iters"] == "5" and params["prune.options.lam"] == "0.2"
    assert params["zeroshot.tasks"] == '["boolq", "rte"]' and params["gate.max_ppl_ratio"] == "1.5"
    assert params == flatten(cfg.model_dump(mode="json"))
    assert run.data.tags["topiary.method"] == "admm" and run.data.tags["topiary.setting"] == "2:4"
    assert run.info.status == "RUNNING"

    back = load_run_config(run_id, store["tracking"])
    assert type(back) is PipelineCfg and back == cfg
    assert "method: admm" in _download(store, run_id, "config.yaml", tmp_path).read_text()

    end_run(run_id, store["tracking"], "FAILED")
    assert client(store["tracking"]).get_run(run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="status: 'DONE' is not one of FINISHED, FAILED, KILLED"):
        end_run(run_id, store["tracking"], "DONE")


def test_new_experiment_keeps_artifacts_next_to_a_sqlite_store(store):
    tracking = store["tracking"].model_copy(update={"experiment": "no-location-given"})
    experiment_id = ensure_experiment(tracking)
    location = client(tracking).get_experiment(experiment_id).artifact_location
    assert Path(location.removeprefix("file://")) == store["root"] / "mlruns"
    assert ensure_experiment(tracking) == experiment_id


def test_sweep_config_round_trips_as_a_sweep(store):
    cfg = SweepCfg(methods=["magnitude", "wanda"], settings=["0.5", "2:4"], tracking=store["tracking"])
    run_id, _ = _start(store, cfg)
    log_config(run_id, cfg)
    assert load_run_config(run_id, store["tracking"]) == cfg
    assert client(store["tracking"]).get_run(run_id).data.tags["topiary.methods"] == "magnitude,wanda"
    child = start_run(PipelineCfg(tracking=store["tracking"]), "member", parent_run_id=run_id)
    assert client(store["tracking"]).get_run(child).data.tags["mlflow.parentRunId"] == run_id


def test_results_metrics_names_and_values():
    got = {(n, s): v for n, v, s in results_metrics(RESULTS)}
    assert got[("ppl_dense_w128", 0)] == 10.0 and got[("ppl_pruned_w128", 0)] == 12.5
    assert got[("ppl_ratio_w128", 0)] == pytest.approx(1.25)
    assert got[("zeroshot_dense_boolq_acc", 0)] == 0.6 and got[("zeroshot_dense_boolq_acc_norm", 0)] == 0.62
    assert ("zeroshot_dense_rte_acc_norm", 0) not in got
    assert got[("zeroshot_dense_mean", 0)] == 0.55
    assert got[("zeroshot_pruned_mean", 0)] == pytest.approx(0.53)  # mean of acc when not given
    assert got[("zeroshot_drop_points", 0)] == pytest.approx(2.0)
    assert got[("sparsity", 0)] == 0.5
    assert [got[("sparsity_block", i)] for i in range(3)] == [0.48, 0.50, 0.52]
    assert [got[("recon_error_block", i)] for i in range(3)] == [0.01, 0.02, 0.04]
    assert got[("time_calibrate_s", 0)] == 1.5 and got[("peak_mem_calibrate_mb", 0)] == 300.0
    assert got[("time_prune_s", 0)] == 2.0 and ("peak_mem_prune_mb", 0) not in got


def test_results_metrics_rejects_percent_accuracies_and_windowless_ppl():
    with pytest.raises(ValueError, match=r"zeroshot.boolq.acc: 61.0 is not a fraction in \[0, 1\]"):
        results_metrics({"dense": {"ppl": 10.0, "seqlen": 64, "zeroshot": {"boolq": {"acc": 61.0}}}})
    with pytest.raises(ValueError, match="results.dense: perplexity without a window length"):
        results_metrics({"dense": {"ppl": 10.0}})
    got = {n: v for n, v, _ in results_metrics({"seqlen": 64, "pruned": {"ppl": 9.0}})}
    assert got == {"ppl_pruned_w64": 9.0}


def test_block_rows_weigh_linears_by_their_size():
    from modules.engine.report import PruneReport

    linears = {"mlp.up_proj": {"shape": [30, 10], "pruned": 180}, "q": {"shape": [10, 10], "pruned": 40}}
    blocks = [
        {
            "index": 1,
            "name": "b.1",
            "target": 0.5,
            "setting": "0.5",
            "linears": linears,
            "reconstruction_error": None,
        },
        {
            "index": 0,
            "name": "b.0",
            "target": 0.5,
            "setting": "0.5",
            "linears": linears,
            "reconstruction_error": 0.3,
        },
    ]
    fields = {"method": "wanda", "setting": "0.5", "target": 0.5, "plan": {}, "nsamples": 2, "seqlen": 8}
    report = PruneReport.from_dict({**fields, "blocks_prefix": "b", "blocks": blocks})
    assert block_rows(report) == [
        {"index": 0, "sparsity": pytest.approx(0.55), "recon_error": 0.3},
        {"index": 1, "sparsity": pytest.approx(0.55), "recon_error": None},
    ]
    assert report.sparsity == pytest.approx(0.55) and report.prunable_params == 800
    assert PruneReport.from_dict(report.to_dict()) == report  # the JSON reads back to the same report


def test_log_results_writes_metrics_json_and_plots(store, tmp_path):
    run_id, _ = _start(store)
    logged = log_results(run_id, RESULTS, store["tracking"], title="sparsegpt 0.5")
    mc = client(store["tracking"])
    metrics = mc.get_run(run_id).data.metrics
    assert metrics["ppl_pruned_w128"] == 12.5 and metrics["zeroshot_pruned_mean"] == pytest.approx(0.53)
    assert logged["ppl_dense_w128"] == 10.0
    history = mc.get_metric_history(run_id, "sparsity_block")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.48), (1, 0.50), (2, 0.52)]
    assert len(mc.get_metric_history(run_id, "recon_error_block")) == 3

    names = {a.path for a in mc.list_artifacts(run_id)} | {a.path for a in mc.list_artifacts(run_id, "plots")}
    assert {"evaluation.json", "pruning_report.json", "plots/blocks.png"} <= names
    assert json.loads(_download(store, run_id, "pruning_report.json", tmp_path).read_text()) == REPORT
    evaluation = json.loads(_download(store, run_id, "evaluation.json", tmp_path).read_text())
    assert evaluation["pruned"]["ppl"]["ppl"] == 12.5 and "pruning" not in evaluation
    assert _download(store, run_id, "plots/blocks.png", tmp_path).read_bytes().startswith(PNG_MAGIC)


def test_provenance_is_logged_as_params_tags_and_in_evaluation_json(store, tmp_path):
    from modules.provenance import KEYS, provenance

    now = provenance("cpu", "float32")
    older = {**now, "lm_eval": "0.4.12"}  # a dense baseline cached from an older lm-eval
    results = json.loads(json.dumps(RESULTS))
    results["dense"]["ppl"]["provenance"] = older
    results["pruned"]["ppl"]["provenance"] = now
    results["pruned"]["zeroshot"]["provenance"] = now
    results["pruning"] = {**REPORT, "provenance": provenance("cpu", "float32", admm_precision="fp32")}
    run_id, _ = _start(store)
    log_results(run_id, results, store["tracking"])
    run = client(store["tracking"]).get_run(run_id)
    for key in KEYS:
        assert f"provenance.{key}" in run.data.params, key
        assert run.data.tags[f"topiary.provenance.{key}"] == run.data.params[f"provenance.{key}"], key
    params = run.data.params
    assert params["provenance.torch"] == now["torch"] and params["provenance.dtype"] == "float32"
    assert params["provenance.admm_precision"] == "fp32"
    v = now["lm_eval"]
    assert params["provenance.lm_eval"] == f"prune={v}; ppl_dense=0.4.12; ppl_pruned={v}; zeroshot_pruned={v}"
    evaluation = json.loads(_download(store, run_id, "evaluation.json", tmp_path).read_text())
    assert evaluation["provenance"] == {k: params[f"provenance.{k}"] for k in [*KEYS, "admm_precision"]}
    assert evaluation["dense"]["ppl"]["provenance"]["lm_eval"] == "0.4.12"  # each evaluation keeps its own
    report = json.loads(_download(store, run_id, "pruning_report.json", tmp_path).read_text())
    assert report["provenance"]["admm_precision"] == "fp32"


def test_plots_are_png_files(tmp_path):
    blocks = plot_blocks([{"index": 0, "sparsity": 0.5}, {"index": 1, "sparsity": 0.6}], tmp_path / "b.png")
    points = [
        {"method": "magnitude", "sparsity": 0.5, "ppl": 20.0},
        {"method": "magnitude", "sparsity": 0.7, "ppl": 90.0},
        {"method": "wanda", "sparsity": 0.5, "ppl": 14.0},
        {"method": "wanda", "sparsity": 0.7, "ppl": math.inf},
    ]
    curve = plot_ppl_vs_sparsity(points, tmp_path / "sub" / "p.png", dense_ppl=10.0)
    for png in (blocks, curve):
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 1000
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(ValueError, match="no points"):
        plot_ppl_vs_sparsity([], tmp_path / "empty.png")


def test_log_sweep_logs_the_table_and_curve(store, tmp_path):
    run_id, _ = _start(store)
    rows = [
        {"method": "wanda", "setting": "0.5", "sparsity": 0.5, "ppl": 14.0, "run_id": "a"},
        {"method": "wanda", "setting": "0.7", "sparsity": 0.7, "ppl": 40.0, "run_id": "b"},
        {"method": "wanda", "setting": "0.9", "sparsity": None, "ppl": None, "run_id": "c"},  # failed member
    ]
    log_sweep(run_id, rows, store["tracking"], dense_ppl=10.0)
    png = _download(store, run_id, "plots/ppl_vs_sparsity.png", tmp_path)
    assert png.read_bytes().startswith(PNG_MAGIC)
    table = json.loads(_download(store, run_id, "sweep.json", tmp_path).read_text())
    assert table["dense_ppl"] == 10.0 and [r["run_id"] for r in table["runs"]] == ["a", "b", "c"]


def test_log_model_refuses_a_folder_without_a_model(store, tmp_path):
    run_id, _ = _start(store)
    with pytest.raises(TopiaryError, match="is not a saved Hugging Face model"):
        log_model(run_id, tmp_path, store["tracking"])


def test_a_dead_owners_running_run_is_ended_by_the_next_start(store):
    import socket
    import subprocess
    import sys

    from modules.process import owner_id
    from tracking.runs import ENDED_BY_TAG, OWNER_TAG, STALE_CLEANUP, end_stale_runs

    tracking = store["tracking"].model_copy(update={"experiment": "stale-runs"})
    cfg = PipelineCfg(tracking=tracking)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me, start = (int(x) for x in owner_id().split("-"))
    host = socket.gethostname()
    owners = {
        "dead": f"{host}/{dead.pid}-{start}",
        "reused": f"{host}/{me}-{start - 1000}",  # our pid, another start time: not us
        "alive": f"{host}/{owner_id()}",
        "elsewhere": f"other-host/{dead.pid}-{start}",
    }
    mc = client(tracking)
    runs = {}
    for name, owner in owners.items():
        runs[name] = start_run(cfg, name)
        mc.set_tag(runs[name], OWNER_TAG, owner)
    runs["untagged"] = start_run(cfg, "untagged")
    mc.delete_tag(runs["untagged"], OWNER_TAG)
    runs["new"] = start_run(cfg, "the next run")  # ends the stale ones on its way
    assert mc.get_run(runs["new"]).data.tags[OWNER_TAG] == f"{host}/{owner_id()}"
    status = {name: mc.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {
        "dead": "FAILED",
        "reused": "FAILED",
        "alive": "RUNNING",
        "elsewhere": "RUNNING",
        "untagged": "RUNNING",
        "new": "RUNNING",
    }
    assert mc.get_run(runs["dead"]).data.tags[ENDED_BY_TAG] == STALE_CLEANUP
    assert ENDED_BY_TAG not in mc.get_run(runs["alive"]).data.tags
    assert end_stale_runs(tracking) == []


def test_a_killed_sweeps_run_finished_by_its_rerun_loses_the_cleanup_tag(store):
    """The re-run of a killed sweep reuses its (cached) parent run, ended FAILED meanwhile."""
    from tasks.track import log_sweep as log_sweep_task
    from tracking.runs import ENDED_BY_TAG, STALE_CLEANUP

    run_id, _ = _start(store)
    mc = client(store["tracking"])
    mc.set_tag(run_id, ENDED_BY_TAG, STALE_CLEANUP)
    end_run(run_id, store["tracking"], "FAILED")
    rows = [{"method": "wanda", "setting": "0.5", "sparsity": 0.5, "ppl": 14.0, "run_id": "a"}]
    log_sweep_task.fn(run_id, rows, {"ppl": 10.0, "seqlen": 128}, store["tracking"])
    run = mc.get_run(run_id)
    assert run.info.status == "FINISHED" and ENDED_BY_TAG not in run.data.tags
