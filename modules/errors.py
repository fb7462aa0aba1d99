"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class TopiaryError(ValueError):
    """Bad input from a user (a value, a path, a model); the message says what and how to fix it.

    ``key`` names the input it blames (``seqlen``, ``model``, ``data source``), as data: the
    message reads ``<key>: <why>``, and a caller that knows the user's name for that input (a
    config's dotted key, a CLI flag) puts that name in its place (:mod:`flows.preflight`).
    """

    def __init__(self, why: str, key: str | None = None) -> None:
        super().__init__(f"{key}: {why}" if key else why)
        self.key = key
        self.why = why
