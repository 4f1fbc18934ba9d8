"""`tunesmith data ...`: check and summarise datasets."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tunesmith.data.formats import FORMATS


@click.group()
def data():
    """Check and summarise datasets."""


@data.command("check")
@click.argument("file")
@click.option("--validation", metavar="FILE", help="Validation file: checked too, and compared with FILE for overlap.")
@click.option("--model", metavar="M", help="Count tokens with this model's tokenizer (built-in name or local dir).")
@click.option("--max-length", type=click.IntRange(min=1), help="Count examples longer than N tokens (needs --model).")
@click.option("--format", "format_", type=click.Choice(["auto", *FORMATS]), default="auto", show_default=True,
              help="Data format; auto detects it from the keys of the rows.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(file, validation, model, max_length, format_, as_json):
    """Validate FILE and print statistics and warnings.

    Every problem is listed as FILE:LINE: what is wrong; how to fix it, and the command exits with status 2.
    Warnings (duplicates, conflicting answers, train/validation overlap, long examples) do not fail the check.

    \b
    Examples:
      tunesmith data check train.jsonl
      tunesmith data check train.jsonl --validation val.jsonl --model smollm2-135m-instruct --max-length 512
    """
    from tunesmith.data.validate import chat_template_renderer, render_report
    from tunesmith.data.validate import check as check_data

    tokenizer = _load_tokenizer(model) if model else None
    renderer = chat_template_renderer(tokenizer) if tokenizer is not None else None
    report = check_data(file, validation, tokenizer=tokenizer, max_length=max_length, renderer=renderer, format=format_)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        render_report(report)


def _load_tokenizer(name: str):
    """Only the tokenizer of a model: nothing heavier is loaded to count tokens.

    A local directory holding a tokenizer is used as is (a tokenizer needs no config.json or weights);
    anything else goes through `tunesmith.models.resolve` (built-in names, model directories, .gguf files).
    """
    path = Path(name).expanduser()
    if not (path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))):
        try:
            from tunesmith.models import resolve
        except ImportError:  # the model registry is not installed: only a local directory can be used
            from tunesmith.errors import ModelError

            raise ModelError(f"{name}: not a local tokenizer or model directory; pass the path of one") from None
        path = resolve(name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
