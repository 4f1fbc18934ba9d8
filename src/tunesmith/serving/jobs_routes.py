"""The files and fine-tuning jobs API (OpenAI's shapes) and the dashboard, on the chat server's app.

    POST /v1/files                         upload (multipart: file, purpose=fine-tune); checked in the background
    GET  /v1/files, /v1/files/{id}, /v1/files/{id}/content; DELETE /v1/files/{id}
    POST /v1/fine_tuning/jobs              create; GET lists (newest first, `after`, `limit`, `has_more`)
    GET  /v1/fine_tuning/jobs/{id}; POST .../cancel; GET .../events; GET .../checkpoints
    GET  /v1/fine_tuning/jobs/{id}/metrics every metrics event's data, oldest first (tunesmith: for curves)
    GET  /v1/fine_tuning/jobs/{id}/report  the run's report.html (tunesmith)
    GET  /                                 the dashboard (a static page; every datum it shows comes from /v1 with
                                           the key the user types in, so the page itself holds nothing to protect)

Each API key belongs to a tenant (tunesmith.jobs.tenants); a tenant sees only its own files, jobs and fine-tuned
models. Another tenant's id answers exactly like an id that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
from email import policy
from email.parser import BytesParser
from importlib import resources
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from tunesmith.atomic import atomic_write_bytes
from tunesmith.errors import TunesmithError
from tunesmith.jobs import store as st
from tunesmith.jobs.tenants import Tenant
from tunesmith.jobs.worker import Worker
from tunesmith.serving.app import APIError

log = logging.getLogger("tunesmith.serve")

PURPOSE = "fine-tune"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
METHODS = ("supervised", "dpo")
HYPER = {
    # name -> (type check, lowest, highest); "auto" is always allowed
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": ((int, float), 1e-3, 1000.0),
    "beta": ((int, float), 1e-3, 100.0),
}
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


class JobsService:
    """The store, the worker and the background file checker of one server."""

    def __init__(self, jobs_dir: Path, registry, engine, workers: int = 1, overrides: dict | None = None):
        self.dir = Path(jobs_dir)
        self.store = st.Store(self.dir / "jobs.db")
        self.registry, self.engine = registry, engine
        self.owners: dict[str, str] = {}  # fine-tuned model id -> tenant
        self.worker = Worker(
            self.store, self.dir, str(registry.base_path), overrides, workers, on_success=self._serve_job
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._checker = threading.Thread(target=self._check_files, name="tunesmith-files", daemon=True)

    def start(self) -> None:
        """Serve the models of finished jobs (again, after a restart), then check files and run jobs."""
        for job in self.store.jobs_with_status(st.SUCCEEDED):
            try:
                self._serve_job(job)
            except Exception as e:
                log.warning("not serving the model of %s: %s", job["id"], e)
        self._checker.start()
        self.worker.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.worker.stop()
        self.store.close()

    def _serve_job(self, job) -> str:
        run_dir = self.dir / "jobs" / job["id"] / "run"
        name = f"{job['suffix'] or ''}:{job['id']}"
        model_id = f"ft:{self.registry.base_id}:{name}"
        self.owners[model_id] = job["tenant"]
        if model_id not in self.registry.ids():
            self.engine.call(lambda: self.registry.add_run(run_dir, name=name), timeout=600)
        return model_id

    def visible(self, model_id: str, tenant: Tenant | None) -> bool:
        owner = self.owners.get(model_id)
        return owner is None or (tenant is not None and owner == tenant.name)

    # ---- files ---------------------------------------------------------------------------------------------------

    def _check_files(self) -> None:
        while not self._stop.is_set():
            for row in self.store.files_to_check():
                self._check_one(row)
            self._wake.wait(1.0)
            self._wake.clear()

    def _check_one(self, row) -> None:
        from tunesmith.api import check_data

        try:
            check_data(row["path"], model=str(self.registry.base_path))
        except TunesmithError as e:
            details = str(e).replace(row["path"], row["filename"])
            self.store.set_file_status(row["id"], "error", details)
        except Exception as e:  # a reader's bug must not leave the file "uploaded" for ever
            log.exception("checking %s", row["id"])
            self.store.set_file_status(row["id"], "error", f"internal error while checking: {type(e).__name__}: {e}")
        else:
            self.store.set_file_status(row["id"], "processed")


def add_routes(app, service: JobsService) -> None:
    store = service.store

    def tenant_of(request: Request) -> Tenant:
        return request.state.tenant

    # ---- files ---------------------------------------------------------------------------------------------------

    @app.post("/v1/files")
    async def upload(request: Request):
        tenant = tenant_of(request)
        fields = await _multipart(request, tenant.max_file_bytes)
        purpose = fields.get("purpose", (None, None))[1]
        purpose = purpose.decode("utf-8", "replace").strip() if purpose else None
        if purpose != PURPOSE:
            raise APIError(
                400,
                f"purpose {purpose!r} is not supported: this server takes files for fine-tuning only "
                f"(purpose='{PURPOSE}')",
                param="purpose",
            )
        if "file" not in fields:
            raise APIError(400, "no `file` part in the multipart body", param="file")
        filename, content = fields["file"]
        filename = Path(filename or "upload.jsonl").name
        if len(content) > tenant.max_file_bytes:
            raise _file_too_large(tenant, len(content))
        suffix = Path(filename).suffix.lower()
        if suffix not in SUFFIXES:
            raise APIError(
                400,
                f"{filename}: unsupported file type {suffix or '(none)'}; upload one of {', '.join(SUFFIXES)}",
                param="file",
                code="invalid_file_format",
            )
        file_id = st.new_id("file")
        path = service.dir / "files" / f"{file_id}{suffix}"
        await asyncio.to_thread(atomic_write_bytes, path, content)
        obj = store.add_file(file_id, tenant.name, filename, purpose, len(content), path, "uploaded")
        service._wake.set()
        return obj

    @app.get("/v1/files")
    def list_files(request: Request, after: str | None = None, limit: int = 10000, order: str = "desc", purpose=None):
        _check_limit(limit, 10000)
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be asc or desc, not {order!r}", param="order")
        return _paged(lambda: store.list_files(tenant_of(request).name, after, limit, order, purpose))

    @app.get("/v1/files/{file_id}")
    def get_file(request: Request, file_id: str):
        return _file_or_404(store, file_id, tenant_of(request))

    @app.get("/v1/files/{file_id}/content")
    def file_content(request: Request, file_id: str):
        _file_or_404(store, file_id, tenant_of(request))
        row = store.file_row(file_id, None)
        return Response(Path(row["path"]).read_bytes(), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(request: Request, file_id: str):
        tenant = tenant_of(request)
        _file_or_404(store, file_id, tenant)
        path = store.delete_file(file_id, tenant.name)
        in_use = any(file_id in (j["training_file"], j["validation_file"]) for j in store.jobs_with_status(*st.ACTIVE))
        if not in_use:  # a running job reads it (and a resumed one again): its bytes go when it is done
            path.unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- jobs ----------------------------------------------------------------------------------------------------

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        from tunesmith.serving.app import read_json

        tenant = tenant_of(request)
        body = await read_json(request, request.app.state.limits)
        fields = _job_fields(body, service, tenant)
        if store.queued_jobs(tenant.name) >= tenant.max_queued_jobs:
            raise APIError(
                429,
                f"this API key's tenant already has {tenant.max_queued_jobs} jobs validating or queued (its limit); "
                "wait for one to start or cancel one",
                type="rate_limit_error",
                code="too_many_queued_jobs",
            )
        return store.add_job(tenant.name, **fields)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request, after: str | None = None, limit: int = 20):
        _check_limit(limit, 1000)
        return _paged(lambda: store.list_jobs(tenant_of(request).name, after, limit))

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(request: Request, job_id: str):
        return _job_or_404(store, job_id, tenant_of(request))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(request: Request, job_id: str):
        _job_or_404(store, job_id, tenant_of(request))
        try:
            return store.request_cancel(job_id, tenant_of(request).name)
        except ValueError as e:
            raise APIError(400, f"cannot cancel {job_id}: {e}", param="fine_tuning_job_id") from None

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(request: Request, job_id: str, after: str | None = None, limit: int = 20):
        _job_or_404(store, job_id, tenant_of(request))
        _check_limit(limit, 1000)
        return _paged(lambda: store.list_events(job_id, after, limit))

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(request: Request, job_id: str, after: str | None = None, limit: int = 10):
        _job_or_404(store, job_id, tenant_of(request))
        _check_limit(limit, 1000)
        return _paged(lambda: store.list_checkpoints(job_id, after, limit))

    @app.get("/v1/fine_tuning/jobs/{job_id}/metrics")
    def job_metrics(request: Request, job_id: str):
        _job_or_404(store, job_id, tenant_of(request))
        return {"object": "list", "data": store.metric_events(job_id)}

    @app.get("/v1/fine_tuning/jobs/{job_id}/report")
    def job_report(request: Request, job_id: str):
        _job_or_404(store, job_id, tenant_of(request))
        page = service.dir / "jobs" / job_id / "run" / "report.html"
        if not page.is_file():
            raise APIError(404, f"{job_id} has no report yet: it is written when the job succeeds", code="not_found")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    # ---- dashboard -----------------------------------------------------------------------------------------------

    @app.get("/")
    def dashboard():
        return HTMLResponse(_asset("index.html"))

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC:
            raise APIError(404, f"no such asset: {name}", code="not_found")
        return Response(_asset(name), media_type=STATIC[name])


def _asset(name: str) -> str:
    return resources.files("tunesmith.serving").joinpath("static", name).read_text(encoding="utf-8")


async def _multipart(request: Request, max_file_bytes: int) -> dict[str, tuple[str | None, bytes]]:
    """The parts of a multipart/form-data body: name -> (filename, bytes). Read with a size cap (the tenant's file
    limit plus room for the form's other fields), parsed with the standard library's MIME parser."""
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise APIError(400, "upload files as multipart/form-data with the parts `file` and `purpose`")
    cap = max_file_bytes + 65536
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > cap:
        raise _file_too_large(request.state.tenant, int(length))
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > cap:
            raise _file_too_large(request.state.tenant, size)
        chunks.append(piece)
    head = f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + b"".join(chunks))
    if not message.is_multipart():
        raise APIError(400, "the multipart body could not be parsed (no parts found)")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _file_too_large(tenant: Tenant, size: int) -> APIError:
    return APIError(
        413,
        f"the file is {size} bytes, more than this API key may upload ({tenant.max_file_bytes} bytes, "
        "max_file_bytes in the keys file or --max-file-bytes)",
        param="file",
        code="file_too_large",
    )


def _check_limit(limit: int, highest: int) -> None:
    if not 1 <= limit <= highest:
        raise APIError(400, f"limit must be between 1 and {highest}, not {limit}", param="limit")


def _paged(fetch):
    try:
        return fetch().body()
    except st.NotFound as e:
        raise APIError(400, f"after: no item with id {e} in this list", param="after") from None


def _file_or_404(store: st.Store, file_id: str, tenant: Tenant) -> dict:
    try:
        return store.file(file_id, tenant.name)
    except st.NotFound:
        raise APIError(404, f"No such File object: {file_id}", param="id", code="file_not_found") from None


def _job_or_404(store: st.Store, job_id: str, tenant: Tenant) -> dict:
    try:
        return store.job(job_id, tenant.name)
    except st.NotFound:
        raise APIError(
            404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="job_not_found"
        ) from None


_SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_JOB_KEYS = {
    "model", "training_file", "validation_file", "hyperparameters", "method", "suffix", "seed", "metadata",
    "integrations",
}  # fmt: skip


def _job_fields(body: dict, service: JobsService, tenant: Tenant) -> dict:
    """The columns of a new job from a create request, or an APIError naming the first bad parameter."""
    unknown = sorted(set(body) - _JOB_KEYS)
    if unknown:
        raise APIError(400, f"unknown parameter `{unknown[0]}`", param=unknown[0], code="unknown_parameter")
    registry = service.registry
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model: give the base model's id (GET /v1/models lists it)", param="model")
    if model not in (registry.base_id, registry.base_name):
        raise APIError(
            400,
            f"Model {model} is not available for fine-tuning on this server; its base model is "
            f"{registry.base_id} (fine-tuned models cannot be fine-tuned further here)",
            param="model",
            code="model_not_available",
        )
    fields = {"model": registry.base_id}
    for param, required in (("training_file", True), ("validation_file", False)):
        file_id = body.get(param)
        if file_id is None and not required:
            fields[param] = None
            continue
        if not isinstance(file_id, str):
            raise APIError(400, f"{param}: give the id of an uploaded file (file-...)", param=param)
        try:
            row = service.store.file_row(file_id, tenant.name)
        except st.NotFound:
            raise APIError(
                400,
                f"invalid {param}: {file_id}: no such file among this API key's uploads (POST /v1/files)",
                param=param,
                code="file_not_found",
            ) from None
        if row["purpose"] != PURPOSE:
            raise APIError(400, f"invalid {param}: {file_id} was uploaded with purpose {row['purpose']!r}", param=param)
        fields[param] = file_id
    fields["method"] = _method(body)
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX.match(suffix)):
        raise APIError(400, "suffix: 1 to 64 letters, digits, - or _", param="suffix")
    fields["suffix"] = suffix
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2**31 - 1):
        raise APIError(400, "seed: an integer between 0 and 2147483647", param="seed")
    fields["seed"] = seed if seed is not None else random.randint(0, 2**31 - 1)
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or len(metadata) > 16
        or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 for k, v in metadata.items())
    ):
        raise APIError(400, "metadata: up to 16 string keys (64 characters) with string values", param="metadata")
    fields["metadata"] = metadata
    if body.get("integrations"):
        raise APIError(400, "integrations are not supported by this server", param="integrations")
    return fields


def _method(body: dict) -> dict:
    method = body.get("method") or {"type": "supervised"}
    if not isinstance(method, dict) or not isinstance(method.get("type"), str):
        raise APIError(400, "method: an object with a `type` (supervised or dpo)", param="method")
    kind = method["type"]
    if kind not in METHODS:
        raise APIError(
            400,
            f"method.type {kind!r} is not supported; use supervised or dpo",
            param="method.type",
            code="unsupported_method",
        )
    inner = {} if method.get(kind) is None else method[kind]
    hyper = inner.get("hyperparameters") if isinstance(inner, dict) else None
    if not isinstance(hyper, (dict, type(None))) or not isinstance(inner, dict):
        raise APIError(400, f"method.{kind}: an object with `hyperparameters` (an object)", param=f"method.{kind}")
    hyper = dict(hyper or {})
    top = body.get("hyperparameters")
    if top is not None:
        if not isinstance(top, dict):
            raise APIError(400, "hyperparameters: an object", param="hyperparameters")
        hyper = {**top, **hyper}
    allowed = [k for k in HYPER if k != "beta" or kind == "dpo"]
    for name, value in hyper.items():
        param = f"method.{kind}.hyperparameters.{name}"
        if name not in allowed:
            raise APIError(400, f"unknown hyperparameter {name!r}; known: {', '.join(allowed)}", param=param)
        if value == "auto":
            continue
        types, low, high = HYPER[name]
        if isinstance(value, bool) or not isinstance(value, types) or not low <= value <= high:
            raise APIError(
                400, f"{name} must be 'auto' or a number from {low:g} to {high:g}, not {value!r}", param=param
            )
    return {"type": kind, kind: {"hyperparameters": hyper}}
