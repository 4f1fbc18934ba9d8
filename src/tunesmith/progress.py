"""What long work reports its progress to.

Training and evaluation call a `Progress`; they never draw anything themselves. The command line passes a rich
display (cli/display.py: bars with rate and ETA); the Python API's default is this silent one, which counts nothing
and passes messages on to a `log` function (print by default, or nothing when None).
"""

from __future__ import annotations

from typing import Callable


class Progress:
    """Silent progress: bars are not drawn; `print` hands messages to `log` (None: drop them)."""

    def __init__(self, log: Callable[[str], None] | None = print):
        self.log = log

    def start(self, description: str, total: int, completed: int = 0) -> int:
        """Begin a bar of `total` units; returns its handle for `update`."""
        return -1

    def update(self, task: int, *, completed: int | None = None, advance: int = 0, info: str | None = None) -> None:
        """Move a bar to `completed`, or on by `advance`; `info` replaces its text (e.g. "loss 0.31  250 tok/s")."""

    def print(self, text: str) -> None:
        """A message that belongs between the bars (a validation result, a warning)."""
        if self.log is not None:
            self.log(text)

    def close(self) -> None:
        """Stop drawing; the last state of every bar stays on screen."""

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
