"""What a sweep computed, as a manifest to compare across commits: bytes, masks and figures.

A refactoring must not change results. This runs ``topiary sweep`` on a config (default
``configs/sweep.yaml``) in a temporary work folder and tracking store, then writes a
manifest: for every pruned model (by method and setting) the sha256 of each file it wrote
(weights, config, tokenizer, masks; the report, which holds timings, only by its figures),
and for every MLflow run its perplexity and zero-shot metrics. ``--compare A B`` prints
what differs between two manifests and exits 1 if anything does.

    python -m benchmarks.sweep_identity --out before.json          # on the old commit
    python -m benchmarks.sweep_identity --out after.json           # on the new one
    python -m benchmarks.sweep_identity --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPORT = "pruning_report.json"
FIGURES = ("ppl", "zeroshot", "acc", "sparsity", "error")  # metric names that are results, not timings
TIMINGS = ("seconds", "time", "mem", "rss", "_s")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def models_manifest(work: Path) -> dict[str, dict]:
    """Every pruned model under ``work/models``: its files' hashes and its report's figures."""
    out = {}
    for folder in sorted((work / "models").glob("*")):
        report = json.loads((folder / REPORT).read_text())
        name = f"{report['method']}-{report['setting']}"
        files = {
            p.relative_to(folder).as_posix(): _sha256(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != REPORT
        }
        blocks = [(b["index"], b.get("reconstruction_error"), b["linears"]) for b in report["blocks"]]
        out[name] = {"files": files, "sparsity": report["sparsity"], "blocks": blocks}
    return out


def runs_manifest(uri: str) -> dict[str, dict]:
    """Every MLflow run's result metrics (no timings), keyed by its name and parameters."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    out = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=10000):
            params = run.data.params
            name = "/".join(
                str(params.get(k, "")) for k in ("prune.method", "prune.sparsity", "prune.pattern", "role")
            )
            name = f"{exp.name}:{run.info.run_name}:{name}"
            metrics = {
                k: v
                for k, v in run.data.metrics.items()
                if any(f in k for f in FIGURES) and not any(t in k for t in TIMINGS)
            }
            out[name] = metrics
    return out


def run_sweep(config: str, work: Path, uri: str) -> None:
    cmd = [sys.executable, "-m", "flows.cli", "sweep", "--config", config]
    cmd += ["--set", f"work_dir={work}", "--set", f"tracking.uri={uri}"]
    subprocess.run(cmd, check=True)


def compare(a: dict, b: dict, where: str = "") -> list[str]:
    """Every path at which ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'second' if k not in a else 'first'}")
            else:
                out += compare(a[k], b[k], f"{where}/{k}")
        return out
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sweep.yaml")
    parser.add_argument("--out", type=Path, help="write the manifest here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        diffs = compare(a, b)
        counts = {k: len(a[k]) for k in a}
        print("\n".join(diffs) if diffs else f"identical: {counts['models']} models, {counts['runs']} runs")
        return 1 if diffs else 0
    with tempfile.TemporaryDirectory(prefix="sweep-identity-") as tmp:
        work, uri = Path(tmp) / "work", f"sqlite:///{tmp}/mlflow.db"
        run_sweep(args.config, work, uri)
        manifest = {"models": models_manifest(work), "runs": runs_manifest(uri)}
    text = json.dumps(manifest, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    print(
        f"{len(manifest['models'])} models, {len(manifest['runs'])} runs"
        + (f" -> {args.out}" if args.out else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
