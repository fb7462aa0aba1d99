"""Environment defaults of Topiary, in one place: read by the CLI, the flows, the Makefile and the tests.

Values already in the environment always win. Two groups:

- :data:`RUN`: what every run sets before Prefect, MLflow or tokenizers are imported
  (``import flows`` applies them):

  - ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120``: a temporary Prefect server
    takes 12-25 s to start here; the default timeout is too short on a busy machine.
  - ``PREFECT_SERVER_ANALYTICS_ENABLED=false``, ``DO_NOT_TRACK=1``,
    ``MLFLOW_DISABLE_TELEMETRY=true``: no telemetry (offline, the server logs errors).
  - ``PREFECT_LOGGING_EXTRA_LOGGERS=modules``: the engine's progress lines (per decoder
    block) go through Prefect's console and run logs.
  - ``TOKENIZERS_PARALLELISM=false``: no fork warnings from the tokenizers' thread pool.
  - ``MLFLOW_CONFIGURE_LOGGING=false``: MLflow's records propagate to the root logger like
    every other library's (no console handler of its own), so a run's log file gets them
    and the console shows them only with ``--verbose`` (``flows/console.py``).
  - ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=3``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=30``: a tracking
    server that goes away during a run fails its step after 3 retries (13 s when the
    connection is refused, measured), not after MLflow's default 7 (over 4 minutes).

- :data:`OFFLINE`: no Hub access (``make``, CI and the tests; a user's own runs may go
  online by unsetting them).

``python3 -m modules.env`` prints ``KEY=VALUE`` lines of both groups for the keys not
already set (the Makefile exports them; ``--shell`` prints ``export`` lines for CI).
This file imports only the standard library, so a bare ``python3`` can run it.
"""

from __future__ import annotations

import os
import sys

RUN = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "modules",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_CONFIGURE_LOGGING": "false",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def apply(offline: bool = False) -> dict[str, str]:
    """Set the defaults that are not set yet; returns those it set."""
    wanted = {**RUN, **(OFFLINE if offline else {})}
    missing = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(missing)
    return missing


if __name__ == "__main__":
    unset = {k: v for k, v in {**RUN, **OFFLINE}.items() if k not in os.environ}
    prefix = "export " if "--shell" in sys.argv[1:] else ""
    print("\n".join(f"{prefix}{k}={v}" for k, v in unset.items()))
