"""`tunesmith serve`: an OpenAI-compatible HTTP API for a base model and any number of its fine-tuned runs.

    registry.py  the base model (loaded once) and the runs' peft adapters on it; model ids; which runs fit
    engine.py    the one thread that owns the model: a queue, batches per adapter, a per-row sampling loop
    schemas.py   request bodies and response shapes (OpenAI's field names)
    app.py       the FastAPI app: endpoints, errors in OpenAI's format, limits, API keys, watched folder
    jobs_routes.py  files + fine-tuning jobs API (OpenAI's shapes) over tunesmith.jobs, and the dashboard at /
    static/      the dashboard's page, script and style (no CDN)

FastAPI, uvicorn and torch are imported only when a server is built.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from tunesmith.errors import ConfigError

API_KEY_ENV = "TUNESMITH_API_KEY"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so treat it as public


def check_exposure(host: str, api_key: str | None) -> None:
    """A server reachable from other machines must have an API key."""
    if not api_key and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host} without an API key: anyone who can reach this address could use the "
            f"server. Set one with --api-key KEY or the {API_KEY_ENV} environment variable (clients send it as "
            "`Authorization: Bearer KEY`), or bind to 127.0.0.1"
        )


def check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be bound (in use, or not this machine's)."""
    import socket

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: not a port number (0-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(
            f"--host {host}: cannot resolve it ({e.strerror}); use an IP address such as 127.0.0.1"
        ) from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(address)
        except OSError as e:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (or stop the program using it)"
            ) from None


def build(
    runs: list[str | Path] = (),
    base: str | None = None,
    *,
    api_key: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    watch: str | Path | None = None,
    adapter_roots: list[str | Path] = (),
    keys_file: str | Path | None = None,
    jobs_dir: str | Path | None = None,
    workers: int = 1,
    job_overrides: list[str] | dict | None = None,
    max_file_bytes: int | None = None,
    max_queued_jobs: int | None = None,
    log=print,
    **limits,
):
    """(app, registry): load the base model once, attach every run's adapter, build the app (not started).
    POST /v1/adapters loads runs from inside `adapter_roots`, `watch` and the given runs only.
    `keys_file`: several API keys, one tenant each (tunesmith.jobs.tenants). `jobs_dir`: where the files and
    fine-tuning jobs API keeps its store, uploads and runs (without it, that API is off); `workers` jobs run at
    once; `job_overrides` (KEY=VALUE config overrides) apply to every job's run."""
    from tunesmith.jobs.tenants import Tenants
    from tunesmith.run_dir import RunDir
    from tunesmith.serving.app import Limits, create_app
    from tunesmith.serving.registry import Registry

    if base is None:
        if runs:
            base = RunDir.open(Path(runs[0]).expanduser().resolve()).config.model.name
        else:
            from tunesmith.config import ModelConfig

            base = ModelConfig().name
    if watch is not None and not Path(watch).is_dir():
        raise ConfigError(f"--watch {watch}: not a folder; create it or point at the folder your runs are written to")
    for root in adapter_roots:
        if not Path(root).is_dir():
            raise ConfigError(f"--adapter-root {root}: not a folder; point at the folder holding the runs to allow")
    tenants = Tenants.build(api_key, keys_file, max_file_bytes=max_file_bytes, max_queued_jobs=max_queued_jobs)
    overrides = _job_overrides(job_overrides)
    if workers < 1:
        raise ConfigError(f"--workers {workers}: run at least 1 job at a time")
    log(f"loading base model {base} ...")
    registry = Registry(base, dtype=dtype, device=device)
    log(f"  in {str(registry.model.dtype).removeprefix('torch.')} on {registry.model.device} (--dtype to change)")
    for run in runs:
        served = registry.add_run(run)
        log(f"  {served.id}  ({served.method} adapter from {served.run_path})")
    app = create_app(
        registry,
        Limits(**limits),
        api_key=api_key,
        watch=watch,
        adapter_roots=adapter_roots,
        tenants=tenants,
        jobs_dir=jobs_dir,
        workers=workers,
        job_overrides=overrides,
    )
    if jobs_dir is not None:
        log(f"  fine-tuning jobs in {jobs_dir} ({workers} at a time)")
    return app, registry


def _job_overrides(given) -> dict:
    """--job-set KEY=VALUE items as a dict, each checked against the config schema now rather than per job."""
    from tunesmith.config import load_config, parse_override

    if not given:
        return {}
    values = dict(given) if isinstance(given, dict) else dict(parse_override(item) for item in given)
    load_config(None, list(values.items()))  # a ConfigError naming the key and the fix
    return values


def serve(
    runs: list[str | Path] = (),
    base: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    log=print,
    **options,
) -> None:
    """Serve until interrupted. See `build` for the options."""
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    check_exposure(host, api_key or options.get("keys_file"))  # before minutes of model loading
    check_port(host, port)
    app, registry = build(runs, base, api_key=api_key, log=log, **options)
    shown = f"[{host}]" if ":" in host else host
    log(
        f"serving {', '.join(registry.ids())} at http://{shown}:{port}/v1"
        + ("  (API key required)" if api_key or options.get("keys_file") else "")
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
