"""`tunesmith data ...`: check and summarise datasets."""

from __future__ import annotations

import json

import click

from tunesmith import api

FORMATS = ("chat", "alpaca", "completion", "text", "preference")  # tunesmith.data.formats.FORMATS


@click.group()
def data():
    """Check and summarise datasets."""


@data.command("check")
@click.argument("file")
@click.option("--validation", metavar="FILE", help="Validation file: checked too, and compared with FILE for overlap.")
@click.option("--model", metavar="M", help="Count tokens with this model's tokenizer (built-in name or local dir).")
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    help="data.max_length: warn about examples longer than N tokens (needs --model; default: what train uses, "
    "the model's context, at most 2048).",
)
@click.option(
    "--truncation",
    type=click.Choice(["truncate", "drop", "error"]),
    default="truncate",
    show_default=True,
    help="data.truncation: what train does with longer examples; the warnings say so.",
)
@click.option("--strict", is_flag=True, help="data.strict: unknown keys in rows are errors, not warnings.")
@click.option(
    "--format",
    "format_",
    type=click.Choice(["auto", *FORMATS]),
    default="auto",
    show_default=True,
    help="Data format; auto detects it from the keys of the rows.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(file, validation, model, max_length, truncation, strict, format_, as_json):
    """Validate FILE and print statistics and warnings.

    Every problem is listed as FILE:LINE: what is wrong; how to fix it, and the command exits with status 2.
    Warnings (unknown keys, duplicates, conflicting answers, train/validation overlap, examples longer than
    max_length and what train will do with them) do not fail the check. Preference pairs: the chosen and rejected
    answers' mean lengths (tokens with --model, else characters), a warning when chosen answers are systematically
    longer (DPO then learns that longer is better), and with --model a problem for each pair whose prompt alone
    fills max_length.

    \b
    Examples:
      tunesmith data check train.jsonl
      tunesmith data check train.jsonl --validation val.jsonl --model smollm2-135m-instruct --max-length 512
    """
    report = api.check_data(
        file, validation, model=model, max_length=max_length, format=format_, truncation=truncation, strict=strict
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        from tunesmith.cli.display import data_report

        data_report(report)
