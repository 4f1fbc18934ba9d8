"""The FastAPI app: OpenAI-compatible endpoints over the engine, errors in OpenAI's format, limits, API key.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both streamed over
server-sent events with `stream: true`), POST /v1/adapters (serve another run without a restart). With a jobs
folder, also the files and fine-tuning jobs API and the dashboard (serving/jobs_routes.py).

API keys: one `api_key`, or several from a keys file (`tenants`, tunesmith.jobs.tenants); each key belongs to a
tenant, and a fine-tuned model made by a tenant's job is visible to that tenant only.

Errors are `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes: 400 bad request
(including a prompt that does not fit the context, code `context_length_exceeded`), 401 missing or wrong
API key, 403 an adapter outside the allowed folders, 404 unknown model, 409 an id already served, 413 body
too large, 429 too many requests waiting.

What a client without the API key learns: nothing but `/health`'s status (no model ids, no load). What a
client with it learns: model ids, never a path on the server's filesystem.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import TunesmithError
from tunesmith.run_dir import CONFIG, MODEL, RunDir
from tunesmith.serving import schemas
from tunesmith.serving.engine import Engine, Generation, Overloaded
from tunesmith.serving.registry import Conflict, Registry, UnknownModel

log = logging.getLogger("tunesmith.serve")


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    """Largest request body; larger ones get 413."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens; default: the model's context length."""
    max_tokens: int = 1024
    """Largest `max_tokens` a request may ask for; also the cap when a chat request gives none."""
    max_pending: int = 64
    """Generations (n counts) waiting or running at once; more get 429."""
    max_batch: int = 8
    """Generations run together in one batch."""
    max_json_depth: int = 64
    """Deepest nesting of arrays and objects in a request body; deeper ones get 400 before they are parsed.
    A chat request nests 5 deep (body, messages, message, content parts, part)."""


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(
            schemas.error_body(self.message, self.type, self.param, self.code), status_code=self.status, headers=headers
        )


class AdapterRoots:
    """The folders POST /v1/adapters may load runs from: the operator's `--adapter-root`s, the `--watch`
    folder and the runs the server was started with. A path is checked after resolving symlinks and `..`,
    and so is every file of the run that will be read (config.yaml, model/ and its entries), so a link
    inside an allowed folder cannot reach outside it. With no folders at all, nothing is loaded at run time.

    The check and the load are not atomic: someone who can write inside an allowed folder could swap a file
    for a link between them. Allowed folders are the operator's own, so we accept that."""

    def __init__(self, roots=()):
        self.roots = list(dict.fromkeys(Path(r).resolve() for r in roots))

    def check(self, given: str) -> Path:
        """The resolved run directory, or an APIError (403) that does not say where the path leads."""
        if not self.roots:
            raise APIError(
                403,
                "this server loads no adapters at run time: start it with --adapter-root FOLDER (or --watch "
                "FOLDER) to allow runs inside FOLDER",
                type="permission_error",
                param="path",
                code="adapter_path_not_allowed",
            )
        try:
            path = Path(given).resolve()
            inside = self._inside(path)
            if inside:
                model = path / MODEL
                entries = list(model.iterdir()) if model.is_dir() else []
                inside = all(self._inside(p.resolve()) for p in [path / CONFIG, model, *entries])
        except (OSError, RuntimeError, ValueError):  # a link loop, an unreadable folder
            inside = False
        if not inside:
            raise APIError(
                403,
                f"{given}: not inside a folder this server loads adapters from (its --adapter-root and --watch "
                "folders and the runs it was started with; links are followed); restart the server with "
                "--adapter-root pointing at the folder of this run",
                type="permission_error",
                param="path",
                code="adapter_path_not_allowed",
            )
        return path

    def _inside(self, path: Path) -> bool:
        return any(path == root or path.is_relative_to(root) for root in self.roots)


