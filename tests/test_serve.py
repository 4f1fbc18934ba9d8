"""`tunesmith serve`, driven through the official `openai` client against a real uvicorn server on loopback.

Two LoRA runs of a tiny random Llama (trained a few steps in a module fixture) are served next to the base
on one copy of the base weights. Each test checks values: texts, ids, finish reasons, token counts.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import socket
import threading
import time

import httpx
import openai
import pytest

import tunesmith
from test_train import write_chat_data
from tunesmith.cli import main
from tunesmith.errors import ConfigError, RunError

torch = pytest.importorskip("torch")
torch.set_num_threads(2)

PROMPT = [{"role": "user", "content": "ticket 7: refund invoice please"}]


def _train(tiny_model_dir, data, out, seed, **extra):
    return tunesmith.train(
        None,
        quiet=True,
        log=lambda *_: None,
        **{
            "model.name": str(tiny_model_dir),
            "data.train": str(data),
            "output": str(out),
            "train.max_steps": 2,
            "train.batch_size": 4,
            "train.batching": "pad",
            "data.max_length": 64,
            "train.lr": 5e-2,
            "lora.r": 4,
            "train.seed": seed,
            **extra,
        },
    )


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = write_chat_data(root / "train.jsonl", 12)
    a = _train(tiny_model_dir, data, root / "runs" / "alpha", seed=1, name="alpha")
    b = _train(
        tiny_model_dir,
        data,
        root / "runs" / "beta",
        seed=2,
        name="beta",
        **{"data.system_prompt": "Classify the ticket."},
    )
    return root, a, b


class Server:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def server(tiny_model_dir, runs):
    from tunesmith.serving import build

    root, a, b = runs
    allowed = root / "allowed"
    allowed.mkdir(exist_ok=True)
    app, registry = build([a.path, b.path], log=lambda *_: None, max_tokens=64, max_pending=40, adapter_roots=[allowed])
    srv = Server(app)
    srv.base_id = registry.base_id
    srv.allowed = allowed
    yield srv
    srv.close()


def test_models_lists_the_base_and_both_runs(server):
    models = server.client().models.list()
    ids = [m.id for m in models.data]
    base = server.base_id
    assert ids == [base, f"ft:{base}:alpha", f"ft:{base}:beta"]
    assert server.client().models.retrieve("alpha").id == f"ft:{base}:alpha"
    tuned = models.data[1]
    assert tuned.object == "model" and tuned.owned_by == "tunesmith" and tuned.model_extra["parent"] == base


def test_chat_matches_run_generate_and_reports_real_usage(server, runs):
    _, alpha, beta = runs
    client = server.client()
    for run, name in ((alpha, "alpha"), (beta, "beta")):
        r = client.chat.completions.create(
            model=f"ft:{server.base_id}:{name}", messages=PROMPT, max_tokens=12, temperature=0
        )
        expected = run.generate(PROMPT, max_new_tokens=12)
        assert r.choices[0].message.content == expected and expected
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model.endswith(name)
        assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
        model, tokenizer, renderer = run.load_model()
        assert r.usage.prompt_tokens == len(renderer.prompt_ids(PROMPT))  # beta's includes its system prompt
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == 12
        else:
            assert r.usage.completion_tokens < 12
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the adapters and the base really differ (else the comparison above proves nothing)
    texts = {
        m: client.chat.completions.create(model=m, messages=PROMPT, max_tokens=12, temperature=0)
        .choices[0]
        .message.content
        for m in [server.base_id, f"ft:{server.base_id}:alpha", "beta"]
    }
    assert len(set(texts.values())) == 3


def test_streaming_gives_the_same_text_as_a_plain_request(server):
    client = server.client()
    args = dict(model="alpha", messages=PROMPT, max_tokens=10, temperature=0.9, seed=11)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_same_seed_same_text_and_n_choices(server):
    client = server.client()
    args = dict(model="beta", messages=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9)
    one = client.chat.completions.create(**args, seed=5).choices[0].message.content
    assert client.chat.completions.create(**args, seed=5).choices[0].message.content == one
    r = client.chat.completions.create(**args, seed=5, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.choices[0].message.content == one  # choice j is seeded with seed + j
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.prompt_tokens == client.chat.completions.create(**args, seed=5).usage.prompt_tokens
    lengths = sum(c.finish_reason == "length" for c in r.choices)
    assert 10 * lengths <= r.usage.completion_tokens <= 30 and (r.usage.completion_tokens == 30) == (lengths == 3)


def test_stop_strings_end_the_text_and_never_leak(server):
    client = server.client()
    full = client.completions.create(model=server.base_id, prompt="The ticket says", max_tokens=16, temperature=0)
    text = full.choices[0].text
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 16
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    cut = client.completions.create(
        model=server.base_id, prompt="The ticket says", max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 16
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=server.base_id, prompt="The ticket says", max_tokens=16, temperature=0, stop=[stop], stream=True
        )
    )
    assert streamed == cut.choices[0].text


def test_completions_with_several_prompts(server):
    r = server.client().completions.create(
        model="alpha", prompt=["ticket 1:", "ticket 2: crash"], max_tokens=5, temperature=0, n=2
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices of a prompt agree
    lengths = sum(c.finish_reason == "length" for c in r.choices)
    assert 5 * lengths <= r.usage.completion_tokens <= 20 and (r.usage.completion_tokens == 20) == (lengths == 4)
    assert r.usage.prompt_tokens == len(server.app.state.registry.tokenizer("ticket 1:")["input_ids"]) + len(
        server.app.state.registry.tokenizer("ticket 2: crash")["input_ids"]
    )


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        (dict(model="nope"), openai.NotFoundError, "does not exist"),
        (dict(temperature=3.5), openai.BadRequestError, "temperature"),
        (dict(max_tokens=0), openai.BadRequestError, "max_tokens"),
        (dict(max_tokens=65), openai.BadRequestError, "more than this server allows (64)"),
        (dict(messages=[]), openai.BadRequestError, "messages"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), openai.BadRequestError, "role"),
        (dict(stop=["a", "b", "c", "d", "e"]), openai.BadRequestError, "at most 4"),
        (dict(logprobs=True), openai.BadRequestError, "`logprobs` is not supported"),
        (dict(messages=[{"role": "user", "content": "word " * 600}]), openai.BadRequestError, "maximum context length"),
        (
            dict(messages=[{"role": "user", "content": "word " * 490}], max_tokens=30),
            openai.BadRequestError,
            "30 for the completion",
        ),
    ],
)
def test_errors_come_in_openai_format(server, kwargs, error, fragment):
    args = dict(model="alpha", messages=PROMPT, max_tokens=4, **{})
    args.update(kwargs)
    with pytest.raises(error) as info:
        server.client().chat.completions.create(**args)
    assert fragment in info.value.message
    assert set(info.value.body) >= {"message", "type", "param", "code"}


def test_body_size_limit_and_bad_json(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{" + b" " * 1_100_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_adapter_added_at_runtime(server, runs, tiny_model_dir, tmp_path):
    root, alpha, _ = runs
    copy = server.allowed / "gamma"
    shutil.copytree(alpha.path, copy)
    r = httpx.post(server.url + "/v1/adapters", json={"path": str(copy), "name": "gamma"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == f"ft:{server.base_id}:gamma"
    client = server.client()
    assert f"ft:{server.base_id}:gamma" in [m.id for m in client.models.list().data]
    same = [
        client.chat.completions.create(model=m, messages=PROMPT, max_tokens=8, temperature=0).choices[0].message.content
        for m in ("gamma", "alpha")
    ]
    assert same[0] == same[1]  # a copy of alpha's adapter answers as alpha does
    again = httpx.post(server.url + "/v1/adapters", json={"path": str(copy), "name": "gamma"})
    assert again.status_code == 409
    missing = httpx.post(server.url + "/v1/adapters", json={"path": str(server.allowed / "none")})
    assert missing.status_code == 400 and "not a run directory" in missing.json()["error"]["message"]


def test_concurrent_load_every_response_checked(server):
    """24 concurrent requests over three models, mixed streaming: each answer is its model's, the same as
    the answer it gives alone (greedy), and its usage adds up. The server must batch them (fewer batches
    than requests), rows of different adapters included."""
    client = server.client()
    models = [server.base_id, "ft:%s:alpha" % server.base_id, "ft:%s:beta" % server.base_id]
    prompts = [[{"role": "user", "content": f"ticket {i}: parcel tracking now"}] for i in range(8)]
    alone = {
        (m, i): client.chat.completions.create(model=m, messages=prompts[i], max_tokens=6, temperature=0)
        .choices[0]
        .message.content
        for m in models
        for i in range(8)
    }
    engine = server.app.state.engine
    before = engine.batches_run

    def ask(k):
        m, i = models[k % 3], k % 8
        if k % 2:
            chunks = list(
                client.chat.completions.create(
                    model=m,
                    messages=prompts[i],
                    max_tokens=6,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return k, m, i, text, chunks[-1].usage, chunks[0].model
        r = client.chat.completions.create(model=m, messages=prompts[i], max_tokens=6, temperature=0)
        return k, m, i, r.choices[0].message.content, r.usage, r.model

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(ask, range(24)))
    assert len(results) == 24
    for k, m, i, text, usage, model in results:
        assert model == m and text and text == alone[(m, i)], (k, m, text, alone[(m, i)])
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and 1 <= usage.completion_tokens <= 6
    assert engine.batches_run - before < 24 and engine.largest_batch > 1
    assert engine.mixed_batches > 0  # LoRA runs and the base shared batches (peft's adapter_names)
    assert engine.pending == 0


def test_overload_gives_429_and_a_plain_base_matches_the_base_with_adapters_off(tiny_model_dir, server):
    from tunesmith.serving import build

    app, registry = build([], base=str(tiny_model_dir), log=lambda *_: None, max_pending=2, max_tokens=64)
    srv = Server(app)
    try:
        client = srv.client()
        with pytest.raises(openai.BadRequestError, match="more than the server runs at once"):
            client.chat.completions.create(model=registry.base_id, messages=PROMPT, max_tokens=4, n=3)
        # hold the engine (a job on its thread waits for the gate) so admitted generations stay pending
        gate = threading.Event()
        threading.Thread(target=app.state.engine.call, args=(gate.wait,), daemon=True).start()
        stream = client.chat.completions.create(model=registry.base_id, messages=PROMPT, max_tokens=8, n=2, stream=True)
        first = next(iter(stream))  # the response has started, so both generations are admitted
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model=registry.base_id, messages=PROMPT, max_tokens=4)
        assert info.value.status_code == 429 and "busy" in info.value.message
        assert info.value.response.headers["retry-after"] == "1"
        gate.set()
        rest = list(stream)
        assert first.choices[0].delta.role == "assistant"
        assert sorted(c.choices[0].index for c in rest if c.choices[0].finish_reason) == [0, 1]
        ok = client.chat.completions.create(model=registry.base_id, messages=PROMPT, max_tokens=8, n=2, temperature=0)
        assert len(ok.choices) == 2 and app.state.engine.pending == 0
        with_adapters = server.client().chat.completions.create(
            model=server.base_id, messages=PROMPT, max_tokens=8, temperature=0
        )
        assert ok.choices[0].message.content == with_adapters.choices[0].message.content
    finally:
        srv.close()


def test_api_key_is_enforced(tiny_model_dir, runs):
    from tunesmith.serving import build

    app, registry = build([], base=str(tiny_model_dir), log=lambda *_: None, api_key="s3cret")
    srv = Server(app)
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert [m.id for m in srv.client("s3cret").models.list().data] == [registry.base_id]
        # /health stays open (for load balancers) but tells a client without the key the status only
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.get(srv.url + "/health", headers=headers)
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            assert registry.base_id not in r.text
        r = httpx.get(srv.url + "/health", headers={"Authorization": "Bearer s3cret"})
        assert r.json() == {"status": "ok", "models": [registry.base_id], "pending": 0}
    finally:
        srv.close()


def test_watched_folder_serves_new_runs(tiny_model_dir, runs, tmp_path):
    from tunesmith.serving import build

    _, alpha, _ = runs
    folder = tmp_path / "watched"
    folder.mkdir()
    app, registry = build([], base=str(tiny_model_dir), log=lambda *_: None, watch=folder)
    srv = Server(app)
    try:
        assert registry.ids() == [registry.base_id]
        shutil.copytree(alpha.path, folder / "delta")
        (folder / "not-a-run").mkdir()
        deadline = time.monotonic() + 20
        while len(registry.ids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert registry.ids() == [registry.base_id, f"ft:{registry.base_id}:alpha"]  # the run's own name
    finally:
        srv.close()


def test_refuses_runs_that_cannot_share_the_base(tiny_model_dir, runs, tmp_path):
    from tunesmith.serving.registry import Registry

    root, alpha, _ = runs
    registry = Registry(str(tiny_model_dir))
    full = tmp_path / "full"
    shutil.copytree(alpha.path, full)
    meta = json.loads((full / "model" / "tunesmith.json").read_text())
    (full / "model" / "tunesmith.json").write_text(json.dumps({**meta, "method": "full"}))
    with pytest.raises(RunError, match="full fine-tune with weights of its own"):
        registry.add_run(full)
    pickled = tmp_path / "pickled"
    shutil.copytree(alpha.path, pickled)
    (pickled / "model" / "adapter_model.safetensors").rename(pickled / "model" / "adapter_model.bin")
    with pytest.raises(RunError, match="only safetensors adapters are served"):
        registry.add_run(pickled)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(alpha.path, unfinished)
    shutil.rmtree(unfinished / "model")
    with pytest.raises(RunError, match="training has not finished"):
        registry.add_run(unfinished)


def test_non_loopback_without_key_refuses_to_start(monkeypatch, capsys):
    from tunesmith.serving import check_exposure

    monkeypatch.delenv("TUNESMITH_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="without an API key"):
        check_exposure("0.0.0.0", None)
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    check_exposure("0.0.0.0", "key")
    assert main(["serve", "--host", "0.0.0.0", "--base", "whatever"]) == 2
    assert "refusing to serve on 0.0.0.0 without an API key" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--base", "whatever", "--port", str(busy.getsockname()[1])]) == 2
    assert "pick another --port" in capsys.readouterr().err


@pytest.mark.slow
def test_real_default_model_stops_at_end_of_turn_and_matches_generate():
    """SmolLM2-135M-Instruct: a short answer ends at <|im_end|> (finish_reason stop, marker not shown) and is
    the text transformers' generate gives for the same prompt."""
    from tunesmith import models
    from tunesmith.data.templates import Renderer
    from tunesmith.evaluation.generate import generate
    from tunesmith.serving import build

    app, registry = build([], base="smollm2-135m-instruct", log=lambda *_: None, max_tokens=64)
    srv = Server(app)
    try:
        question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        r = srv.client().chat.completions.create(
            model="smollm2-135m-instruct", messages=question, max_tokens=64, temperature=0
        )
    finally:
        srv.close()
    answer = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and "Paris" in answer and "<|im_end|>" not in answer
    model, tokenizer = models.load("smollm2-135m-instruct")
    assert generate(model, tokenizer, Renderer(tokenizer), question, max_new_tokens=64) == answer
    answer_tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens == answer_tokens + 1  # the answer and <|im_end|>


