"""Prefect flows of Topiary (``flows.pipeline``, ``flows.sweep``) and the ``topiary`` CLI.

Importing this package sets environment defaults that Prefect reads when *it* is first
imported, so they must come before any ``import prefect`` (the CLI imports ``flows``
first). Values already in the environment win.

Its defaults are :data:`modules.env.RUN` (documented there), plus:

- ``PREFECT_HOME=./.topiary/prefect-home`` (only when neither ``PREFECT_HOME`` nor
  ``PREFECT_API_URL`` is set): the temporary server's SQLite database stays under the
  default work dir instead of ``~/.prefect``. Without ``PREFECT_API_URL`` the home folder,
  a user's too, is made with its parents (Prefect's server fails on a missing parent
  with "unable to open database file"). The task *cache* does not live there but in
  ``<work_dir>/prefect-results``, so deleting either one alone is safe.

An unreachable tracking server at the start is found by the preflight's own probe
(``flows.preflight.check_tracking``) in seconds.

May import: prefect, ``tasks``, ``tracking``, ``modules`` and ``configs``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from modules.env import apply
from modules.errors import TopiaryError

apply()
# Folders made here; the CLI removes them again (when still empty) after a command that
# failed before Prefect used them, so that bad input leaves nothing behind.
CREATED: list[Path] = []
if "PREFECT_API_URL" not in os.environ:  # a temporary server keeps its database there
    os.environ.setdefault("PREFECT_HOME", str(Path(".topiary", "prefect-home").resolve()))
    _home = Path(os.environ["PREFECT_HOME"]).expanduser()  # Prefect makes only its last level
    CREATED = [p for p in (*reversed(_home.parents), _home) if not p.exists()]
    _home.mkdir(parents=True, exist_ok=True)


class _MessageOnly(logging.Filter):
    """A :class:`TopiaryError` (bad input, a failing environment) is logged by Prefect's failed
    task or flow run as its message alone: the CLI's one line says the rest, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TopiaryError):
            record.exc_info = record.exc_text = None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_MessageOnly())
