"""`tunesmith eval`: the fine-tuned model against the base model prompted zero- and few-shot."""

from __future__ import annotations

import os

import click

from tunesmith import api


def _int_or_auto(ctx, param, value: str | None):
    """A click callback: None, "auto", or a positive int; a usage error naming the option otherwise."""
    if value is None or value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"{value!r}: give a positive number or auto")
    return int(value)


@click.command(name="eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(dir_okay=False), help="Test file (default: the run's data.test).")
@click.option(
    "--metric",
    help="Task (classification, extraction, text, lm) or headline metric (accuracy, field_f1, "
    "chrf, rouge_l, token_f1, exact_match, perplexity, ...); default: chosen from the data.",
)
@click.option(
    "--by",
    type=click.Choice(["score", "generate", "both"]),
    help="Classification: label scoring, greedy generation, or both (default: both).",
)
@click.option(
    "--format",
    "answer_format",
    metavar="REGEX",
    help="Regular expression generated answers should match in full; adds format_rate "
    "(default: the recipe's eval.format).",
)
@click.option(
    "--shots",
    type=int,
    help="Random few-shot examples for the prompted base model (default: 3, and at least one per label; 0: none).",
)
@click.option(
    "--knn-shots",
    type=int,
    help="Retrieved shots: the K most similar training examples per test example (default 8; 0: no such variant).",
)
@click.option(
    "--no-select", is_flag=True, help="Do not try prompt variants on the validation split (no best-prompt system)."
)
@click.option(
    "--select-limit",
    type=int,
    help="Validation examples the prompt variants are tried on (default: 100 for classification, 40 otherwise).",
)
@click.option("--allow-missing-labels", is_flag=True, help="Allow --shots below the number of labels.")
@click.option("--limit", type=int, help="Evaluate the first N test examples only.")
@click.option(
    "--batch-size",
    callback=_int_or_auto,
    help="Test examples per forward pass, or auto: as many as fit 4096 tokens, up to 64 (default: the run's "
    "eval.batch_size).",
)
@click.option("--max-new-tokens", type=int, help="Generation length (default: from the longest reference).")
@click.option("--probe-limit", type=int, help="Use N of the forgetting probe's questions (default: all, or --limit).")
@click.option("--no-forgetting", is_flag=True, help="Skip the general-ability (forgetting) probe.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="Precision the models are loaded in (default: the run's model.dtype; auto: bfloat16 where native).",
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Measure everything again. By default a system whose model weights, prompts, data, settings and tunesmith "
    "code all match an earlier measurement reuses it (the prompted base systems when another run is evaluated on the "
    "same data; the fine-tuned model too when the same run is evaluated again), as does the probe's base half; "
    "TUNESMITH_EVAL_CACHE=0 does the same as --fresh.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_command(
    run_dir,
    data,
    metric,
    by,
    answer_format,
    shots,
    knn_shots,
    no_select,
    select_limit,
    allow_missing_labels,
    limit,
    batch_size,
    max_new_tokens,
    probe_limit,
    no_forgetting,
    dtype,
    fresh,
    quiet,
):
    """Measure the fine-tuned model against the base model prompted zero-shot, few-shot, and with the best prompt.

    The best prompt is chosen on the validation split, never the test split: zero-shot, a format instruction, random
    shots, retrieved nearest-neighbour shots, each with and without calibrated label scoring.

    Writes RUN_DIR/eval/task.json and RUN_DIR/eval/task_examples.jsonl (per-example answers; the examples that
    flipped between base and fine-tuned are listed in task.json), then prints a table with deltas vs the
    base model zero-shot.
    """
    from rich.console import Console

    from tunesmith.cli.display import RichProgress, summary_table

    if fresh:
        os.environ["TUNESMITH_EVAL_CACHE"] = "0"  # evaluation/memo.py
    result = api.evaluate(
        run_dir,
        data=data,
        metric=metric,
        by=by,
        shots=shots,
        limit=limit,
        forgetting=not no_forgetting,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        quiet=quiet,
        probe_limit=probe_limit,
        answer_format=answer_format,
        knn_shots=knn_shots,
        select=False if no_select else None,
        select_limit=select_limit,
        allow_missing_labels=allow_missing_labels,
        dtype=dtype,
        progress=None if quiet else RichProgress(),
    )
    Console().print(summary_table(result))
    flips = result["flipped"]
    if flips["improved"] or flips["regressed"]:
        click.echo(
            f"fine-tuning fixed {len(flips['improved'])} and broke {len(flips['regressed'])} of "
            f"{result['data']['examples']} examples (listed in {run_dir}/eval/task.json)"
        )