def test_a_client_that_goes_away_stops_its_generation(server):
    engine = server.app.state.engine
    before = engine.cancelled
    gate = threading.Event()  # hold the engine so the request is still waiting when the client leaves
    threading.Thread(target=engine.call, args=(gate.wait,), daemon=True).start()
    body = {"model": "alpha", "messages": PROMPT, "max_tokens": 64, "stream": True, "stop": ["never-generated"]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        first = next(r.iter_lines())
    assert first.startswith("data: ") and engine.pending == 1
    gate.set()
    deadline = time.monotonic() + 20
    while engine.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.pending == 0 and engine.cancelled == before + 1


def test_dora_is_served_batched_per_model_and_other_adapter_types_are_refused(tiny_model_dir, runs, tmp_path):
    """peft's mixed batches do not support DoRA: a DoRA run is served, but never shares a batch with another
    model; its answers still match Run.generate. An IA3 adapter cannot join LoRA ones (one peft type)."""
    from tunesmith.serving import build

    root, alpha, _ = runs
    dora = _train(tiny_model_dir, root / "train.jsonl", tmp_path / "dora", seed=3, name="dora", method="dora")
    app, registry = build([alpha.path, dora.path], log=lambda *_: None, max_tokens=16)
    ia3 = tmp_path / "ia3"
    shutil.copytree(alpha.path, ia3)
    meta = json.loads((ia3 / "model" / "tunesmith.json").read_text())
    (ia3 / "model" / "tunesmith.json").write_text(json.dumps({**meta, "method": "ia3"}))
    with pytest.raises(RunError, match="a ia3 adapter cannot be served next to lora adapters"):
        registry.add_run(ia3, name="ia3")
    srv = Server(app)
    try:
        client = srv.client()
        engine = app.state.engine

        def ask(k):
            model = ("dora", "alpha")[k % 2]
            return model, client.chat.completions.create(
                model=model, messages=PROMPT, max_tokens=6, temperature=0
            ).choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
    finally:
        srv.close()
    expected = {"dora": dora.generate(PROMPT, max_new_tokens=6), "alpha": alpha.generate(PROMPT, max_new_tokens=6)}
    assert expected["dora"] != expected["alpha"]
    assert all(text == expected[model] for model, text in answers)
    assert engine.mixed_batches == 0 and engine.largest_batch > 1


def test_cli_serve_starts_answers_and_stops(tiny_model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TUNESMITH_API_KEY": "k1"}
    (tmp_path / "allowed").mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "serve",
            "--base",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--max-tokens",
            "8",
            "--adapter-root",
            str(tmp_path / "allowed"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0)
        r = client.completions.create(model=tiny_model_dir.name, prompt="hello", max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError, match="more than this server allows"):
            client.completions.create(model=tiny_model_dir.name, prompt="hello", max_tokens=9)
        add = f"http://127.0.0.1:{port}/v1/adapters"
        auth = {"Authorization": "Bearer k1"}
        inside = httpx.post(add, json={"path": str(tmp_path / "allowed" / "run")}, headers=auth)
        outside = httpx.post(add, json={"path": str(tmp_path)}, headers=auth)
        assert inside.status_code == 400 and "not a run directory" in inside.json()["error"]["message"]
        assert outside.status_code == 403 and outside.json()["error"]["code"] == "adapter_path_not_allowed"
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert f"serving {tiny_model_dir.name} at http://127.0.0.1:{port}/v1  (API key required)" in out


def test_an_internal_error_is_a_500_in_openai_format(server, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("boom")

    monkeypatch.setattr(server.app.state.registry, "add_run", broken)
    r = httpx.post(server.url + "/v1/adapters", json={"path": str(server.allowed / "nowhere")})
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "internal server error: TypeError: boom",
        "type": "server_error",
        "param": None,
        "code": None,
    }


# ---- hardening (#21): what a client can learn, strict types, odd bodies, where adapters load from -----------


def _post(server, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, **kw)


def _error(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_models_never_show_a_path_of_the_server(server, runs):
    listed = httpx.get(server.url + "/v1/models")
    one = httpx.get(server.url + "/v1/models/alpha")
    for r in (listed, one):
        assert r.status_code == 200 and "/" not in r.text  # the runs' folders used to be each card's root
    assert all(card["root"] == card["id"] for card in listed.json()["data"])
    assert one.json()["root"] == one.json()["id"] == f"ft:{server.base_id}:alpha"


CHAT = {"model": "alpha", "messages": PROMPT, "max_tokens": 2}


@pytest.mark.parametrize(
    "endpoint, field, value, fragment",
    [
        ("chat", "max_tokens", "8", 'max_tokens: Input should be a valid integer, not a string ("8")'),
        ("chat", "max_tokens", True, "max_tokens: Input should be a valid integer, not a boolean (true)"),
        ("chat", "max_tokens", 8.0, "max_tokens: Input should be a valid integer, not a number (8.0)"),
        ("chat", "max_completion_tokens", False, "not a boolean"),
        ("chat", "n", "2", "n: Input should be a valid integer, not a string"),
        ("chat", "seed", "1", "seed: Input should be a valid integer, not a string"),
        ("chat", "temperature", True, "temperature: Input should be a valid number, not a boolean"),
        ("chat", "top_p", "0.5", "top_p: Input should be a valid number, not a string"),
        ("chat", "stream", "true", "stream: Input should be a valid boolean, not a string"),
        ("chat", "stream", 1, "stream: Input should be a valid boolean, not an integer"),
        ("chat", "stop", 5, "stop: give a string or a list of strings"),
        ("completions", "max_tokens", "8", "max_tokens: Input should be a valid integer, not a string"),
        ("completions", "prompt", [1, 2], "token-id prompts are not supported"),
    ],
)
def test_numbers_and_flags_are_strictly_typed(server, endpoint, field, value, fragment):
    """pydantic's lax mode turned "8" into 8 and true into 1 token; OpenAI refuses both, so do we."""
    body = {**CHAT, field: value} if endpoint == "chat" else {"model": "alpha", "prompt": "hi", field: value}
    error = _error(_post(server, f"/v1/{endpoint.replace('chat', 'chat/completions')}", body), 400)
    assert fragment in error["message"] and error["param"] == field
    assert error["type"] == "invalid_request_error"


def test_null_means_the_default_as_in_openai(server):
    body = {**CHAT, "temperature": None, "top_p": None, "n": None, "stream": None, "seed": None, "max_tokens": 2}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text


def test_a_chunked_body_is_cut_off_at_the_size_limit(server):
    """No content-length to refuse up front: the server must stop reading at the limit and answer 413, not
    wait for (and hold) the whole body. The body here never ends; before, the server waited for its end."""
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head.encode())
        try:
            for _ in range(18):  # 1.18 MB, over the 1 MB limit, and no final chunk
                s.sendall(piece)
        except OSError:  # the server stopped reading and answered: fine, read its answer
            pass
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                got = s.recv(65536)
                if not got:
                    break
                answer += got
        except TimeoutError:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code":"request_too_large"' in answer


def test_stream_options_flag_is_strict_too(server):
    error = _error(_post(server, "/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": 1}}), 400)
    assert error["param"] == "stream_options.include_usage" and "not an integer" in error["message"]


