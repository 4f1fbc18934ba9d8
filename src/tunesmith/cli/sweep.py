"""`tunesmith sweep`: search a recipe's hyperparameters with Optuna under a time budget."""

from __future__ import annotations

import click

from tunesmith import api
from tunesmith.cli.display import RichProgress
from tunesmith.cli.train import _DottedFlags


@click.command(
    cls=_DottedFlags,
    epilog="Any config key is also a flag (--train.max_steps 40 --data.max_length 512). The search space, pruner "
    "and objective can also be set in the recipe's sweep: section (docs/sweep.md).",
)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--trials", type=int, help="Trials in all, the baseline trial 0 included (default: sweep.trials, 20).")
@click.option("--budget", help="Wall-clock budget: 2h, 90m, 1h30m (default: sweep.budget, none).")
@click.option(
    "--objective",
    help="val_loss (default), task (the task metric on the validation split), a metric name, or task,forgetting.",
)
@click.option("--pruner", type=click.Choice(["median", "hyperband", "none"]), help="Default: sweep.pruner (median).")
@click.option("--output", "-o", help="Sweep folder (default sweeps/<name>); the same command resumes it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (the per-trial lines are still printed).")
@click.pass_context
def sweep(ctx, recipe, trials, budget, objective, pruner, output, quiet):
    """Search hyperparameters: Optuna's TPE, pruning on validation loss, resumable.

    \b
    tunesmith sweep recipes/ticket-triage-lora.yaml --trials 20 --budget 2h
    tunesmith sweep recipes/ticket-triage-lora.yaml --objective task,forgetting --budget 1h
    tunesmith report sweeps/ticket-triage             the trials, the best config, the test comparison

    Trial 0 is the recipe with this command's flags; every trial is a run folder (DIR/trial-NNN). The winner's fully resolved
    config is written to DIR/best.yaml and evaluated once on the test split against trial 0 and the prompted
    base model. Run the same command again to resume a stopped sweep.
    """
    path = api.sweep(
        recipe,
        trials=trials,
        budget=budget,
        objective=objective,
        pruner=pruner,
        output=output,
        progress=None if quiet else RichProgress,
        log=click.echo,
        **dict(ctx.meta["dotted_overrides"]),
    )
    click.echo(f"\nsweep: {path}\nnext: tunesmith report {path}")
