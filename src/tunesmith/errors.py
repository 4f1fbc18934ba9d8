"""Errors a user can act on.

Every error tunesmith raises on purpose is a `TunesmithError`. The CLI prints its message (no traceback)
and exits with `exit_code` (2 for problems with the user's input). A message says what is wrong, where
(file:line or config key), and how to fix it. Errors that concern many places (every bad line of a data
file, every bad key of a config) carry the full list in `problems` and print one per line.
"""

from __future__ import annotations


class TunesmithError(Exception):
    """Base class. `problems` holds one line per problem when there are several."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.problems = list(problems or [])

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        return "\n".join([self.message, *self.problems])


class ConfigError(TunesmithError):
    """A recipe, flag or override is invalid."""


class DataError(TunesmithError):
    """A data file is unreadable or holds invalid examples."""


class ModelError(TunesmithError):
    """A model cannot be found, fetched or loaded."""


class RunError(TunesmithError):
    """A run directory is missing, incomplete, or does not fit the command."""


class TrainingError(TunesmithError):
    """Training cannot continue (non-finite loss, sequence longer than the model's context, ...)."""

    exit_code = 1


class Interrupted(TunesmithError):
    """The user pressed Ctrl-C; state was saved. Exit code 130 like a shell."""

    exit_code = 130


class Stopped(TunesmithError):
    """A caller's hook (tunesmith sweep: pruning, a time budget) stopped a run at a step boundary, after its
    checkpoint was saved. `step` is the last step done."""

    exit_code = 1

    def __init__(self, reason: str, step: int):
        super().__init__(f"stopped at step {step}: {reason}")
        self.reason = reason
        self.step = step