@pytest.mark.parametrize(
    "path, body, param, fragment",
    [
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "ab\u0000c"}]},
            "messages.0.content",
            "contains a NUL character (U+0000) at offset 2; remove it",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\u0000"}]}]},
            "messages.0.content",
            "NUL character",
        ),
        ("/v1/chat/completions", {**CHAT, "stop": ["x\u0000"]}, "stop", "NUL character"),
        ("/v1/completions", {"model": "alpha", "prompt": ["ok", "no\u0000"]}, "prompt", "prompt 1 contains a NUL"),
        ("/v1/adapters", {"path": "/tmp/run\u0000"}, "path", "NUL character"),
    ],
)
def test_nul_characters_are_refused_where_they_are(server, path, body, param, fragment):
    error = _error(_post(server, path, body), 400)
    assert error["param"] == param and fragment in error["message"]


def test_text_content_parts_are_joined_and_other_parts_refused_by_name(server):
    """OpenAI's content-part lists: text parts are joined with a newline (as vLLM does), so the answer is the
    one the joined string gets; an image part is a 400 that names it."""
    client = server.client()
    parts = [{"type": "text", "text": "ticket 7:"}, {"type": "text", "text": "refund invoice please"}]
    as_parts = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0
    )
    as_text = client.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "ticket 7:\nrefund invoice please"}],
        max_tokens=8,
        temperature=0,
    )
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens

    def with_system(content):
        messages = [{"role": "system", "content": content}, *PROMPT]
        return client.chat.completions.create(model="alpha", messages=messages, max_tokens=1).usage.prompt_tokens

    assert with_system([{"type": "text", "text": "Be brief."}]) == with_system("Be brief.")  # any role
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    for content, fragment in [
        ([parts[0], image], "content part 1 has type 'image_url'; this server reads text parts only"),
        (["plain string"], "content part 0 is not a"),
        ([{"type": "text"}], "content part 0 has no `text` string"),
        (7, "give a string or a list of content parts"),
    ]:
        error = _error(
            _post(server, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": content}]}), 400
        )
        assert error["param"] == "messages.0.content" and fragment in error["message"], error


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"a":' * 50_000, b'{"model": "alpha", "messages": ' + b"[" * 70 + b"]" * 70 + b"}"],
    ids=["100k-arrays", "50k-objects", "70-deep-field"],
)
def test_deep_nesting_is_a_quick_400(server, body):
    start = time.monotonic()
    error = _error(_post(server, "/v1/chat/completions", body), 400)
    assert time.monotonic() - start < 2.0
    assert "nests arrays and objects more than 64 deep" in error["message"]


def test_brackets_inside_strings_are_not_nesting(server):
    text = 'quote \\" then ' + "[{" * 100
    r = _post(server, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    from tunesmith.serving.app import json_depth

    assert json_depth(json.dumps({"a": [text, {"b": "]]]}"}]}).encode(), 64) == 3
    assert json_depth(b"[" * 10_000, 64) == 65  # counting stops past the limit


def _copy_run(src, dest, link_model_to=None, link_weights_to=None):
    shutil.copytree(src, dest)
    if link_model_to is not None:
        shutil.rmtree(dest / "model")
        (dest / "model").symlink_to(link_model_to, target_is_directory=True)
    if link_weights_to is not None:
        (dest / "model" / "adapter_model.safetensors").unlink()
        (dest / "model" / "adapter_model.safetensors").symlink_to(link_weights_to)
    return dest


def test_adapters_load_only_from_allowed_folders(server, runs, tmp_path):
    """--adapter-root, --watch and the runs given at start are the allowed folders; symlinks and `..` are
    resolved before the check, for the run folder and for every file of it that would be read."""
    _, alpha, _ = runs
    outside = _copy_run(alpha.path, tmp_path / "outside")
    allowed = server.allowed
    (allowed / "link-out").symlink_to(outside, target_is_directory=True)
    _copy_run(alpha.path, allowed / "model-out", link_model_to=outside / "model")
    _copy_run(alpha.path, allowed / "weights-out", link_weights_to=outside / "model" / "adapter_model.safetensors")
    refused = {
        "outside": str(outside),
        "missing outside": str(tmp_path / "nothing-here"),
        "dot-dot": f"{allowed}/../../{outside.relative_to(allowed.parent.parent)}",
        "symlinked run": str(allowed / "link-out"),
        "symlinked model/": str(allowed / "model-out"),
        "symlinked weights": str(allowed / "weights-out"),
        "relative": "../" * 40 + str(outside).lstrip("/"),
    }
    before = server.app.state.registry.ids()
    for case, path in refused.items():
        error = _error(_post(server, "/v1/adapters", {"path": path, "name": "x"}), 403)
        assert error["code"] == "adapter_path_not_allowed" and error["param"] == "path", case
        assert error["message"].startswith(f"{path}: not inside a folder this server loads adapters from"), case
        assert str(outside) not in error["message"].removeprefix(path), case  # never where a link leads
    assert server.app.state.registry.ids() == before
    roots = server.app.state.adapter_roots
    assert roots.check(str(alpha.path)) == alpha.path.resolve()  # a run given at start may be added again
    assert roots.check(f"{allowed}/x/../inside") == allowed.resolve() / "inside"


def test_without_allowed_folders_no_adapter_loads_at_run_time(tmp_path):
    from tunesmith.serving.app import AdapterRoots, APIError

    with pytest.raises(APIError) as info:
        AdapterRoots([]).check(str(tmp_path))
    assert info.value.status == 403 and "start it with --adapter-root FOLDER" in info.value.message


def test_adapter_root_must_be_a_folder(tmp_path, capsys):
    assert main(["serve", "--base", "whatever", "--port", "0", "--adapter-root", str(tmp_path / "nope")]) == 2
    assert f"--adapter-root {tmp_path / 'nope'}: not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("end", ["max_tokens", "stop_token"])
def test_an_answer_ending_inside_a_character_is_sent_as_decoded(tokenizer, end):
    """Mid-stream, the bytes of an incomplete UTF-8 character are held back until the character is whole; when the
    answer ends there (max_tokens, or the model's end-of-turn token next), nothing more will come, so the final text
    is the decoded text, U+FFFD included, as run.generate returns it (found on tiny random Qwen2: the server dropped
    the last character and answered differently from run.generate)."""
    from tunesmith.serving.engine import Generation, _advance, _Row

    ids = tokenizer.encode("Nice 😀🎉")[:5]  # 'Nice 😀' and the first byte of '🎉'
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert expected.endswith("\ufffd") and not tokenizer.decode(ids[:4]).endswith("\ufffd")
    events = []
    g = Generation("m", [1], max_tokens=5 if end == "max_tokens" else 64, stop_token_ids=[tokenizer.eos_token_id])
    g.emit = events.append
    row = _Row(g, "cpu")
    feed = ids if end == "max_tokens" else [*ids, tokenizer.eos_token_id]
    for token in feed:
        _advance(row, token, tokenizer, threading.Lock(), lambda g, e: events.append(e))
    assert "".join(e.text for e in events if e.kind == "text") == expected
    assert [e.kind for e in events if e.kind != "text"] == ["done"]
    assert events[-1].finish_reason == ("length" if end == "max_tokens" else "stop")
    assert [e.text for e in events if e.kind == "text"][-1] == "\ufffd"  # held back until the end, then sent
