"""What the command line draws: rich progress bars for `tunesmith.progress.Progress` (training, evaluation)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as _RichBars
from rich.table import Column
from rich.text import Text

from tunesmith.progress import Progress


class RichProgress(Progress):
    """Progress bars drawn with rich: description, bar, done/total, the info text (or the rate), elapsed, ETA.

    The bars appear at the first `start` and stay on screen after `close`; `print` writes above them."""

    def __init__(self, console: Console | None = None):
        super().__init__(log=None)
        self._bars = _RichBars(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _InfoColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._started = False

    def start(self, description: str, total: int, completed: int = 0) -> int:
        task = self._bars.add_task(description, total=total, completed=completed)
        if not self._started:
            self._bars.start()
            self._started = True
        return task

    def update(self, task: int, *, completed: int | None = None, advance: int = 0, info: str | None = None) -> None:
        fields = {} if info is None else {"info": info}
        self._bars.update(task, completed=completed, advance=advance or None, **fields)

    def print(self, text: str) -> None:
        self._bars.console.print(text)

    def close(self) -> None:
        if self._started:
            self._bars.stop()
            self._started = False


class _InfoColumn(ProgressColumn):
    """The bar's info text ("loss 0.3120  250 tok/s"); without one, its rate ("1.25 /s") once rich knows it."""

    def __init__(self):
        super().__init__(table_column=Column(no_wrap=True))  # as rich's TextColumn: one line, never wrapped

    def render(self, task) -> Text:
        info = task.fields.get("info")
        if info:
            return Text(info)
        return Text(f"{task.speed:.2f} /s" if task.speed else "")
