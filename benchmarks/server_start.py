"""Start-up time of the temporary Prefect server: Topiary's (``flows.server``) against Prefect's own.

``python -m benchmarks.server_start [--repeats 3]`` starts and stops each server
``repeats`` times, alternating, on the same ``PREFECT_HOME`` (a warm database, as every
run after the first), and prints the seconds from the start call until ``/health``
answers. Topiary's server must not cost more than the one Prefect would start.
"""

from __future__ import annotations

import argparse
import statistics
import time

import flows  # noqa: F401  (environment defaults before prefect is imported)


def _topiary() -> float:
    from flows.server import start_server, stop_server

    start = time.perf_counter()
    proc, _ = start_server()
    seconds = time.perf_counter() - start
    stop_server(proc)
    return seconds


def _prefect() -> float:
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    start = time.perf_counter()
    server.start()
    seconds = time.perf_counter() - start
    server.stop()
    return seconds


def main() -> None:
    """Print each server's start-up times and their median."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    _topiary()  # a first start creates or migrates the database; not counted
    times: dict[str, list[float]] = {"topiary": [], "prefect": []}
    for _ in range(args.repeats):
        times["topiary"].append(_topiary())
        times["prefect"].append(_prefect())
    for name, values in times.items():
        figures = " ".join(f"{v:.1f}" for v in values)
        print(f"{name:<8} start-up s: {figures}  (median {statistics.median(values):.1f})")


if __name__ == "__main__":
    main()
