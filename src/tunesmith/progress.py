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


def duration(seconds: float | None) -> str:
    """A span of time for people: 1h05m, 4m03s, 9s; "-" when unknown."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
