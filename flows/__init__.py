"""Prefect flows of Topiary (``flows.pipeline``, ``flows.sweep``) and the ``topiary`` CLI.

Importing this package sets environment defaults that Prefect reads when *it* is first
imported, so they must come before any ``import prefect`` (the CLI imports ``flows``
first). Values already in the environment win.

- ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120``: without ``PREFECT_API_URL``
  every run starts a temporary local server (12-25 s here; ``flows.server``, which dies
  with the run); the default timeout is too short for a cold start on a busy machine.
- ``PREFECT_SERVER_ANALYTICS_ENABLED=false``, ``DO_NOT_TRACK=1``,
  ``MLFLOW_DISABLE_TELEMETRY=true``: no telemetry (offline, the server logs errors).
- ``PREFECT_HOME=./.topiary/prefect-home`` (only when neither ``PREFECT_HOME`` nor
  ``PREFECT_API_URL`` is set): the temporary server's SQLite database stays under the
  default work dir instead of ``~/.prefect``. The task *cache* does not live there but in
  ``<work_dir>/prefect-results``, so deleting either one alone is safe.
- ``PREFECT_LOGGING_EXTRA_LOGGERS=modules``: the engine's progress lines (per decoder
  block) go through Prefect's console and run logs.
- ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=3``, ``MLFLOW_HTTP_REQUEST_TIMEOUT=30``: a tracking
  server that goes away during a run fails its step after 3 retries (13 s when the
  connection is refused, measured), not after MLflow's default 7 (over 4 minutes). An
  unreachable server at the start is found by the preflight's own probe
  (``flows.preflight.check_tracking``) in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "modules",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}

for _key, _value in DEFAULTS.items():
    os.environ.setdefault(_key, _value)
# Folders made here; the CLI removes them again (when still empty) after a command that
# failed before Prefect used them, so that bad input leaves nothing behind.
CREATED: list[Path] = []
if "PREFECT_HOME" not in os.environ and "PREFECT_API_URL" not in os.environ:
    os.environ["PREFECT_HOME"] = str(Path(".topiary", "prefect-home").resolve())
    _home = Path(os.environ["PREFECT_HOME"])
    CREATED = [p for p in (_home.parent, _home) if not p.exists()]
    _home.mkdir(parents=True, exist_ok=True)
