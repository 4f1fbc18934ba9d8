"""`tunesmith train`: a recipe and/or flags -> a run directory."""

from __future__ import annotations

import os

import click

from tunesmith import api
from tunesmith.cli.display import RichProgress
from tunesmith.config import parse_override
from tunesmith.errors import ConfigError

# named flags -> config keys
FLAGS = {
    "model": "model.name",
    "data": "data.train",
    "val_data": "data.validation",
    "test_data": "data.test",
    "method": "method",
    "objective": "train.objective",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
    "output": "output",
    "name": "name",
    "seed": "train.seed",
    "strict": "data.strict",
}


class _DottedFlags(click.Command):
    """Takes `--section.key value` / `--section.key=value` out of the arguments before click parses the rest,
    so any config key works as a flag without declaring each one."""

    def parse_args(self, ctx, args):
        rest, dotted, bad, i = [], [], [], 0
        while i < len(args):
            arg = args[i]
            name = arg.split("=", 1)[0]
            if not (arg.startswith("--") and "." in name):
                rest.append(arg)
                i += 1
            elif "=" in arg:
                dotted.append(parse_override(arg[2:]))
                i += 1
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                dotted.append(parse_override(f"{arg[2:]}={args[i + 1]}"))
                i += 2
            else:
                bad.append(arg)
                i += 1
        if bad:
            raise ConfigError(f"{', '.join(bad)}: no value given; write e.g. --lora.r 8")
        ctx.meta["dotted_overrides"] = dotted
        ctx.meta["raw_args"] = list(args)
        return super().parse_args(ctx, rest)


@click.command(
    cls=_DottedFlags,
    epilog="Any config key is also a flag: --lora.r 8 --lora.target all-linear --data.max_length 512 "
    "--train.schedule linear. See a recipe in recipes/ for every key.",
)
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--model", help="Built-in model name, local HF directory, or .gguf file.")
@click.option("--data", help="Training data file (.jsonl/.json/.csv/.parquet/.txt).")
@click.option("--val-data", help="Validation file (default: hold out data.val_fraction of --data).")
@click.option("--test-data", help="Held-out test file for `tunesmith eval`.")
@click.option("--method", help="full, freeze, lora, dora, ia3, prefix, prompt or adapter (default lora).")
@click.option("--objective", help="sft (default), or dpo, orpo, simpo on preference pairs (prompt/chosen/rejected).")
@click.option("--epochs", help="Passes over the data, or auto.")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--lr", help="Peak learning rate, or auto.")
@click.option("--batch-size", help="Examples per optimizer step, or auto.")
@click.option("--output", "-o", help="Run directory (default runs/<name>).")
@click.option("--name", help="Run name (default: the data file's stem).")
@click.option("--seed", type=int, help="Random seed (data order, initialisation).")
@click.option("--log", "log_sinks", multiple=True, type=click.Choice(["jsonl", "tensorboard"]), help="Metric sinks.")
@click.option(
    "--resume",
    "resume",
    type=click.Path(file_okay=False),
    help="Continue RUN_DIR from its last checkpoint (from step 0, with its saved config, if none was complete).",
)
@click.option("--strict", is_flag=True, default=None, help="data.strict: unknown keys in data rows are errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option(
    "--nproc",
    type=int,
    help="Train on N local processes (torch.distributed.run; DDP for adapters, FSDP2 for full fine-tuning).",
)
@click.option(
    "--dry-run", is_flag=True, help="Plan only: print the estimated memory per process (with --nproc N), train nothing."
)
@click.pass_context
def train(ctx, recipe, log_sinks, resume, quiet, nproc, dry_run, **flags):
    """Fine-tune a model on your examples.

    \b
    tunesmith train --data tickets.jsonl                  LoRA on the default model
    tunesmith train recipes/ticket-triage-lora.yaml --train.max_steps 20
    tunesmith train --resume runs/tickets                 continue after a stop
    tunesmith train recipe.yaml --nproc 2                 on 2 processes (GPUs, or CPU cores)
    """
    if nproc is not None and nproc > 1 and not dry_run:
        # the same command without --nproc, once per process; rank 0 prints the run's lines
        api.launch_train(nproc, _without_nproc(ctx.meta["raw_args"]), log=click.echo)
        return
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give at least 1 process")
    progress = None if quiet or dry_run else RichProgress()  # --quiet: no bar and no validation lines
    if resume:
        if recipe or any(v is not None for v in flags.values()) or ctx.meta["dotted_overrides"] or dry_run:
            raise ConfigError("--resume continues a run with its saved config; give no recipe or other flags with it")
        run = api.train(resume=resume, quiet=quiet, log=click.echo, progress=progress)
    else:
        overrides = [(FLAGS[k], v) for k, v in flags.items() if v is not None]
        overrides = [(k, parse_override(f"{k}={v}")[1] if isinstance(v, str) else v) for k, v in overrides]
        if log_sinks:
            overrides.append(("train.log", list(log_sinks)))
        overrides += ctx.meta["dotted_overrides"]
        if dry_run:
            api.estimate_memory(recipe, nproc=nproc or 1, log=click.echo, **dict(overrides))
            return
        run = api.train(recipe, quiet=quiet, log=click.echo, progress=progress, **dict(overrides))
    if os.environ.get("RANK", "0") != "0":
        return  # a process of a distributed run: rank 0 says where the run is
    click.echo(
        f'\nrun: {run.path}\nnext: tunesmith generate {run.path} --prompt "..."   or   tunesmith chat {run.path}'
    )


def _without_nproc(args: list[str]) -> list[str]:
    """The train command's arguments less --nproc N / --nproc=N (what each process runs)."""
    out, skip = ["train"], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
