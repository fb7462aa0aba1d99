"""The sweep manifest notices a changed byte, a missing model and a changed figure."""

from __future__ import annotations

import json

from benchmarks.sweep_identity import compare, models_manifest


def _model(folder, weights: bytes, sparsity: float = 0.5) -> None:
    (folder / "masks").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "masks" / "0000.safetensors").write_bytes(b"mask")
    report = {"method": "wanda", "setting": "0.5", "sparsity": sparsity, "seconds": 1.0, "blocks": []}
    (folder / "pruning_report.json").write_text(json.dumps(report))


def test_a_changed_weight_byte_or_figure_is_a_difference_and_timings_are_not(tmp_path):
    for name, weights, sparsity in (
        ("a", b"w1", 0.5),
        ("b", b"w1", 0.5),
        ("c", b"w2", 0.5),
        ("d", b"w1", 0.4),
    ):
        _model(tmp_path / name / "models" / "wanda-0.5-x", weights, sparsity)
    a, b, c, d = (models_manifest(tmp_path / n) for n in "abcd")
    report = tmp_path / "b" / "models" / "wanda-0.5-x" / "pruning_report.json"
    report.write_text(report.read_text().replace('"seconds": 1.0', '"seconds": 2.0'))
    assert compare(a, models_manifest(tmp_path / "b")) == []
    old, new = (m["wanda-0.5"]["files"]["model.safetensors"] for m in (a, c))
    assert compare(a, c) == [f"/wanda-0.5/files/model.safetensors: {old!r} != {new!r}"]
    assert compare(a, d) == ["/wanda-0.5/sparsity: 0.5 != 0.4"]
    assert compare(a, {}) == ["/wanda-0.5: only in first"]
    assert "masks/0000.safetensors" in a["wanda-0.5"]["files"]
