"""`tunesmith eval`: the fine-tuned model against the base model prompted zero- and few-shot."""

from __future__ import annotations

import click

from tunesmith import api


@click.command(name="eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(dir_okay=False), help="Test file (default: the run's data.test).")
@click.option("--metric", help="Task (classification, extraction, text, lm) or headline metric (accuracy, field_f1, "
                               "chrf, rouge_l, token_f1, exact_match, perplexity, ...); default: chosen from the data.")
@click.option("--by", type=click.Choice(["score", "generate", "both"]),
              help="Classification: label scoring, greedy generation, or both (default: both).")
@click.option("--format", "answer_format", metavar="REGEX",
              help="Regular expression generated answers should match in full; adds format_rate "
                   "(default: the recipe's eval.format).")
@click.option("--shots", type=int, help="Few-shot examples for the prompted base model (default 3; 0: none).")
@click.option("--limit", type=int, help="Evaluate the first N test examples only.")
@click.option("--batch-size", type=int, help="Test examples per forward pass (default 8).")
@click.option("--max-new-tokens", type=int, help="Generation length (default: from the longest reference).")
@click.option("--probe-limit", type=int, help="Use N of the forgetting probe's questions (default: all, or --limit).")
@click.option("--no-forgetting", is_flag=True, help="Skip the general-ability (forgetting) probe.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_command(run_dir, data, metric, by, answer_format, shots, limit, batch_size, max_new_tokens, probe_limit,
                 no_forgetting, quiet):
    """Measure the fine-tuned model against the base model prompted zero-shot and few-shot.

    Writes RUN_DIR/eval/task.json and RUN_DIR/eval/task_examples.jsonl (per-example answers; the examples that
    flipped between base and fine-tuned are listed in task.json), then prints a table with deltas vs the
    base model zero-shot.
    """
    result = api.evaluate(run_dir, data=data, metric=metric, by=by, shots=shots, limit=limit,
                          forgetting=not no_forgetting, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          quiet=quiet, probe_limit=probe_limit, answer_format=answer_format)
    api.render_eval_table(result)
    flips = result["flipped"]
    if flips["improved"] or flips["regressed"]:
        click.echo(f"fine-tuning fixed {len(flips['improved'])} and broke {len(flips['regressed'])} of "
                   f"{result['data']['examples']} examples (listed in {run_dir}/eval/task.json)")
