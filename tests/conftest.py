"""Shared test set-up: offline, no telemetry, all state in temporary folders."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from modules.env import apply

_STATE = Path(tempfile.mkdtemp(prefix="topiary-tests-"))
atexit.register(shutil.rmtree, _STATE, ignore_errors=True)  # every session cleans its own state
apply(offline=True)  # the same defaults as the CLI and the Makefile (modules/env.py)
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ.setdefault("HF_HOME", str(_STATE / "hf"))
os.environ["TOPIARY_CACHE_DIR"] = str(_STATE / "cache")  # the corpus and token cache (modules/data/cache.py)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for every flow test of the session (~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
