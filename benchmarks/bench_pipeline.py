"""Wall time of the small runs, each in a fresh process: where Topiary's overhead shows.

``make bench-pipeline`` (``python -m benchmarks.bench_pipeline``) runs, in order, in a
temporary folder (its own corpus cache, Prefect home, work folders and MLflow store, so
nothing of the user's is read or changed):

0. ``import torch, transformers, lightning`` alone: the floor under the prune's time;
1. ``topiary prune embedded --method wanda --sparsity 0.5`` with an empty corpus cache (cold);
2. the same into a fresh output and work folder, the corpus cache now filled (warm);
3. ``topiary pipeline`` (configs/pipeline.yaml) on a fresh work folder and MLflow store, the
   first Prefect run in the temporary Prefect home: its server creates the database (once
   per Prefect home; 7 s here);
4. the same on another fresh work folder and MLflow store, the Prefect database kept (cold;
   corpus cache warm): what a new config or model costs;
5. 4 again: every step cached (warm), Prefect's temporary server;
6. ``topiary server start``, then the warm pipeline against it, then ``topiary server stop``.

It prints a table, the ratios and the load average (the machine may be shared); nothing
is asserted. Targets of the issue (idle 2-core machine): prune under 6 s, warm pipeline
under 8 s with the server and under 25 s without, cold pipeline under 45 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(base: Path) -> dict[str, str]:
    from modules.env import RUN

    env = {**RUN, **os.environ}
    env.update(
        PYTHONPATH=str(ROOT),
        TOPIARY_CACHE_DIR=str(base / "cache"),
        PREFECT_HOME=str(base / "prefect-home"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.pop("PREFECT_API_URL", None)
    return env


def _run(env: dict[str, str], *args: str, python: tuple[str, ...] = ("-m", "flows.cli")) -> float:
    """Seconds of ``topiary ARGS`` (or ``python PYTHON ARGS``) in a fresh process; a failure ends
    the benchmark with its stderr."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *python, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench-pipeline: `{' '.join([*python, *args])}` failed:\n{done.stderr[-3000:]}")
    return seconds


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    """Run the eight measurements and print them."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_pipeline", description=__doc__.splitlines()[0]
    )
    p.add_argument("--config", default="configs/pipeline.yaml")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="topiary-bench-pipeline-"))
    env = _env(base)
    print(f"bench-pipeline in {base}; {os.cpu_count()} CPUs, load average {_load()} (1, 5, 15 min)")
    prune = ["prune", "embedded", "--method", "wanda", "--sparsity", "0.5"]

    def pipeline(n: int) -> list[str]:  # a work folder and an MLflow store of its own
        work, store = base / f"pipeline-work-{n}", base / f"mlflow-{n}.db"
        return [
            "pipeline",
            "--config",
            args.config,
            "--set",
            f"work_dir={work}",
            "--set",
            f"tracking.uri=sqlite:///{store}",
        ]

    rows: list[tuple[str, float]] = []
    imports = ("-c", "import torch, transformers, lightning")
    try:
        rows.append(("import torch, transformers, lightning", _run(env, python=imports)))
        for name, extra in (("cold", "1"), ("warm", "2")):
            out = ["--output", str(base / f"pruned-{extra}"), "--work-dir", str(base / f"prune-work-{extra}")]
            rows.append((f"prune embedded wanda 0.5, corpus cache {name}", _run(env, *prune, *out)))
        rows.append(("pipeline cold, Prefect's database new", _run(env, *pipeline(1))))
        rows.append(("pipeline cold (fresh work dir), temporary server", _run(env, *pipeline(2))))
        rows.append(("pipeline warm, temporary server", _run(env, *pipeline(2))))
        rows.append(("server start (once)", _run(env, "server", "start")))
        try:
            rows.append(("pipeline warm, long-lived server", _run(env, *pipeline(2))))
        finally:
            _run(env, "server", "stop")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    width = max(len(name) for name, _ in rows)
    print(f"\n{'run':<{width}}  wall s")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:6.1f}")
    # imports, prune cold, warm, pipeline new database, cold, warm, server start, warm with server
    t = [seconds for _, seconds in rows]
    print("\nratios:")
    print(f"  prune warm / imports alone:            {t[2] / t[0]:.2f}  (the issue's 6 s / 4.5 s: 1.33)")
    print(f"  pipeline cold / imports alone:         {t[4] / t[0]:.2f}  (45 s / 4.5 s: 10.0)")
    print(f"  pipeline warm, temporary / imports:    {t[5] / t[0]:.2f}  (25 s / 4.5 s: 5.56)")
    print(f"  pipeline warm, long-lived / imports:   {t[7] / t[0]:.2f}  (8 s / 4.5 s: 1.78)")
    print(f"  prune cold / warm cache:               {t[1] / t[2]:.2f}")
    print(f"  pipeline new Prefect database / cold:  {t[3] / t[4]:.2f}")
    print(f"  pipeline cold / warm (temporary):      {t[4] / t[5]:.2f}")
    print(f"  warm pipeline temporary / long-lived:  {t[5] / t[7]:.2f}")
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
