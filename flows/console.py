"""What a long command shows on the console, and the run's log file that keeps everything.

By default the console carries Topiary's own lines (records logged from Topiary's packages:
the stage and block lines, the results, the gate's verdict, Topiary's warnings) and any
third-party ERROR; Prefect's state lines, lm-eval's and transformers' INFO and WARNING
lines and Python warnings go only to the run's log file, whose path is the first line
printed. ``--verbose`` shows everything on the console as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import transformers.utils.logging as transformers_logging
from lm_eval.utils import setup_logging as lm_eval_logging

# A record is Topiary's when the call that logged it is in one of these folders.
OWN = tuple(
    str(Path(__file__).resolve().parents[1] / pkg) + os.sep
    for pkg in ("modules", "tasks", "flows", "tracking", "configs")
)
FORMAT = "%(asctime)s %(levelname)-7s %(name)s (%(pathname)s:%(lineno)d): %(message)s"


class OwnLinesOnly(logging.Filter):
    """Passes Topiary's records and any record at ERROR or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.pathname.startswith(OWN)


def _console_handlers() -> list[logging.Handler]:
    """Every handler that writes to the console (stderr or stdout), on any logger."""
    loggers = [
        logging.getLogger(),
        *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    handlers = {h for lg in loggers for h in lg.handlers}
    return [
        h
        for h in handlers
        if isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
        and getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    ]


@contextlib.contextmanager
def run_log(work_dir: str | Path, command: str, verbose: bool = False) -> Iterator[Path]:
    """Send every log record of the run to ``<work_dir>/logs/<command>-<time>-<pid>.log``.

    Call it after Prefect is imported (its console handler, on the root logger, must exist
    to be filtered). lm-eval's and transformers' library loggers have console handlers of
    their own and do not propagate; for the run they lose those handlers and propagate, so
    that their records reach the file, and the console through the root's filtered handler.
    """
    path = Path(work_dir) / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    level = root.level
    root.addHandler(to_file)
    root.setLevel(logging.INFO)
    lm_eval_logging(logging.INFO)  # its handler exists from here on, and is taken off below
    lm_eval = logging.getLogger("lm_eval")
    lm_eval_handlers = list(lm_eval.handlers)
    for handler in lm_eval_handlers:
        lm_eval.removeHandler(handler)
    lm_eval.propagate = True
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    logging.captureWarnings(True)
    console = [] if verbose else _console_handlers()
    only_own = OwnLinesOnly()
    for handler in console:
        handler.addFilter(only_own)
    print(f"topiary: log: {path}", file=sys.stderr, flush=True)
    try:
        yield path
    finally:
        for handler in console:
            handler.removeFilter(only_own)
        logging.captureWarnings(False)
        transformers_logging.disable_propagation()
        transformers_logging.enable_default_handler()
        lm_eval.propagate = False
        for handler in lm_eval_handlers:
            lm_eval.addHandler(handler)
        root.setLevel(level)
        root.removeHandler(to_file)
        to_file.close()
