"""`tunesmith serve`: an OpenAI-compatible API for a base model and its fine-tuned runs."""

from __future__ import annotations

import click

from tunesmith import api


@click.command(
    epilog="Clients: openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='KEY'); a request's "
    "`model` picks the base (its name) or a run (ft:<base>:<run-name>, see GET /v1/models)."
)
@click.argument("run_dirs", nargs=-1, type=click.Path(file_okay=False))
@click.option("--base", help="Base model (built-in name, HF directory or .gguf); default: the first run's base.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback needs an API key."
)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--api-key",
    envvar="TUNESMITH_API_KEY",
    help="Required as `Authorization: Bearer KEY` (env TUNESMITH_API_KEY); mandatory when --host is not loopback.",
)
@click.option("--watch", type=click.Path(), help="Also serve every run that appears in this folder.")
@click.option(
    "--adapter-root",
    "adapter_roots",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Folder POST /v1/adapters may load runs from (repeatable); the --watch folder and the runs given "
    "are allowed too, nothing else.",
)
@click.option(
    "--max-tokens",
    default=1024,
    show_default=True,
    type=int,
    help="Largest max_tokens a request may ask for (and the default for chat).",
)
@click.option("--max-prompt-tokens", type=int, help="Longest prompt accepted; default: the model's context.")
@click.option(
    "--max-pending",
    default=64,
    show_default=True,
    type=int,
    help="Generations waiting or running at once; more get HTTP 429.",
)
@click.option("--max-batch", default=8, show_default=True, type=int, help="Generations decoded together.")
@click.option("--max-body-bytes", default=1_000_000, show_default=True, type=int)
@click.option(
    "--jobs-dir",
    type=click.Path(file_okay=False),
    help="Turn on the files + fine-tuning jobs API and the dashboard at /: store, uploads and runs go here "
    "(a restart with the same folder resumes everything).",
)
@click.option("--workers", default=1, show_default=True, type=int, help="Fine-tuning jobs run at once.")
@click.option(
    "--job-set",
    "job_overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Config override for every job's run (repeatable), e.g. --job-set method=dora --job-set train.save_every=50.",
)
@click.option(
    "--keys-file",
    type=click.Path(dir_okay=False, exists=True),
    help="YAML file of API keys, one tenant each, with limits (README: 'Fine-tuning as a service').",
)
@click.option("--max-file-bytes", type=int, help="Largest upload per file; default 50000000 (keys file: per tenant).")
@click.option("--max-queued-jobs", type=int, help="Jobs validating or queued per tenant; default 5.")
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="Precision the models are loaded in; auto: bfloat16 where the device computes it natively.",
)
def serve(run_dirs, base, host, port, api_key, watch, **options):
    """Serve a base model and fine-tuned runs of it over an OpenAI-compatible HTTP API.

    \b
      tunesmith serve runs/tickets                     the run and its base on 127.0.0.1:8000
      tunesmith serve runs/a runs/b --watch runs/      several runs; new runs in runs/ appear live
      tunesmith serve --base smollm2-135m-instruct     the base model alone
      tunesmith serve --jobs-dir jobs/ --keys-file keys.yaml   + fine-tuning jobs API, tenants, dashboard at /
    """
    for key, value in options.items():
        if (
            key
            in ("max_tokens", "max_pending", "max_batch", "max_body_bytes", "max_prompt_tokens", "workers")
            + ("max_file_bytes", "max_queued_jobs")
            and value is not None
            and value < 1
        ):
            raise click.BadParameter(f"must be at least 1, not {value}", param_hint=f"--{key.replace('_', '-')}")
    api.serve(list(run_dirs), base=base, host=host, port=port, api_key=api_key, watch=watch, log=click.echo, **options)
