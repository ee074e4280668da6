"""User-facing errors.

A :class:`KdtuneError` is a mistake in the user's input (spec, CLI arguments,
data folder, checkpoint). The CLI prints its message on one line and exits with
status 2, without a traceback; library callers catch it like any exception.
"""

from __future__ import annotations


class KdtuneError(Exception):
    """An error in the user's input, with a message that says what to change."""

    exit_code = 2


class ConfigError(KdtuneError):
    """A value in a spec or run configuration that is not allowed."""

    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        self.field, self.message = field, message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}")


class ResultsError(KdtuneError):
    """A results folder that is missing, empty, or not a kdtune study."""
