"""`tunesmith report RUN_DIR`: write the run's self-contained report.html."""

from __future__ import annotations

import click

from tunesmith import api


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--out", "-o", type=click.Path(dir_okay=False), help="Where to write the page (default RUN_DIR/report.html)."
)
@click.option("--open", "open_browser", is_flag=True, help="Open the report in the default web browser.")
def report(run_dir, out, open_browser):
    """Write one self-contained report.html for a run: loss curves, base vs fine-tuned metrics, confusion
    matrices, forgetting, flipped examples, config. Figures are embedded; it opens without a network.
    For a sweep folder (tunesmith sweep): the trials, the best config, the Pareto front, the test comparison.

    \b
    tunesmith report runs/tickets
    tunesmith report runs/tickets --out /tmp/tickets.html --open
    tunesmith report sweeps/ticket-triage
    """
    path = api.report(run_dir, out=out, open_browser=open_browser)
    click.echo(f"report: {path}")