def create_app(
    registry: Registry,
    limits: Limits | None = None,
    api_key: str | None = None,
    watch: str | Path | None = None,
    watch_interval: float = 2.0,
    adapter_roots=(),
    tenants=None,
    jobs_dir: str | Path | None = None,
    workers: int = 1,
    job_overrides: dict | None = None,
) -> FastAPI:
    """The app serving `registry`'s models. Starts the engine thread (and the folder watcher) with the app's
    lifespan and stops them at shutdown. POST /v1/adapters loads runs from inside `adapter_roots`, `watch`
    and the folders of the runs already served. `tenants` (tunesmith.jobs.tenants.Tenants) replaces `api_key`
    with several keys. With `jobs_dir`, the files and fine-tuning jobs API runs `workers` jobs at once, with the
    config overrides `job_overrides` (dotted keys) applied to every job's run."""
    from contextlib import asynccontextmanager

    from tunesmith.jobs.tenants import Tenants

    limits = limits or Limits()
    tenants = tenants or Tenants.build(api_key)
    started_runs = [s.run_path for s in registry.all() if s.run_path is not None]
    roots = AdapterRoots([*adapter_roots, *([watch] if watch else []), *started_runs])
    engine = Engine(registry, max_batch=limits.max_batch, max_pending=limits.max_pending)
    watcher = Watcher(Path(watch), registry, engine, watch_interval) if watch else None
    service = None
    if jobs_dir is not None:
        from tunesmith.serving.jobs_routes import JobsService

        service = JobsService(Path(jobs_dir), registry, engine, workers=workers, overrides=job_overrides)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        if watcher:
            watcher.start()
        if service:
            await asyncio.to_thread(service.start)
        yield
        if service:
            await asyncio.to_thread(service.stop)
        if watcher:
            watcher.stop()
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="tunesmith", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.registry, app.state.limits = engine, registry, limits
    app.state.adapter_roots, app.state.tenants, app.state.jobs = roots, tenants, service

    def tenant_of(request: Request):
        """The tenant of the request's API key; None when the key is missing or wrong."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return tenants.lookup(token.strip() if scheme.lower() == "bearer" else None)

    def authorized(request: Request) -> bool:
        return tenant_of(request) is not None

    def visible(served, request: Request) -> bool:
        return service is None or service.visible(served.id, getattr(request.state, "tenant", None))

    def served_for(request: Request, model_id: str):
        served = _served(registry, model_id)
        if not visible(served, request):  # another tenant's model: answered as if it did not exist
            raise APIError(
                404, f"The model `{model_id}` does not exist on this server", param="model", code="model_not_found"
            )
        return served

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # a bug of ours: still answer in OpenAI's format, and log it
        log.error("internal error on %s", request.url.path, exc_info=e)
        return APIError(500, f"internal server error: {type(e).__name__}: {e}", type="server_error").response()

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            request.state.tenant = tenant_of(request)
            if request.state.tenant is None:
                return APIError(
                    401,
                    "Incorrect or missing API key: send it as `Authorization: Bearer <key>`",
                    code="invalid_api_key",
                ).response()
        upload = request.url.path == "/v1/files" and request.method == "POST"  # capped by the tenant's file limit
        length = request.headers.get("content-length")
        if not upload and length and length.isdigit() and int(length) > limits.max_body_bytes:
            return _too_large(limits).response()
        return await call_next(request)

    @app.get("/health")
    async def health(request: Request):
        # open to load balancers without the key, so it tells them the status only
        request.state.tenant = tenant_of(request)
        body = {"status": "ok" if engine.alive else "engine stopped"}
        if authorized(request):
            body.update(models=[s.id for s in registry.all() if visible(s, request)], pending=engine.pending)
        return JSONResponse(body, status_code=200 if engine.alive else 503)

    @app.get("/v1/models")
    async def list_models(request: Request):
        cards = [schemas.model_card(s, registry.base_id) for s in registry.all() if visible(s, request)]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str):
        return schemas.model_card(served_for(request, model_id), registry.base_id)

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        body = await _body(request, schemas.AdapterRequest, limits)
        path = roots.check(body.path)
        try:
            served = await asyncio.to_thread(engine.call, lambda: registry.add_run(path, body.name))
        except Conflict as e:
            raise APIError(409, str(e), param="name", code="model_exists") from None
        except TunesmithError as e:
            raise APIError(400, str(e), param="path") from None
        log.info("serving %s from %s", served.id, served.run_path)
        return schemas.model_card(served, registry.base_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request, schemas.ChatRequest, limits)
        served = served_for(request, body.model)
        messages = [m.as_dict() for m in body.messages]
        if messages[-1]["role"] == "assistant":
            raise APIError(
                400,
                "the last message is from the assistant; end with a user message to get an answer",
                param="messages",
            )
        with registry.tokenizer_lock:
            try:
                prompt = served.renderer.prompt_ids(messages, add_generation_prompt=True)
            except Exception as e:  # a template that rejects this conversation (roles out of order, ...)
                raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        max_new = _budget(registry, limits, len(prompt), body.max_new, "messages")
        return await _run(engine, body, served, [prompt], max_new, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request, schemas.CompletionRequest, limits)
        served = served_for(request, body.model)
        tok = registry.tokenizer
        with registry.tokenizer_lock:
            prompts = [tok(p, add_special_tokens=True)["input_ids"] for p in body.prompts]
        if any(not p for p in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        max_new = min(_budget(registry, limits, len(p), body.max_new, "prompt") for p in prompts)
        return await _run(engine, body, served, prompts, max_new, chat=False)

    if service is not None:
        from tunesmith.serving.jobs_routes import add_routes

        add_routes(app, service)
    return app


# ---- request handling ------------------------------------------------------------------------------------------


async def _body(request: Request, model, limits: Limits):
    data = await read_json(request, limits)
    if model is not schemas.AdapterRequest:
        name = schemas.unsupported_param(data)
        if name:
            raise APIError(
                400, f"`{name}` is not supported by this server; leave it out", param=name, code="unsupported_parameter"
            )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        problems = "; ".join(_problem(err) for err in e.errors()[:5])
        raise APIError(400, f"invalid request: {problems}", param=param) from None


async def read_json(request: Request, limits: Limits) -> dict:
    """The request body as a JSON object, read within the size and nesting limits (or an APIError)."""
    # read piece by piece: a chunked body has no content-length for the middleware to refuse, and reading it
    # whole first would let one request fill the server's memory
    raw, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limits.max_body_bytes:
            raise _too_large(limits)
        raw.append(piece)
    raw = b"".join(raw)
    depth = json_depth(raw, limits.max_json_depth)
    if depth > limits.max_json_depth:
        raise APIError(
            400,
            f"the request body nests arrays and objects more than {limits.max_json_depth} deep; "
            "an OpenAI request needs far fewer levels",
        )
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


_JSON_TYPES = {bool: "a boolean", str: "a string", int: "an integer", float: "a number", list: "an array"}


def _problem(err) -> str:
    """One validation error as `field: what is wrong`, naming the JSON type given where the type is wrong."""
    where = ".".join(str(p) for p in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"].endswith("_type"):
        given = err["input"]
        kind = "null" if given is None else _JSON_TYPES.get(type(given), "an object")
        shown = json.dumps(given, ensure_ascii=False)
        message += f", not {kind}" + (f" ({shown})" if len(shown) <= 40 else "")
    return f"{where}: {message}"


# a JSON string (escapes included), so brackets inside strings are not counted as nesting
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes, limit: int) -> int:
    """How deep `raw`'s arrays and objects nest, counted up to `limit` + 1 without parsing: json.loads
    recurses once per level, so a body of 100k `[` (100 kB, within the size limit) would end in a
    RecursionError deep in the parser. One regex pass and a loop over the brackets alone: 7 to 51 ms for a
    1 MB body on one core here (51: 500k `[]`; json.loads takes 6 to 170 ms on the same bodies)."""
    depth = deepest = 0
    for b in _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        if b in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def _too_large(limits: Limits) -> APIError:
    return APIError(
        413,
        f"the request body is larger than {limits.max_body_bytes} bytes (the server's limit, --max-body-bytes)",
        code="request_too_large",
    )


def _served(registry: Registry, model_id: str):
    try:
        return registry.get(model_id)
    except UnknownModel as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from None


def _budget(registry: Registry, limits: Limits, prompt_len: int, asked: int | None, param: str) -> int:
    """max_tokens for a request: checked against the server's limits and the model's context."""
    context = registry.context_length
    if limits.max_prompt_tokens and prompt_len > limits.max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt is {prompt_len} tokens, more than this server accepts "
            f"({limits.max_prompt_tokens}, --max-prompt-tokens); shorten it",
            param=param,
            code="context_length_exceeded",
        )
    if asked is not None and asked > limits.max_tokens:
        raise APIError(
            400, f"max_tokens is {asked}, more than this server allows ({limits.max_tokens})", param="max_tokens"
        )
    if asked is None:
        asked = max(1, min(limits.max_tokens, (context - prompt_len) if context else limits.max_tokens))
    if context and prompt_len + asked > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
            "Shorten the prompt or lower max_tokens.",
            param=param,
            code="context_length_exceeded",
        )
    return asked


class _Job:
    """The generations of one request and the asyncio queue their events arrive on."""

    def __init__(self, engine: Engine, body, served, prompts: list[list[int]], max_new: int):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.gens: list[Generation] = []
        for p, prompt in enumerate(prompts):
            for j in range(body.n):
                index = p * body.n + j
                seed = None if body.seed is None else body.seed + j

                def emit(event, index=index):
                    try:
                        loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
                    except RuntimeError:  # the event loop is gone (server shutting down)
                        pass

                stops = [*(body.stop or []), *served.marker_stops]
                self.gens.append(
                    Generation(
                        served.id,
                        prompt,
                        max_new,
                        body.temperature,
                        body.top_p,
                        seed,
                        stops,
                        served.stop_token_ids,
                        emit,
                    )
                )
        self.prompt_tokens = sum(len(p) for p in prompts)
        if not engine.alive:
            raise APIError(
                503, "the generation engine has stopped; restart the server", type="server_error", code="engine_stopped"
            )
        try:
            engine.submit(self.gens)
        except Overloaded as e:
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param="n") from None

    async def events(self):
        """(index, Event) until every generation has ended."""
        open_ = len(self.gens)
        while open_:
            index, event = await self.queue.get()
            if event.kind != "text":
                open_ -= 1
            yield index, event

    def cancel(self) -> None:
        for g in self.gens:
            g.cancelled.set()


async def _run(engine: Engine, body, served, prompts: list[list[int]], max_new: int, chat: bool):
    job = _Job(engine, body, served, prompts, max_new)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        return StreamingResponse(
            _stream(job, body, served.id, rid, created, chat),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        texts = [""] * len(job.gens)
        finish = [None] * len(job.gens)
        completion_tokens = 0
        async for index, event in job.events():
            if event.kind == "text":
                texts[index] += event.text
            elif event.kind == "error":
                raise APIError(500, event.error or "generation failed", type="server_error")
            else:
                finish[index] = event.finish_reason
                completion_tokens += event.completion_tokens
    finally:
        job.cancel()  # no-op for finished generations; frees the rest if we stopped early
    if chat:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": f}
            for i, (t, f) in enumerate(zip(texts, finish))
        ]
        obj = "chat.completion"
    else:
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))
        ]
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": served.id,
        "choices": choices,
        "usage": schemas.usage(job.prompt_tokens, completion_tokens),
    }


async def _stream(job: _Job, body, model_id: str, rid: str, created: int, chat: bool):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, **extra) -> str:
        payload = {"id": rid, "object": obj, "created": created, "model": model_id, "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def choice(index, text=None, finish=None, role=False):
        if not chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    completion_tokens = 0
    try:
        if chat:
            for i in range(len(job.gens)):
                yield chunk([choice(i, role=True)])
        async for index, event in job.events():
            if event.kind == "text":
                yield chunk([choice(index, event.text)])
            elif event.kind == "error":
                yield f"data: {json.dumps(schemas.error_body(event.error or 'generation failed', 'server_error'))}\n\n"
                return
            else:
                completion_tokens += event.completion_tokens
                yield chunk([choice(index, finish=event.finish_reason)])
        if body.include_usage:
            yield chunk([], usage=schemas.usage(job.prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away mid-stream: stop generating for it


# ---- a watched folder of runs ------------------------------------------------------------------------------------


class Watcher:
    """Serves every run that appears in a folder (a subfolder with config.yaml and a finished model/).

    Polls every `interval` seconds (no extra dependency; run folders appear atomically, so a poll never
    sees a half-written model/). A run that cannot be served is logged once, and tried again if its
    model/ changes."""

    def __init__(self, folder: Path, registry: Registry, engine: Engine, interval: float = 2.0):
        self.folder, self.registry, self.engine, self.interval = folder, registry, engine, interval
        self._tried: dict[Path, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunesmith-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(self.interval)

    def scan(self) -> list[str]:
        added = []
        candidates = (RunDir(p) for p in self.folder.glob("*") if (p / CONFIG).is_file())
        for run in sorted(r.path.resolve() for r in candidates if r.has_model):
            stamp = RunDir(run).model_dir.stat().st_mtime
            if self._tried.get(run) == stamp or self.registry.serves_run(run):
                continue
            self._tried[run] = stamp
            try:
                served = self.engine.call(lambda run=run: self.registry.add_run(run), timeout=300)
            except (TunesmithError, Conflict) as e:
                log.warning("not serving %s: %s", run, e)
                continue
            except TimeoutError:
                continue
            log.info("serving %s from %s", served.id, run)
            added.append(served.id)
        return added
