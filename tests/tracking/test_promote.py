"""The promotion gate (pure) and registry promotion on a real temporary MLflow store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from configs.schema import GateCfg, PipelineCfg, TrackingCfg, ZeroShotCfg
from modules.errors import TopiaryError
from modules.provenance import KEYS, provenance
from tests.helpers import report_dict, tiny_llama
from tracking.registry import (
    Champion,
    RunFigures,
    format_registry,
    gate_decision,
    load_champion,
    promote,
    registry_table,
)
from tracking.runs import end_run, log_config, log_model, log_results, start_run

GATE = GateCfg(max_ppl_ratio=2.0, max_zeroshot_drop=10.0, primary_metric="ppl", beat_champion=True)


def _zs(mean: float | None) -> dict | None:
    return None if mean is None else {"tasks": {"boolq": {"acc": mean, "acc_norm": mean}}, "mean": mean}


# --- gate_decision: pure --------------------------------------------------------------


def test_gate_ppl_ratio_is_inclusive():
    passed, reasons = gate_decision(RunFigures(ppl=20.0, ppl_dense=10.0), None, GATE)
    assert passed and reasons[0].startswith("pass: ppl 20")
    passed, reasons = gate_decision(RunFigures(ppl=20.01, ppl_dense=10.0), None, GATE)
    assert not passed and reasons[0].startswith("fail: ppl 20.01 > 2 x dense 10")


def test_gate_zeroshot_drop_is_in_percentage_points():
    dense = {"ppl_dense": 10.0, "zeroshot_mean_dense": 0.50}
    # 0.50 -> 0.40 is exactly 10 points (0.1 in fractions): allowed despite float rounding.
    assert gate_decision(RunFigures(ppl=11.0, zeroshot_mean=0.40, **dense), None, GATE)[0]
    passed, reasons = gate_decision(RunFigures(ppl=11.0, zeroshot_mean=0.399, **dense), None, GATE)
    assert not passed
    assert [r for r in reasons if r.startswith("fail:")] == [
        "fail: zero-shot mean 0.3990 is 10.10 points below dense 0.5000 (more than 10)"
    ]
    # A drop of 0.05 points must not be read as 5 points (or 0.0005).
    strict = GATE.model_copy(update={"max_zeroshot_drop": 0.1})
    assert gate_decision(RunFigures(ppl=11.0, zeroshot_mean=0.4995, **dense), None, strict)[0]


def test_gate_skips_zeroshot_when_disabled_and_says_so():
    passed, reasons = gate_decision(RunFigures(ppl=11.0, zeroshot_mean=None, ppl_dense=10.0), None, GATE)
    assert passed
    assert "skip: zero-shot disabled, drop check skipped" in reasons
    assert "skip: no champion yet" in reasons


def test_gate_champion_ppl_lower_is_better():
    champ = Champion(3, RunFigures(ppl=12.0, zeroshot_mean=None))
    assert gate_decision(RunFigures(ppl=11.9, ppl_dense=10.0), champ, GATE)[0]
    passed, reasons = gate_decision(RunFigures(ppl=12.0, ppl_dense=10.0), champ, GATE)
    assert not passed and reasons[-1] == "fail: ppl 12 not better than champion v3 (12)"
    off = GATE.model_copy(update={"beat_champion": False})
    assert gate_decision(RunFigures(ppl=13.0, ppl_dense=10.0), champ, off)[0]


def test_gate_champion_zeroshot_higher_is_better():
    gate = GATE.model_copy(update={"primary_metric": "zeroshot_mean"})
    dense = {"ppl_dense": 10.0, "zeroshot_mean_dense": 0.6}
    champ = Champion(1, RunFigures(ppl=11.0, zeroshot_mean=0.55))
    # Worse perplexity than the champion does not matter when the primary metric is zero-shot.
    assert gate_decision(RunFigures(ppl=15.0, zeroshot_mean=0.56, **dense), champ, gate)[0]
    assert not gate_decision(RunFigures(ppl=10.5, zeroshot_mean=0.54, **dense), champ, gate)[0]
    passed, reasons = gate_decision(RunFigures(ppl=10.5, zeroshot_mean=None, **dense), champ, gate)
    assert not passed and "zero-shot disabled" in reasons[-1] and reasons[-1].startswith("fail:")


def test_gate_lists_every_failure_and_handles_nan():
    champ = Champion(2, RunFigures(ppl=None))
    passed, reasons = gate_decision(
        RunFigures(ppl=math.nan, zeroshot_mean=0.1, ppl_dense=10.0, zeroshot_mean_dense=0.6), champ, GATE
    )
    assert not passed
    fails = [r for r in reasons if r.startswith("fail:")]
    assert len(fails) == 3 and "champion v2 has no ppl" in fails[-1]
    assert gate_decision(
        RunFigures(ppl=11.0, ppl_dense=10.0), Champion(2, RunFigures(ppl=9.0), is_candidate=True), GATE
    )[0]


INTERVAL = GATE.model_copy(update={"rule": "interval", "max_ppl_ratio": 1.5, "max_zeroshot_drop": 5.0})


def _ci(ppl_hi: float = 1.3, diff_lo: float = -4.0, diff_hi: float = -1.0) -> dict:
    """Interval figures as run_figures reads them: ppl ratio bounds, zero-shot diff bounds."""
    return {
        "ppl_ratio_lo95": 1.2,
        "ppl_ratio_hi95": ppl_hi,
        "ppl_windows": 242,
        "zeroshot_diff_lo95": diff_lo,
        "zeroshot_diff_hi95": diff_hi,
        "zeroshot_items": 3000,
    }


def test_interval_rule_limits_the_upper_bound_of_the_ppl_ratio():
    dense = {"ppl_dense": 10.0}
    # Point ratio 1.25 is well within 1.5 either way; the upper bound decides, inclusively.
    passed, reasons = gate_decision(RunFigures(ppl=12.5, **_ci(ppl_hi=1.5), **dense), None, INTERVAL)
    assert passed and reasons[0] == (
        "pass: ppl ratio 1.25, 95% CI [1.2, 1.5] over 242 windows: upper bound <= 1.5"
    )
    passed, reasons = gate_decision(RunFigures(ppl=12.5, **_ci(ppl_hi=1.51), **dense), None, INTERVAL)
    assert not passed and reasons[0].startswith("fail: ppl ratio 1.25, 95% CI [1.2, 1.51]")
    # The point rule on the same figures passes: 12.5 <= 1.5 x 10.
    assert gate_decision(
        RunFigures(ppl=12.5, **_ci(ppl_hi=1.51), **dense),
        None,
        GATE.model_copy(update={"max_ppl_ratio": 1.5}),
    )[0]


def test_interval_rule_limits_the_upper_bound_of_the_zeroshot_drop():
    dense = {"ppl_dense": 10.0, "zeroshot_mean_dense": 0.60}
    # Pruned - dense in [-4, -1] points: the drop is in [1, 4], its upper bound 4 <= 5.
    passed, reasons = gate_decision(
        RunFigures(ppl=11.0, zeroshot_mean=0.575, **_ci(), **dense), None, INTERVAL
    )
    assert passed
    assert (
        "pass: zero-shot mean drop 2.50 points, 95% CI [1.00, 4.00] over 3000 items: upper bound within 5"
        in reasons
    )
    # Same point drop (2.5, well within 5), but the interval reaches 6 points: refused.
    wide = _ci(diff_lo=-6.0, diff_hi=0.5)
    passed, reasons = gate_decision(
        RunFigures(ppl=11.0, zeroshot_mean=0.575, **wide, **dense), None, INTERVAL
    )
    assert not passed
    assert [r for r in reasons if r.startswith("fail:")] == [
        "fail: zero-shot mean drop 2.50 points, 95% CI [-0.50, 6.00] over 3000 items: upper bound more than 5"
    ]


def test_interval_rule_without_intervals_fails_and_says_why():
    dense = {"ppl_dense": 10.0, "zeroshot_mean_dense": 0.6}
    passed, reasons = gate_decision(RunFigures(ppl=11.0, zeroshot_mean=0.59, **dense), None, INTERVAL)
    assert not passed
    fails = [r for r in reasons if r.startswith("fail:")]
    assert fails == [
        "fail: rule interval: no 95% interval of the ppl ratio was logged (ppl_ratio_w<L>_hi95)",
        "fail: rule interval: no 95% interval of the zero-shot difference was logged",
    ]


def test_shipped_pipeline_gate_uses_the_interval_rule():
    from configs.schema import CONFIG_DIR, load_config

    gate = load_config(CONFIG_DIR / "pipeline.yaml", PipelineCfg).gate
    assert gate.rule == "interval" and gate.max_zeroshot_drop == 5.0 and gate.max_ppl_ratio == 1.5
    assert PipelineCfg().gate.rule == "point"  # a run's config logged without the key


# --- registry promotion on a real MLflow store ---------------------------------------


def _tokenizer():
    """A tiny byte-level BPE, trained here on a few strings (no files, no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the cat sat on the mat", "pruned models are smaller"] * 4, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


def _pruned_model(out: Path, seed: int) -> dict[str, torch.Tensor]:
    """Save a tiny random LLaMA with half of each linear zeroed; return its state dict."""

    tok = _tokenizer()
    model = tiny_llama(len(tok), hidden=16, heads=2, max_positions=32, tie=True, seed=seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
                w = module.weight
                w.mul_(w.abs() > w.abs().median())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store + artifact root for the module; each test uses its own model name."""
    root = tmp_path_factory.mktemp("mlflow")
    model_dir = root / "pruned"
    weights = _pruned_model(model_dir, seed=0)
    return {"root": root, "uri": f"sqlite:///{root}/mlflow.db", "model_dir": model_dir, "weights": weights}


def _cfg(store: dict, name: str, zeroshot: bool = False, gate: GateCfg = GATE) -> PipelineCfg:
    tracking = TrackingCfg(uri=store["uri"], experiment="tests", registered_model=name)
    return PipelineCfg(tracking=tracking, zeroshot=ZeroShotCfg(enabled=zeroshot), gate=gate)


def _run(
    store: dict,
    cfg: PipelineCfg,
    ppl: float | None,
    dense_ppl: float = 10.0,
    zs: float | None = None,
    dense_zs: float | None = None,
    status: str = "FINISHED",
    model: bool = True,
    paired: dict | None = None,
) -> str:
    """A pipeline run as the flow leaves it: config, results, model; ``ppl=None`` = no eval."""
    run_id = start_run(cfg, "test", artifact_location=str(store["root"] / "artifacts"))
    log_config(run_id, cfg)
    record = provenance("cpu", "float32")
    results = {"pruning": report_dict([0.5], provenance=record)}
    if ppl is not None:
        results["dense"] = {"ppl": dense_ppl, "seqlen": 128, "zeroshot": _zs(dense_zs)}
        results["pruned"] = {"ppl": ppl, "seqlen": 128, "zeroshot": _zs(zs)}
        results["paired"] = paired
    log_results(run_id, results, cfg.tracking)
    if model:
        log_model(run_id, store["model_dir"], cfg.tracking)
    end_run(run_id, cfg.tracking, status)
    return run_id


def _version_tags(cfg: PipelineCfg, version: int) -> dict:
    from tracking.runs import client

    return client(cfg.tracking).get_model_version(cfg.tracking.registered_model, str(version)).tags


def test_passing_promotion_moves_alias_and_loads_back(store):
    import mlflow

    from tracking.runs import fluent_uri

    cfg = _cfg(store, "t-pass", zeroshot=True)
    run_id = _run(store, cfg, ppl=12.0, zs=0.55, dense_zs=0.6)
    decision = promote(run_id, cfg.gate, cfg.tracking)
    assert decision["passed"] and decision["promoted"]
    assert decision["champion"] == decision["version"] == 1 and decision["previous_champion"] is None
    tags = _version_tags(cfg, 1)
    assert tags["gate"] == "passed" and tags["ppl"] == "12" and tags["zeroshot_mean"] == "0.55"
    assert "pass: zero-shot mean 0.5500 is 5.00 points below dense" in tags["gate_reason"]

    loaded = load_champion(cfg.tracking)["model"]
    got = loaded.state_dict()
    assert set(got) == set(store["weights"])
    for key, want in store["weights"].items():
        assert torch.equal(got[key], want), key
    with fluent_uri(cfg.tracking):  # the plain registry URI a user would type
        pipe = mlflow.transformers.load_model("models:/t-pass@champion", return_type="components")
    assert torch.equal(
        pipe["model"].model.layers[1].mlp.up_proj.weight,
        store["weights"]["model.layers.1.mlp.up_proj.weight"],
    )

    again = promote(run_id, cfg.gate, cfg.tracking)  # re-applied by hand: same version, still champion
    assert again["version"] == 1 and again["passed"] and not again["promoted"] and again["champion"] == 1


def test_failing_promotion_keeps_alias_and_records_why(store):
    from tracking.runs import client

    cfg = _cfg(store, "t-fail")
    first = promote(_run(store, cfg, ppl=15.0), cfg.gate, cfg.tracking)
    assert first["promoted"]
    bad = _run(store, cfg, ppl=25.0)  # 2.5 x dense, and worse than the champion
    decision = promote(bad, cfg.gate, cfg.tracking)
    assert not decision["passed"] and not decision["promoted"]
    assert decision["version"] == 2 and decision["champion"] == 1
    tags = _version_tags(cfg, 2)
    assert tags["gate"] == "failed"
    assert (
        tags["gate_reason"]
        == "fail: ppl 25 > 2 x dense 10 = 20; fail: ppl 25 not better than champion v1 (15)"
    )
    mc = client(cfg.tracking)
    assert int(mc.get_model_version_by_alias("t-fail", "champion").version) == 1
    run_tags = mc.get_run(bad).data.tags
    assert run_tags["topiary.gate"] == "failed" and run_tags["topiary.model_version"] == "2"
    assert run_tags["topiary.promoted"] == "false" and "ppl 25 > 2" in run_tags["topiary.gate_reason"]


def test_a_registry_without_champion_takes_the_next_passing_version(store):
    """The first version failed its gate (or a promotion was killed before the alias moved)."""
    cfg = _cfg(store, "t-nochamp")
    first = promote(_run(store, cfg, ppl=25.0), cfg.gate, cfg.tracking)
    assert not first["passed"] and first["champion"] is None
    second = promote(_run(store, cfg, ppl=12.0), cfg.gate, cfg.tracking)
    assert second["promoted"] and second["champion"] == 2 and second["previous_champion"] is None


def test_better_run_takes_champion_and_worse_does_not(store):
    cfg = _cfg(store, "t-race")
    assert promote(_run(store, cfg, ppl=12.0), cfg.gate, cfg.tracking)["champion"] == 1
    better = promote(_run(store, cfg, ppl=11.0), cfg.gate, cfg.tracking)
    assert better["promoted"] and better["champion"] == 2 and better["previous_champion"] == 1
    worse = promote(_run(store, cfg, ppl=11.5), cfg.gate, cfg.tracking)
    assert not worse["promoted"] and worse["champion"] == 2
    assert worse["reasons"][-1] == "fail: ppl 11.5 not better than champion v2 (11)"

    rows = registry_table("t-race", cfg.tracking)
    assert [(r["version"], r["champion"], r["gate"]) for r in rows] == [
        (1, False, "passed"),
        (2, True, "passed"),
        (3, False, "failed"),
    ]
    assert [r["ppl"] for r in rows] == [12.0, 11.0, 11.5]
    assert all(r["sparsity"] == 0.5 and r["method"] == "magnitude" and r["window"] == 128 for r in rows)
    table = format_registry(rows).splitlines()
    assert table[0] == "registered model t-race (* = champion)"
    champion_line = next(line for line in table if line.startswith("*"))
    assert " 2 " in champion_line and "11.000 @128" in champion_line
    # what produced each version's figures, from the run's provenance params
    assert all(tuple(r["provenance"]) == KEYS for r in rows)
    assert rows[0]["provenance"]["torch"] == torch.__version__
    produced = table[table.index("produced by:") + 1 :]
    assert [line.split(":")[0] for line in produced] == ["  v1", "  v2", "  v3"]
    assert all(f"torch {torch.__version__}" in line and "float32" in line for line in produced)
    assert registry_table("no-such-model", cfg.tracking) == []
    assert format_registry([]) == "no registered versions"


def test_topiary_registry_prints_the_provenance_of_each_version(store, tmp_path, capsys):
    import yaml

    from flows.cli import main
    from modules.provenance import summary

    cfg = _cfg(store, "t-cli")
    promote(_run(store, cfg, ppl=12.0), cfg.gate, cfg.tracking)
    promote(_run(store, cfg, ppl=11.0), cfg.gate, cfg.tracking)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["registry", "--config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "registered model t-cli (* = champion)"
    line = summary(provenance("cpu", "float32"))
    assert out[out.index("produced by:") + 1 :] == [f"  v1: {line}", f"  v2: {line}"]


def test_gate_and_model_name_read_back_from_the_run(store):
    strict = GATE.model_copy(update={"max_ppl_ratio": 1.1})
    cfg = _cfg(store, "t-own-config", gate=strict)
    run_id = _run(store, cfg, ppl=12.0)
    # No gate given: the run's own config.yaml (1.1 x dense) is read back and applied.
    decision = promote(run_id, None, cfg.tracking)
    assert not decision["passed"] and "fail: ppl 12 > 1.1 x dense 10 = 11" in decision["reasons"]


def test_unevaluated_or_failed_runs_are_never_registered(store):
    cfg = _cfg(store, "t-refused")
    no_eval = _run(store, cfg, ppl=None, model=False)
    with pytest.raises(TopiaryError, match=r"no pruned perplexity metric \(ppl_pruned_w<L>\)"):
        promote(no_eval, cfg.gate, cfg.tracking)
    running = start_run(cfg, "crashed-before-eval", artifact_location=str(store["root"] / "artifacts"))
    with pytest.raises(TopiaryError, match="stopped before evaluation"):
        promote(running, cfg.gate, cfg.tracking)
    unlogged = _run(store, cfg, ppl=11.0, model=False)
    with pytest.raises(TopiaryError, match=r"no logged model \(tag topiary.model_id\); call log_model first"):
        promote(unlogged, cfg.gate, cfg.tracking)
    failed = _run(store, cfg, ppl=11.0, status="FAILED", model=False)
    with pytest.raises(TopiaryError, match="status FAILED; a failed run is never registered"):
        promote(failed, cfg.gate, cfg.tracking)
    with pytest.raises(TopiaryError, match="'no-such-run' not found"):
        promote("no-such-run", cfg.gate, cfg.tracking)
    assert registry_table("t-refused", cfg.tracking) == []


def test_zeroshot_enabled_without_its_metrics_is_refused(store):
    cfg = _cfg(store, "t-zs-missing", zeroshot=True)
    run_id = _run(store, cfg, ppl=11.0, model=False)
    with pytest.raises(TopiaryError, match="zero-shot is enabled but no zeroshot_pruned_mean"):
        promote(run_id, cfg.gate, cfg.tracking)


def _paired_run_outputs(items: int, lost: int, windows: int = 50) -> tuple[dict, dict, dict, dict]:
    """Evaluation results of a dense and a pruned model on the same windows and items.

    The pruned model loses ``lost`` of ``items`` boolq items the dense one gets right and
    adds 0.2 nats per token on every window (ppl ratio exp(0.2) = 1.22).
    """
    nll = [1000.0 + 37.0 * (i % 7) for i in range(windows)]

    def ppl(shift: float) -> dict:
        per = [v + shift * 127 for v in nll]
        return {"ppl": math.exp(sum(per) / (127 * windows)), "seqlen": 128, "window_nll": per}

    def zs(wrong: int) -> dict:
        acc = [0] * wrong + [1] * (items - wrong)
        items_ = {"metric": "acc", "acc": {"boolq": acc}, "docs": {"boolq": "same"}}
        return {"tasks": {"boolq": {"acc": sum(acc) / items}}, "mean_acc": sum(acc) / items, "items": items_}

    return ppl(0.0), ppl(0.2), zs(0), zs(lost)


@pytest.mark.parametrize("items, lost, passes", [(2000, 60, True), (100, 3, False)])
def test_interval_gate_on_a_real_store_decides_by_the_interval(store, items, lost, passes):
    # Both candidates drop 3 points (the point rule, 5 points, would pass both); with 100
    # items the drop's upper 95% bound is above 5 points, with 2000 it is below.
    from tasks.evaluate import compare

    ppl_d, ppl_p, zs_d, zs_p = _paired_run_outputs(items, lost)
    paired = compare(ppl_d, ppl_p, zs_d, zs_p)
    cfg = _cfg(store, f"t-interval-{items}", zeroshot=True, gate=INTERVAL)
    run_id = _run(
        store, cfg, ppl=ppl_p["ppl"], dense_ppl=ppl_d["ppl"], zs=zs_p["mean_acc"], dense_zs=1.0, paired=paired
    )
    decision = promote(run_id, None, cfg.tracking)  # the gate read back from the run's config
    assert decision["passed"] is passes and decision["promoted"] is passes
    drop_hi = -paired["zeroshot"]["mean"]["lo"]
    assert (drop_hi <= 5.0) is passes and paired["zeroshot"]["mean"]["diff"] == pytest.approx(-3.0)
    tags = _version_tags(cfg, 1)
    assert tags["gate"] == ("passed" if passes else "failed")
    lo, hi = -paired["zeroshot"]["mean"]["hi"], drop_hi
    assert tags["zeroshot_drop_ci95"] == f"[{lo:.2f}, {hi:.2f}]" and tags["zeroshot_items"] == str(items)
    assert float(tags["zeroshot_diff_lo95"]) == pytest.approx(-drop_hi, rel=1e-5)
    ratio = math.exp(0.2)
    assert tags["ppl_ratio_ci95"] == f"[{ratio:.4f}, {ratio:.4f}]" and tags["ppl_windows"] == "50"
    assert f"over {items} items: upper bound" in tags["gate_reason"]
    assert ("fail: zero-shot mean drop 3.00 points" in tags["gate_reason"]) is not passes
