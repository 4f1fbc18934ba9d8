"""A bounded load test of `tunesmith serve` on loopback (issue #21).

16 concurrent clients (threads, one keep-alive httpx connection each) send a few hundred requests that mix
chat and completions, plain and streamed, sampled and greedy, streams their client drops after the first
chunk, and invalid requests of many kinds, against the tiny Llama base and a LoRA run of it. It checks:
- every valid response: status 200, the shape OpenAI's clients parse, usage that adds up, and for greedy
  requests the very text the same request gets alone (so batching under load changes no answer);
- every invalid request: the expected 4xx, with an error body in OpenAI's format;
- the server's memory: RSS after a warm-up round vs at the end (see RSS_GROWTH_LIMIT_MB), and, exactly, that
  no generation object and no extra tensor outlives its request;
- afterwards: /health ok, no generation left pending, the dropped streams cancelled.
It prints its counts (`pytest -s`). The server runs in this process (uvicorn in a thread, as in
test_serve.py), so the RSS measured is this process's, clients included.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import time
import warnings
from collections import Counter
from pathlib import Path

import httpx
import pytest

from test_serve import PROMPT, Server, _train
from test_train import write_chat_data

torch = pytest.importorskip("torch")

KEY = "load-test-key"
CLIENTS = 16
WARMUP_ROUNDS = 4  # requests per client before the first RSS reading
ROUNDS = 20  # requests per client in all: 320 requests
MAX_TOKENS = 6
SERVER_MAX_TOKENS = 16
RSS_GROWTH_LIMIT_MB = 40
"""Growth of RSS allowed between the end of the warm-up (64 requests) and the end (256 more). Measured on 2
shared cores: +10 to +13 MiB over three runs (534 -> 546, 538 -> 548, 568 -> 581). That is the allocator
warming up, not a leak: after a first round of 320 such requests, six more grew it by +10, +6, +3, 0, +1,
+1 MiB. 40 MiB is ~3x the measured growth; keeping 256 KiB per generating request (~180 of the 256; one
fp32 row of logits over this 49,152-token vocabulary is 192 KiB) would cross it. Smaller leaks of Python
objects are caught exactly by the counts of live objects."""

# what each request of a client is, by (client + round) % len(MIX): 30% invalid
MIX = (
    "chat",
    "chat-stream",
    "invalid",
    "completion",
    "disconnect",
    "chat-sampled",
    "invalid",
    "completion-stream",
    "chat",
    "invalid",
)
PROMPTS = [f"ticket {i}: {words}" for i, words in enumerate(["refund please", "app crashes", "parcel late", "hi"])]
TOO_BIG = b'{"model": "x", "pad": "' + b" " * 1_100_000 + b'"}'


def _invalid_requests(base_id: str, outside: Path) -> list[tuple[str, str, str, object, dict | None, int]]:
    """(name, method, path, body, headers (None: the client's own, with the key), expected status)."""
    chat = {"model": base_id, "messages": PROMPT, "max_tokens": 2}
    wrong_key = {"Authorization": "Bearer wrong", "content-type": "application/json"}
    return [
        ("max_tokens string", "POST", "/v1/chat/completions", {**chat, "max_tokens": "8"}, None, 400),
        ("max_tokens boolean", "POST", "/v1/chat/completions", {**chat, "max_tokens": True}, None, 400),
        ("unknown model", "POST", "/v1/chat/completions", {**chat, "model": "nope"}, None, 404),
        ("wrong key", "POST", "/v1/chat/completions", chat, wrong_key, 401),
        ("no key", "GET", "/v1/models", None, {}, 401),
        ("not json", "POST", "/v1/chat/completions", b"{not json", None, 400),
        ("deep nesting", "POST", "/v1/chat/completions", b"[" * 100_000, None, 400),
        ("NUL", "POST", "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "a\0"}]}, None, 400),
        (
            "image part",
            "POST",
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            None,
            400,
        ),
        ("max_tokens over limit", "POST", "/v1/chat/completions", {**chat, "max_tokens": 17}, None, 400),
        ("no messages", "POST", "/v1/chat/completions", {**chat, "messages": []}, None, 400),
        ("logprobs", "POST", "/v1/chat/completions", {**chat, "logprobs": True}, None, 400),
        (
            "too long",
            "POST",
            "/v1/chat/completions",
            {**chat, "messages": [{"role": "user", "content": "word " * 600}]},
            None,
            400,
        ),
        ("body too large", "POST", "/v1/chat/completions", TOO_BIG, None, 413),
        ("adapter outside", "POST", "/v1/adapters", {"path": str(outside)}, None, 403),
        ("no such route", "GET", "/v1/nothing", None, None, 404),
        ("empty prompt list", "POST", "/v1/completions", {"model": base_id, "prompt": []}, None, 400),
        ("n zero", "POST", "/v1/completions", {"model": base_id, "prompt": "x", "n": 0}, None, 400),
    ]


def _live(kind) -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some of torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sum(isinstance(o, kind) for o in gc.get_objects())


def _rss_mb() -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _sse(lines) -> list:
    """The `data:` payloads of a server-sent event stream: parsed chunks, then the final "[DONE]"."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


class Load:
    """Sends one client's requests and checks each answer; failures are kept, not raised, to count them."""

    def __init__(self, url: str, models: list[str], references: dict, invalid: list):
        self.url, self.models, self.references, self.invalid = url, models, references, invalid
        self.counts: Counter = Counter()
        self.failures: list[str] = []

    def run_client(self, client: int, rounds: range) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            for r in rounds:
                k = client * ROUNDS + r
                kind = MIX[(client + r) % len(MIX)]
                try:
                    problem = self.one(http, kind, k)
                except Exception as e:  # a transport error is a failed request too
                    problem = f"{type(e).__name__}: {e}"
                if problem:
                    self.failures.append(f"request {k} ({kind}): {problem}")
                    self.counts["failed"] += 1
                else:
                    self.counts[kind] += 1

    def one(self, http: httpx.Client, kind: str, k: int) -> str | None:
        model = self.models[k % len(self.models)]
        prompt = PROMPTS[k % len(PROMPTS)]
        messages = [{"role": "user", "content": prompt}]
        if kind == "invalid":
            name, method, path, body, headers, status = self.invalid[k % len(self.invalid)]
            self.counts[f"invalid:{status}"] += 1
            content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            if body is TOO_BIG:  # its own connection: the server answers before reading the body, then closes
                headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
                r = httpx.request(method, self.url + path, content=content, headers=headers, timeout=60)
            elif headers is not None:
                r = httpx.request(method, self.url + path, content=content, headers=headers, timeout=60)
            else:
                r = http.request(method, path, content=content, headers={"content-type": "application/json"})
            error = r.json().get("error") if r.headers.get("content-type") == "application/json" else None
            if r.status_code != status or not isinstance(error, dict):
                return f"{name}: {r.status_code} {r.text[:200]}"
            if set(error) != {"message", "type", "param", "code"} or not error["message"]:
                return f"{name}: not OpenAI's error format: {error}"
            return None
        if kind == "disconnect":
            body = {"model": model, "messages": messages, "max_tokens": SERVER_MAX_TOKENS, "stream": True}
            body["stop"] = ["never-generated"]
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                first = next(r.iter_lines())  # then leave: the context closes the connection mid-stream
            return None if r.status_code == 200 and first.startswith("data: ") else f"{r.status_code} {first}"
        chat = kind.startswith("chat")
        body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0}
        body.update({"messages": messages} if chat else {"prompt": prompt})
        if kind == "chat-sampled":
            body.update(temperature=0.9, top_p=0.95, seed=k)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        expected = None if kind == "chat-sampled" else self.references[(model, prompt, chat)]
        if kind.endswith("stream"):
            body.update(stream=True, stream_options={"include_usage": True})
            with http.stream("POST", path, json=body) as r:
                events = _sse(r.iter_lines()) if r.status_code == 200 else [r.read().decode()]
            return _check_stream(r.status_code, events, model, chat, expected)
        r = http.post(path, json=body)
        return _check_answer(r, model, chat, expected)


def _check_usage(usage: dict, choices: int = 1) -> str | None:
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return f"usage does not add up: {usage}"
    if not 1 <= usage["completion_tokens"] <= MAX_TOKENS * choices or usage["prompt_tokens"] < 1:
        return f"usage out of range: {usage}"
    return None


def _check_answer(r: httpx.Response, model: str, chat: bool, expected: str | None) -> str | None:
    if r.status_code != 200:
        return f"{r.status_code} {r.text[:200]}"
    body = r.json()
    choice = body["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    if body["object"] != ("chat.completion" if chat else "text_completion") or body["model"] != model:
        return f"wrong object or model: {body['object']} {body['model']}"
    if not isinstance(text, str) or choice["finish_reason"] not in ("stop", "length"):
        return f"bad choice: {choice}"
    if expected is not None and text != expected:
        return f"text {text!r} differs from the answer alone {expected!r}"
    return _check_usage(body["usage"])


def _check_stream(status: int, events: list, model: str, chat: bool, expected: str | None) -> str | None:
    if status != 200:
        return f"{status} {events}"
    if not events or events[-1] != "[DONE]":
        return "the stream did not end with [DONE]"
    chunks = events[:-1]
    if len({c["id"] for c in chunks}) != 1 or any(c["model"] != model for c in chunks):
        return "chunks of one stream disagree on id or model"
    with_choices = [c for c in chunks if c["choices"]]
    if chat:
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    else:
        text = "".join(c["choices"][0]["text"] for c in with_choices)
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices if c["choices"][0]["finish_reason"]]
    if len(finishes) != 1 or finishes[0] not in ("stop", "length"):
        return f"finish reasons {finishes}"
    if expected is not None and text != expected:
        return f"streamed text {text!r} differs from the answer alone {expected!r}"
    if chunks[-1]["choices"] or "usage" not in chunks[-1]:
        return "no usage chunk at the end"
    return _check_usage(chunks[-1]["usage"])


def test_sixteen_clients_mixed_load(tiny_model_dir, tmp_path):
    from tunesmith.serving import build
    from tunesmith.serving.engine import Generation

    data = write_chat_data(tmp_path / "train.jsonl", 12)
    run = _train(tiny_model_dir, data, tmp_path / "runs" / "alpha", seed=1, name="alpha")
    outside = tmp_path / "outside"
    outside.mkdir()
    app, registry = build(
        [run.path], base=str(tiny_model_dir), api_key=KEY, log=lambda *_: None, max_tokens=SERVER_MAX_TOKENS
    )
    srv = Server(app)
    engine = app.state.engine
    try:
        models = [registry.base_id, f"ft:{registry.base_id}:alpha"]
        auth = {"Authorization": f"Bearer {KEY}"}
        references = {}  # each greedy request's answer when it runs alone
        for model in models:
            for prompt in PROMPTS:
                for chat in (True, False):
                    body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0}
                    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
                    r = httpx.post(
                        srv.url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body, headers=auth
                    )
                    choice = r.json()["choices"][0]
                    references[(model, prompt, chat)] = choice["message"]["content"] if chat else choice["text"]
        load = Load(srv.url, models, references, _invalid_requests(registry.base_id, outside))

        def phase(rounds: range) -> None:
            with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
                list(pool.map(lambda c: load.run_client(c, rounds), range(CLIENTS)))

        start = time.monotonic()
        phase(range(WARMUP_ROUNDS))
        tensors = _live(torch.Tensor)  # first: walking every object costs memory the RSS readings should include
        generations_before = _live(Generation)  # other tests of this process may have left some
        rss = [_rss_mb()]
        half = (WARMUP_ROUNDS + ROUNDS) // 2
        phase(range(WARMUP_ROUNDS, half))
        rss.append(_rss_mb())
        phase(range(half, ROUNDS))
        rss.append(_rss_mb())
        seconds = time.monotonic() - start
        deadline = time.monotonic() + 10  # the engine notices dropped streams at its next step
        while engine.pending and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(srv.url + "/health", headers=auth)
        # a dropped stream's response object lets go of its generation when the server finishes with the
        # connection, a moment after the engine has: a leak is what stays alive, not what is still being released
        deadline = time.monotonic() + 5
        while _live(Generation) > generations_before and time.monotonic() < deadline:
            time.sleep(0.1)
        generations, tensors_after = _live(Generation), _live(torch.Tensor)
    finally:
        srv.close()

    counts = load.counts
    total = CLIENTS * ROUNDS
    invalid = {k.removeprefix("invalid:"): v for k, v in sorted(counts.items()) if k.startswith("invalid:")}
    valid = sum(counts[k] for k in set(MIX) - {"invalid", "disconnect"})
    print(
        f"\nload: {total} requests from {CLIENTS} clients in {seconds:.1f} s ({total / seconds:.1f}/s); "
        f"{valid} valid answers checked, {counts['failed']} failed; {counts['disconnect']} streams dropped "
        f"mid-way ({engine.cancelled} generations cancelled); {counts['invalid']} invalid requests answered "
        f"4xx in OpenAI's format (by status {invalid}); batches {engine.batches_run}, largest {engine.largest_batch}; "
        f"RSS {rss[0]:.0f} MiB after warm-up, {rss[1]:.0f} at half, {rss[2]:.0f} at the end; "
        f"live tensors {tensors} -> {tensors_after}, live generations {generations_before} -> {generations}"
    )
    assert not load.failures, "\n".join(load.failures[:20])
    expected = Counter(MIX[(c + r) % len(MIX)] for c in range(CLIENTS) for r in range(ROUNDS))
    assert {k: counts[k] for k in expected} == dict(expected) and counts["failed"] == 0
    assert counts["invalid"] == expected["invalid"] and set(invalid) == {"400", "401", "403", "404", "413"}
    assert rss[2] - rss[0] < RSS_GROWTH_LIMIT_MB, rss
    assert generations <= generations_before and tensors_after <= tensors, (
        generations_before,
        generations,
        tensors,
        tensors_after,
    )
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["pending"] == 0
    assert engine.pending == 0 and engine.largest_batch > 1 and engine.cancelled > 0
