"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class TopiaryError(ValueError):
    """Bad input from a user (a value, a path, a model); the message says what and how to fix it."""
