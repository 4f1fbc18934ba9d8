"""What the command line draws: rich progress bars for `tunesmith.progress.Progress` (training, evaluation), the
data check's tables and the evaluation's summary table. Library code never draws; it reports to a Progress or
returns data, and the CLI shows it here."""

from __future__ import annotations

from typing import Any

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


def data_report(report, console=None, max_warnings: int = 50) -> None:
    """Print a data check's DataReport (tunesmith.data.validate) as rich tables, then the warnings (one line each,
    capped at max_warnings)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    files = [f for f in (report.train, report.validation) if f is not None]
    summary = Table(title="Dataset", title_justify="left")
    summary.add_column("")
    for name in ("train", "validation")[: len(files)]:
        summary.add_column(name, justify="right")

    def row(name: str, values: list[Any]) -> None:
        summary.add_row(name, *["-" if v is None else str(v) for v in values])

    row("file", [f.path for f in files])
    row("format", [f.format for f in files])
    row("examples", [f.examples for f in files])
    if any(f.messages for f in files):
        row(
            "messages/example (min/mean/max)",
            [f"{f.messages['min']}/{f.messages['mean']}/{f.messages['max']}" if f.messages else None for f in files],
        )
        row("messages by role", [", ".join(f"{r} {n}" for r, n in f.roles.items()) if f.roles else None for f in files])
    if any(f.pair_lengths for f in files):
        pairs = [f.pair_lengths for f in files]
        row(
            "answer length, chosen/rejected (mean)",
            [f"{p['chosen_mean']}/{p['rejected_mean']} {p['unit']}" if p else None for p in pairs],
        )
        row("chosen answer longer", [f"{p['chosen_longer']:.0%} of pairs" if p else None for p in pairs])
    if report.max_length is not None:
        row(f"longer than {report.max_length} tokens", [f.over_max_length for f in files])
    row("exact duplicates", [f.exact_duplicates for f in files])
    row("near-duplicates", [f.near_duplicates for f in files])
    row("conflicting answers", [f.conflicts for f in files])
    if report.validation is not None:
        row("overlap with train (exact/near)", [None, f"{report.overlap_exact}/{report.overlap_near}"])
    console.print(summary)

    for f in files:
        if f.tokens:
            tokens = Table(title=f"Tokens per example ({f.path})", title_justify="left")
            for name in ("", "p50", "p90", "p99", "max", "mean"):
                tokens.add_column(name, justify="right" if name else "left")
            for role, s in f.tokens.items():
                tokens.add_row(role, *(str(s[k]) for k in ("p50", "p90", "p99", "max", "mean")))
            console.print(tokens)
    if report.train.tokens is None:
        console.print("token lengths: pass --model to count tokens with the model's tokenizer")

    if report.train.labels:
        labels = Table(title="Labels", title_justify="left")
        labels.add_column("label")
        for name in ("train", "validation")[: len(files)]:
            labels.add_column(name, justify="right")
        names = list(dict.fromkeys([*report.train.labels, *(files[-1].labels or {})]))
        for label in names:
            cells = [(f.labels or {}).get(label, 0) for f in files]
            labels.add_row(label, *(f"{n} ({n / max(f.examples, 1):.0%})" for n, f in zip(cells, files)))
        console.print(labels)

    for line in report.warnings[:max_warnings]:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if len(report.warnings) > max_warnings:
        console.print(f"... and {len(report.warnings) - max_warnings} more warnings (--json lists them all)")
    n = len(report.warnings)
    console.print(f"OK: no problems, {n} warning{'s' if n != 1 else ''}", markup=False, highlight=False)


TABLE_METRICS = {  # the summary table's columns (all metrics are in task.json)
    "classification": ["accuracy", "macro_f1", "accuracy_generated", "invalid_rate"],
    "extraction": ["field_f1", "parse_rate", "schema_match_rate", "exact_match"],
    "text": ["chrf", "format_rate", "rouge_l", "token_f1", "exact_match", "perplexity"],
    "lm": ["perplexity", "loss"],
    "preference": [
        "preference_accuracy",
        "logp_margin",
        "reward_margin",
        "refusal_rate_harmful",
        "over_refusal_rate_harmless",
        "refusal_accuracy",
    ],
}
NOT_RATES = ("loss", "perplexity", "logp_margin", "reward_margin")  # shown as numbers, not percentages
HEADERS = {
    "preference_accuracy": "pref acc",
    "logp_margin": "logp margin",
    "reward_margin": "reward margin",
    "refusal_rate_harmful": "refuses harmful",
    "over_refusal_rate_harmless": "refuses harmless",
    "refusal_accuracy": "refusal acc",
    "format_rate": "format",
    "accuracy": "acc",
    "macro_f1": "macro-F1",
    "accuracy_generated": "acc (gen)",
    "invalid_rate": "invalid",
    "field_f1": "field F1",
    "parse_rate": "parses",
    "schema_match_rate": "schema",
    "exact_match": "exact",
    "rouge_l": "ROUGE-L",
    "token_f1": "token F1",
    "perplexity": "ppl",
}


def _fmt(name: str, value) -> str:
    if value is None:
        return "-"
    if name in NOT_RATES:
        return f"{value:.3f}"
    return f"{value:.1%}"


def summary_table(result: dict):
    """A rich Table: each system's headline metrics, deltas vs base zero-shot, prompt tokens and latency."""
    from rich.table import Table

    shown = [m for m in TABLE_METRICS[result["task"]] if any(m in s["metrics"] for s in result["systems"])]
    base = next((s for s in result["systems"] if s["key"] == "base_zero_shot"), None)
    table = Table(
        title=f"{result['task']} eval, {result['data']['examples']} examples",
        caption=f"primary: {result['primary']}; (+x): change vs base zero-shot, in points for rates"
        + _selection_caption(result),
    )
    table.add_column("system", no_wrap=True)
    for m in shown:
        table.add_column(HEADERS.get(m, m), justify="right")
    table.add_column("prompt tok", justify="right")
    table.add_column("s/ex", justify="right")
    for s in result["systems"]:
        cells = []
        for m in shown:
            value = s["metrics"].get(m)
            cell = _fmt(m, value)
            if base is not None and s is not base and value is not None and base["metrics"].get(m) is not None:
                delta = value - base["metrics"][m]
                cell += f" ({delta:+.2f})" if m in NOT_RATES else f" ({delta * 100:+.1f})"
            cells.append(cell)
        table.add_row(s["name"], *cells, f"{s['prompt_tokens_per_example']:.0f}", f"{s['seconds_per_example']:.2f}")
    return table


def _selection_caption(result: dict) -> str:
    sel = result.get("prompt_selection")
    if not sel:
        return ""
    chosen = next((v["name"] for v in sel["variants"] if v["key"] == sel["chosen"]), sel["chosen"])
    return (
        f"\nbest prompt: {chosen}, chosen on {sel['examples']} validation examples among "
        f"{len(sel['variants'])} variants (eval/task.json: prompt_selection)"
    )
