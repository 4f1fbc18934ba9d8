"""`tunesmith jobs`: create, list, show, cancel and follow fine-tuning jobs on a `tunesmith serve --jobs-dir` server.
A thin client of the HTTP API (the same one the openai package speaks)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from tunesmith import api


@click.group(
    epilog="The server: tunesmith serve --base MODEL --jobs-dir DIR. The same API works with the openai package: "
    "client.files.create / client.fine_tuning.jobs.create."
)
@click.option("--url", envvar="TUNESMITH_URL", default="http://127.0.0.1:8000", show_default=True, help="Server.")
@click.option("--api-key", envvar="TUNESMITH_API_KEY", help="API key (env TUNESMITH_API_KEY).")
@click.pass_context
def jobs(ctx, url, api_key):
    """Fine-tuning jobs on a tunesmith server.

    \b
      tunesmith jobs create --model tiny --training-file train.jsonl --suffix tickets --follow
      tunesmith jobs list
      tunesmith jobs events ftjob-... --follow
      tunesmith jobs cancel ftjob-...
    """
    ctx.obj = api.jobs_client(url, api_key)


@jobs.command()
@click.option("--model", required=True, help="Base model id (the server's base; GET /v1/models).")
@click.option("--training-file", required=True, help="A local file (uploaded first) or an uploaded file's id.")
@click.option("--validation-file", help="A local file or a file id; the job then ends with an evaluation.")
@click.option("--suffix", help="Part of the fine-tuned model's name: ft:<base>:<suffix>:<job id>.")
@click.option("--method", type=click.Choice(["supervised", "dpo"]), default="supervised", show_default=True)
@click.option("--n-epochs", help="auto or a number.")
@click.option("--batch-size", help="auto or a number.")
@click.option("--learning-rate-multiplier", help="auto or a number (times the automatic learning rate).")
@click.option("--beta", help="DPO's beta: auto or a number.")
@click.option("--seed", type=int)
@click.option("--follow", is_flag=True, help="Print the job's events until it ends.")
@click.pass_obj
def create(client, model, training_file, validation_file, suffix, method, seed, follow, **hyper):
    """Create a job (uploading local files first)."""
    body = {
        "model": model,
        "training_file": _file_id(client, training_file),
        "validation_file": _file_id(client, validation_file) if validation_file else None,
        "suffix": suffix,
        "seed": seed,
    }
    values = {k: _number(k, v) for k, v in hyper.items() if v is not None}
    if "beta" in values and method != "dpo":
        raise click.BadParameter("--beta applies to --method dpo only", param_hint="--beta")
    body["method"] = {"type": method, method: {"hyperparameters": values}}
    job = client.create_job(**body)
    click.echo(f"{job['id']}  {job['status']}")
    if follow:
        _follow(client, job["id"])


@jobs.command(name="list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.pass_obj
def list_jobs(client, limit):
    """Jobs, newest first."""
    page = client.list_jobs(limit=limit)
    if not page["data"]:
        click.echo("no jobs")
    for job in page["data"]:
        click.echo(f"{job['id']}  {job['status']:<16} {job['model']}  {job['fine_tuned_model'] or ''}".rstrip())


@jobs.command()
@click.argument("job_id")
@click.pass_obj
def show(client, job_id):
    """One job's fields."""
    job = client.job(job_id)
    for key in ("id", "status", "model", "fine_tuned_model", "training_file", "validation_file", "suffix", "seed"):
        click.echo(f"{key + ':':<18}{job[key] if job[key] is not None else '-'}")
    hp = job["hyperparameters"]
    click.echo(f"{'hyperparameters:':<18}" + ", ".join(f"{k} {v}" for k, v in hp.items()))
    click.echo(f"{'method:':<18}{job['method']['type']}")
    if job["trained_tokens"] is not None:
        click.echo(f"{'trained_tokens:':<18}{job['trained_tokens']}")
    if job["result_files"]:
        click.echo(f"{'result_files:':<18}{', '.join(job['result_files'])}")
    if job["error"]:
        click.echo(f"{'error:':<18}{job['error']['message']}")


@jobs.command()
@click.argument("job_id")
@click.pass_obj
def cancel(client, job_id):
    """Cancel a job (a running one stops at a step boundary with a checkpoint)."""
    job = client.cancel(job_id)
    click.echo(
        f"{job['id']}  {job['status']}" + ("  (stopping at the next step)" if job["status"] == "running" else "")
    )


@jobs.command()
@click.argument("job_id")
@click.option("--follow", is_flag=True, help="Keep printing new events until the job ends.")
@click.pass_obj
def events(client, job_id, follow):
    """A job's events, oldest first."""
    if follow:
        _follow(client, job_id)
        return
    for event in client.events(job_id):
        _print_event(event)


def _follow(client, job_id: str) -> None:
    last = None
    while True:
        status = client.job(job_id)["status"]  # before the events, so none is missed after the last read
        for event in client.events(job_id, after=last):
            _print_event(event)
            last = event["id"]
        if status in ("succeeded", "failed", "cancelled"):
            click.echo(f"{job_id}: {status}")
            return
        time.sleep(1.0)


def _print_event(event: dict) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["created_at"]))
    level = "" if event["level"] == "info" else f"[{event['level']}] "
    click.echo(f"{stamp}  {level}{event['message']}")


def _file_id(client, given: str) -> str:
    if given.startswith("file-") and not Path(given).exists():
        return given
    uploaded = client.upload(given)
    done = client.wait_for_file(uploaded["id"])
    click.echo(f"uploaded {given} as {done['id']}: {done['status']}")
    if done["status"] == "error":
        click.echo(done["status_details"], err=True)
    return done["id"]


def _number(name: str, value: str):
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"auto or a number, not {value!r}", param_hint=f"--{name.replace('_', '-')}") from None
    return int(number) if number.is_integer() and name in ("n_epochs", "batch_size") else number
