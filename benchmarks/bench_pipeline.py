"""Wall time of the default pipeline, cold (empty caches) and warm (second process).

``python -m benchmarks.bench_pipeline`` runs ``configs/pipeline.yaml`` twice, each time in
a fresh process, with its work dir, Prefect home and MLflow store in a new temporary
folder, and prints a table of seconds per stage plus the whole process (which includes
Python start-up and Prefect's temporary server). Printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(config: str, work: str, out: str) -> None:
    from configs.schema import PipelineCfg, load_config
    from flows.pipeline import run_pipeline

    overrides = {"work_dir": work, "tracking.uri": f"sqlite:///{work}/mlflow.db"}
    result = run_pipeline(load_config(config, PipelineCfg, overrides), echo=False)
    Path(out).write_text(json.dumps(result["stages"], default=str))


def _run(config: str, work: Path, label: str) -> dict:
    out = work / f"{label}.json"
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect-home"))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_pipeline", "--child", config, str(work), str(out)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stages = json.loads(out.read_text())
    stages["process (total)"] = {"wall_seconds": time.perf_counter() - start, "cached": False}
    return stages


def main() -> None:
    """Run cold then warm and print the per-stage table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/pipeline.yaml")
    ap.add_argument("--child", nargs=3, metavar=("CONFIG", "WORK", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="topiary-bench-") as tmp:
        work = Path(tmp)
        cold = _run(args.config, work, "cold")
        warm = _run(args.config, work, "warm")
    print(f"`make pipeline` ({args.config}), seconds per stage, cold then warm (new process)")
    print("| stage | cold | warm |")
    print("| --- | ---: | ---: |")
    for name in cold:
        cells = []
        for run in (cold, warm):
            s = run.get(name, {})
            wall = s.get("wall_seconds", s.get("seconds", 0.0))
            cells.append(f"{wall:.1f}" + (" (cached)" if s.get("cached") else ""))
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
