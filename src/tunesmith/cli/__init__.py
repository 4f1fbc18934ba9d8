"""The `tunesmith` command. A thin layer over `tunesmith.api`: parse flags, call one function, print.

Subcommands live one group per module and are imported only when invoked, so `tunesmith --help` does
not import torch and starts in well under a second.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from tunesmith.errors import TunesmithError

QUICK_START = """\
Fine-tune a language model on your own examples, and measure whether it beat prompting.

\b
Quick start:
  tunesmith data check tickets.jsonl              validate a dataset (errors carry file:line)
  tunesmith train --data tickets.jsonl            LoRA fine-tune of the default model
  tunesmith train recipes/ticket-triage-lora.yaml  ... or from a recipe
  tunesmith eval runs/tickets                     fine-tuned vs base prompted zero/few-shot
  tunesmith report runs/tickets                   one self-contained report.html with plots
  tunesmith sweep recipe.yaml --budget 2h         search hyperparameters (report: tunesmith report DIR)
  tunesmith generate runs/tickets --prompt "..."  try the result
  tunesmith chat runs/tickets                     talk to it
  tunesmith serve runs/tickets                    OpenAI-compatible API (base + fine-tuned adapters)
  tunesmith serve --base M --jobs-dir jobs/      ... plus fine-tuning jobs (OpenAI's API) and a dashboard
  tunesmith export runs/tickets --merge --out DIR  merged model (or --format gguf, --adapter-only)
  tunesmith models list                           built-in models (no model hub needed)

\b
Every config key can be set as a flag: --train.lr 1e-4 --lora.r 8 --data.max_length 512
"""

# command name -> "module:attribute"; imported on first use
COMMANDS = {
    "data": ("tunesmith.cli.data:data", "Check and summarise datasets."),
    "models": ("tunesmith.cli.models:models", "List, fetch and inspect built-in and local models."),
    "train": ("tunesmith.cli.train:train", "Fine-tune a model (recipe and/or flags)."),
    "generate": ("tunesmith.cli.generate:generate", "Generate from a run's model (one prompt or a file)."),
    "chat": ("tunesmith.cli.generate:chat", "Talk to a run's model interactively."),
    "sweep": ("tunesmith.cli.sweep:sweep", "Search hyperparameters (Optuna) under a time budget; resumable."),
    "eval": ("tunesmith.cli.eval:eval_command", "Fine-tuned vs base model prompted zero/few-shot: task metrics."),
    "report": ("tunesmith.cli.report:report", "Write a run's self-contained report.html (plots, metrics, forgetting)."),
    "serve": ("tunesmith.cli.serve:serve", "Serve a base model and its fine-tuned runs (OpenAI-compatible API)."),
    "export": ("tunesmith.cli.export:export", "Export a run: merged HF model, GGUF file or peft adapter (checked)."),
    "jobs": ("tunesmith.cli.jobs:jobs", "Fine-tuning jobs on a `tunesmith serve --jobs-dir` server (create, follow)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if not rows:
            return
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, help=QUICK_START, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tunesmith")
def cli():
    pass


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one clear message and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="tunesmith", standalone_mode=False)
    except TunesmithError as e:
        if getattr(e, "all_ranks", False) and os.environ.get("RANK", "0") != "0":
            return e.exit_code  # raised alike by every process of a distributed run: rank 0 says it
        # backslashreplace: a lone surrogate from the user's input must not turn the message into a traceback
        click.secho(f"error: {e}".encode("utf-8", "backslashreplace").decode("utf-8"), fg="red", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as e:  # a bug of ours: say so in one line; the traceback is one variable away
        if os.environ.get("TUNESMITH_DEBUG"):
            raise
        click.secho(f"internal error: {type(e).__name__}: {e}", fg="red", err=True)
        click.echo("This is a bug in tunesmith. Re-run with TUNESMITH_DEBUG=1 for the traceback.", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
