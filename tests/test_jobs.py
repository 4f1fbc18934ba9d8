"""Fine-tuning as a service: the official openai client against a real `tunesmith serve --jobs-dir` process.

One server process (tiny base model) serves the module; the restart test kills it with SIGKILL and starts it again
on the same port and folders. Jobs run a handful of steps each, so the module takes about two minutes on two cores.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from conftest import build_tiny_model  # noqa: E402
from test_train import write_chat_data  # noqa: E402
from tunesmith.cli import main  # noqa: E402
from tunesmith.errors import ConfigError  # noqa: E402
from tunesmith.jobs import store as st  # noqa: E402
from tunesmith.jobs.tenants import load_keys_file  # noqa: E402

ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"
FINAL = ("succeeded", "failed", "cancelled")
# every job of the module: tiny sequences, padded batches, a quick evaluation (no few-shot or prompt search), and a
# checkpoint every 5 steps so a long job has one to resume from soon
JOB_SET = [
    "train.batching=pad",
    "data.max_length=64",
    "lora.r=4",
    "train.save_every=5",
    "eval.shots=0",
    "eval.knn_shots=0",
    "eval.select=false",
]


class ServerProcess:
    """`tunesmith serve --jobs-dir` in a subprocess; kill() and start() again on the same port and folders."""

    def __init__(self, base: Path, root: Path, keys: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base, self.root, self.keys = base, root, keys
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.logs = []

    def start(self) -> None:
        log = open(self.root / f"server-{len(self.logs)}.log", "w")
        self.logs.append(Path(log.name))
        cmd = [sys.executable, "-m", "tunesmith", "serve", "--base", str(self.base), "--port", str(self.port)]
        cmd += ["--jobs-dir", str(self.root / "jobs"), "--keys-file", str(self.keys)]
        for item in JOB_SET:
            cmd += ["--job-set", item]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300  # ~6 s on an idle machine; generous for a loaded one
        while True:
            assert self.proc.poll() is None, self.logs[-1].read_text()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)

    def stop(self, sig=signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)

    def client(self, key=ALICE) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def get(self, path, key=ALICE, **kw):
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    write_chat_data(root / "train.jsonl", 12)
    write_chat_data(root / "val.jsonl", 6, seed=1)
    lines = (root / "train.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-5]  # cut short: not JSON
    lines[3] = json.dumps({"messages": [{"role": "bot", "content": "hi"}]})
    (root / "bad.jsonl").write_text("\n".join(lines[:5]) + "\n")
    (root / "keys.yaml").write_text(
        f"defaults:\n  max_queued_jobs: 3\nkeys:\n  - key: {ALICE}\n    tenant: alice\n"
        f"  - key: {BOB}\n    tenant: bob\n    max_file_bytes: 4000\n    max_queued_jobs: 1\n"
    )
    return root


@pytest.fixture(scope="module")
def server(root):
    # a tiny model of our own, so that its id (the folder's name) is "tiny"
    srv = ServerProcess(build_tiny_model(root / "tiny"), root, root / "keys.yaml")
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def upload(client, path: Path):
    with open(path, "rb") as fh:
        f = client.files.create(file=fh, purpose="fine-tune")
    return client.files.wait_for_processing(f.id, poll_interval=0.1, max_wait_seconds=60)


def wait(client, job_id, until=FINAL, timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        assert time.monotonic() < deadline, f"{job_id} still {job.status}"
        time.sleep(0.2)


def all_events(client, job_id) -> list:
    """Every event of a job, oldest first, read through the pagination (`after`, `has_more`)."""
    out = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=7):  # the SDK pages on has_more
        out.append(event)
    return out[::-1]


def long_job(client, file_id, epochs=40, **kw):
    # 12 examples, batch 4: 3 steps an epoch; 40 epochs are long enough to be caught running
    return client.fine_tuning.jobs.create(
        model=kw.pop("model", "tiny"),
        training_file=file_id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs, "batch_size": 4}}},
        **kw,
    )


@pytest.fixture(scope="module")
def finished(server, root):
    """A job of alice's with a validation file, trained to the end."""
    client = server.client()
    train, val = upload(client, root / "train.jsonl"), upload(client, root / "val.jsonl")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train.id,
        validation_file=val.id,
        suffix="demo",
        seed=7,
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 250},
        metadata={"team": "support"},
    )
    return train, val, wait(client, job.id)


def test_upload_train_watch_and_chat_with_the_openai_client(server, root, finished):
    import tunesmith

    client = server.client()
    train, val, job = finished
    assert train.status == "processed" and train.filename == "train.jsonl" and train.bytes > 0
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:demo:{job.id}"
    assert job.metadata == {"team": "support"} and job.seed == 7 and job.trained_tokens > 0
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4

    events = all_events(client, job.id)
    messages = [e.message for e in events]
    train_steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # 12 examples / batch 4 x 2 epochs, each step once
    assert all(e.data["total_steps"] == 6 for e in events if e.type == "metrics")
    valid = [e.data for e in events if e.type == "metrics" and "valid_loss" in e.data]
    assert valid and all(0 <= v["valid_mean_token_accuracy"] <= 1 and v["valid_loss"] > 0 for v in valid)
    # learning_rate_multiplier 250 x the auto rate for LoRA (2e-4): the peak rate the run logged
    lrs = [e.data["learning_rate"] for e in events if e.type == "metrics" and "learning_rate" in e.data]
    assert max(lrs) == pytest.approx(0.05)
    assert any(m.startswith("learning rate 0.05 (auto 0.0002 x learning_rate_multiplier 250)") for m in messages)
    assert messages[0] == f"Created fine-tuning job: {job.id}"
    assert messages[-1] == f"The job has successfully completed: {job.fine_tuned_model}"
    verdict = [m for m in messages if m.startswith("eval verdict: the fine-tuned model ")]
    assert len(verdict) == 1 and "accuracy" in verdict[0], messages

    # the eval result file is the run's eval/task.json: fine-tuned vs the prompted base on the validation file
    (result,) = job.result_files
    task = json.loads(client.files.content(result).read())
    assert {s["key"] for s in task["systems"]} >= {"base_zero_shot", "fine_tuned"}
    assert task["data"]["examples"] == 6 and task["data"]["path"] == "val.jsonl"  # never the server's path

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 5]  # newest first; save_every 5 and the end
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-6"
    step6 = [e.data for e in events if e.type == "metrics" and e.data["step"] == 6 and "train_loss" in e.data]
    assert checkpoints[0].metrics.train_loss == step6[0]["train_loss"]
    assert checkpoints[0].metrics.valid_loss == pytest.approx(valid[-1]["full_valid_loss"])

    # the fine-tuned model is served by the same server: the same greedy answer as the run itself gives
    ask = [{"role": "user", "content": "ticket 3: refund invoice please"}]
    answer = client.chat.completions.create(model=job.fine_tuned_model, messages=ask, max_tokens=8, temperature=0)
    assert answer.model == job.fine_tuned_model
    run = tunesmith.load(root / "jobs" / "jobs" / job.id / "run")
    assert answer.choices[0].message.content == run.generate(ask, max_new_tokens=8, temperature=0)
    base = client.chat.completions.create(model="tiny", messages=ask, max_tokens=8, temperature=0)
    assert base.choices[0].message.content != answer.choices[0].message.content  # lr 0.05 moved the model
    assert job.fine_tuned_model in [m.id for m in client.models.list().data]

    page = server.get(f"/v1/fine_tuning/jobs/{job.id}/report")
    assert page.status_code == 200 and "<html" in page.text.lower()
    listed = client.fine_tuning.jobs.list(limit=100).data
    assert job.id in [j.id for j in listed]


def test_tenants_see_only_their_own_files_jobs_and_models(server, finished):
    alice, bob = server.client(ALICE), server.client(BOB)
    train, _, job = finished
    assert job.id not in [j.id for j in bob.fine_tuning.jobs.list().data]
    assert train.id not in [f.id for f in bob.files.list().data]
    for call in (
        lambda: bob.files.retrieve(train.id),
        lambda: bob.files.content(train.id),
        lambda: bob.files.delete(train.id),
        lambda: bob.fine_tuning.jobs.retrieve(job.id),
        lambda: bob.fine_tuning.jobs.cancel(job.id),
        lambda: bob.fine_tuning.jobs.list_events(job.id),
        lambda: bob.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: bob.models.retrieve(job.fine_tuned_model),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        bob.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    assert job.fine_tuned_model not in [m.id for m in bob.models.list().data]
    assert "tiny" in [m.id for m in bob.models.list().data]  # the base model is shared
    with pytest.raises(openai.BadRequestError, match="no such file among this API key's uploads") as e:
        bob.fine_tuning.jobs.create(model="tiny", training_file=train.id)
    assert e.value.body["code"] == "file_not_found" and e.value.body["param"] == "training_file"
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-nobody-000000").files.list()
    assert server.get("/v1/files", key="wrong").json()["error"]["code"] == "invalid_api_key"
    assert alice.files.retrieve(train.id).id == train.id


def test_bad_input_gives_openai_errors_and_failed_jobs(server, root):
    client = server.client()
    bad = upload(client, root / "bad.jsonl")
    assert bad.status == "error"
    assert "bad.jsonl:2:" in bad.status_details and "bad.jsonl:4:" in bad.status_details
    assert str(root) not in bad.status_details  # never the server's path
    job = wait(client, client.fine_tuning.jobs.create(model="tiny", training_file=bad.id).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert job.error.param == "training_file" and "bad.jsonl:2:" in job.error.message
    assert job.fine_tuned_model is None

    good = upload(client, root / "train.jsonl")
    cases = [
        (dict(model="gpt-4o-mini", training_file=good.id), "model", "model_not_available"),
        (dict(model="tiny", training_file="file-doesnotexist"), "training_file", "file_not_found"),
        (dict(model="tiny", training_file=good.id, validation_file="file-nope"), "validation_file", "file_not_found"),
        (dict(model="tiny", training_file=good.id, method={"type": "reinforcement"}), "method.type", None),
        (dict(model="tiny", training_file=good.id, hyperparameters={"n_epochs": 0}), None, None),
        (dict(model="tiny", training_file=good.id, hyperparameters={"warmup": 3}), None, None),
        (dict(model="tiny", training_file=good.id, suffix="no spaces"), "suffix", None),
        (dict(model="tiny", training_file=good.id, method={"type": "dpo", "dpo": []}), "method.dpo", None),
    ]
    for kwargs, param, code in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(**kwargs)
        body = e.value.body
        assert body["type"] == "invalid_request_error" and body["message"]
        if param:
            assert body["param"] == param, body
        if code:
            assert body["code"] == code, body
    with pytest.raises(openai.BadRequestError, match="purpose 'assistants' is not supported") as e:
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="assistants")
    assert e.value.body["param"] == "purpose"
    with pytest.raises(openai.BadRequestError, match="unsupported file type .exe"):
        client.files.create(file=("a.exe", b"MZ"), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError, match="more than this API key may upload") as e:
        server.client(BOB).files.create(file=("big.jsonl", b"x" * 5000), purpose="fine-tune")
    assert e.value.status_code == 413 and e.value.body["code"] == "file_too_large"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    gone = upload(client, root / "val.jsonl")
    assert client.files.delete(gone.id).deleted
    assert gone.id not in [f.id for f in client.files.list().data]
    with pytest.raises(openai.NotFoundError, match=f"No such File object: {gone.id}"):
        client.files.retrieve(gone.id)
    with pytest.raises(openai.BadRequestError, match="already failed"):
        client.fine_tuning.jobs.cancel(job.id)
    r = httpx.post(server.url + "/v1/fine_tuning/jobs", content=b"{", headers={"Authorization": f"Bearer {ALICE}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_job_whose_training_fails_is_failed_with_the_message_and_the_next_job_runs(server, root):
    client = server.client()
    chat = upload(client, root / "train.jsonl")
    # DPO on chat data (no preference pairs): tunesmith's own error, and the worker goes on
    broken = client.fine_tuning.jobs.create(model="tiny", training_file=chat.id, method={"type": "dpo"})
    pairs = root / "pairs.jsonl"
    with open(pairs, "w") as fh:
        for i in range(8):
            fh.write(
                json.dumps(
                    {
                        "input": {"messages": [{"role": "user", "content": f"ticket {i}: refund please"}]},
                        "preferred_output": [{"role": "assistant", "content": "billing"}],
                        "non_preferred_output": [{"role": "assistant", "content": "no idea"}],
                    }
                )
                + "\n"
            )
    dpo = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=upload(client, pairs).id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 1, "batch_size": 4}}},
    )
    broken = wait(client, broken.id)
    assert broken.status == "failed" and broken.error.code == "training_failed"
    assert "preference" in broken.error.message and "Traceback" not in broken.error.message
    dpo = wait(client, dpo.id)
    assert dpo.status == "succeeded", dpo.error
    assert dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.25
    config = (server.root / "jobs" / "jobs" / dpo.id / "run" / "config.yaml").read_text()
    assert "objective: dpo" in config and "beta: 0.25" in config


def test_cancel_stops_at_a_step_with_a_checkpoint_and_queue_limits(server, root):
    alice, bob = server.client(ALICE), server.client(BOB)
    running = long_job(alice, upload(alice, root / "train.jsonl").id)
    wait(alice, running.id, until=("running",))
    # the single worker is busy: bob's job stays queued, and his limit is one queued job
    small = upload(bob, root / "val.jsonl")
    queued = bob.fine_tuning.jobs.create(model="tiny", training_file=small.id)
    wait(bob, queued.id, until=("queued",))
    with pytest.raises(openai.RateLimitError, match="1 jobs validating or queued") as e:
        bob.fine_tuning.jobs.create(model="tiny", training_file=small.id)
    assert e.value.body["code"] == "too_many_queued_jobs"
    assert bob.fine_tuning.jobs.cancel(queued.id).status == "cancelled"  # never started

    while not [e for e in alice.fine_tuning.jobs.list_events(running.id, limit=50).data if e.type == "metrics"]:
        time.sleep(0.1)
    assert alice.fine_tuning.jobs.cancel(running.id).status == "running"  # stops at the next step boundary
    job = wait(alice, running.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    last = [e for e in all_events(alice, job.id) if e.type == "metrics"][-1].data["step"]
    assert last < 120
    assert f"Job cancelled at step {last}; checkpoint saved" in [e.message for e in all_events(alice, job.id)]
    assert alice.fine_tuning.jobs.checkpoints.list(job.id).data[0].step_number == last
    assert (server.root / "jobs" / "jobs" / job.id / "run" / "checkpoints" / f"step-{last}").is_dir()


def _runner_pids(job_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tunesmith.jobs.runner" in cmd and any(job_id.encode() in part for part in cmd):
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the job process dies with the server on Linux")
def test_sigkill_or_ctrl_c_of_the_server_mid_job_loses_nothing_and_the_job_resumes(server, root, finished):
    client = server.client()
    # 40 epochs (120 steps): an idle machine must not finish the job between its first checkpoint and the kill
    job = long_job(client, upload(client, root / "train.jsonl").id, epochs=40, suffix="resumed")
    total = 40 * 3
    while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
        assert client.fine_tuning.jobs.retrieve(job.id).status in st.ACTIVE
        time.sleep(0.1)
    files_before = [f.model_dump() for f in client.files.list().data]
    events_before = {e.id: e.message for e in all_events(client, job.id)}
    assert _runner_pids(job.id)

    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while _runner_pids(job.id):  # the training process died with the server
        assert time.monotonic() < deadline, "the job's process outlived the killed server"
        time.sleep(0.1)
    logged = [
        json.loads(line)["step"] for line in (server.root / "jobs" / "jobs" / job.id / "run" / "metrics.jsonl").open()
    ]
    assert 5 <= max(logged) < total  # killed mid-job, after its first checkpoint
    db = sqlite3.connect(server.root / "jobs" / "jobs.db")
    assert db.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone()[0] == "running"
    db.close()

    server.start()
    # once the resumed run has logged a new step, stop the server gracefully (Ctrl-C): the job pauses at a step
    # boundary with a checkpoint, stays `running`, and the next start resumes it again
    metrics = server.root / "jobs" / "jobs" / job.id / "run" / "metrics.jsonl"
    while max(json.loads(line)["step"] for line in metrics.open()) <= max(logged):
        assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
        time.sleep(0.1)
    assert server.stop(signal.SIGINT) == 0
    store = st.Store(server.root / "jobs" / "jobs.db")  # read while the server is down
    assert store.job_row(job.id)["status"] == "running"
    paused = [e["message"] for e in store.list_events(job.id, None, 1000).data if "paused" in e["message"]]
    store.close()
    assert len(paused) == 1 and paused[0].startswith("Job paused at step ") and "the server is stopping" in paused[0]
    step = int(paused[0].split()[4].rstrip(":"))
    assert (server.root / "jobs" / "jobs" / job.id / "run" / "checkpoints" / f"step-{step}").is_dir()  # saved there
    server.start()
    done = wait(client, job.id)
    assert done.status == "succeeded", done.error
    assert [f.model_dump() for f in client.files.list().data][-len(files_before) :] == files_before
    events = all_events(client, job.id)
    after = {e.id: e.message for e in events}
    assert events_before.items() <= after.items()  # every event from before the kill, unchanged
    messages = [e.message for e in events]
    assert "Resuming the job after a server restart (attempt 2)" in messages
    assert "Resuming the job after a server restart (attempt 3)" in messages
    assert any(m.startswith("resuming from ") and "/step-" in m for m in messages), messages
    steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert steps == list(range(1, total + 1))  # each step once, none lost, none twice
    answer = client.chat.completions.create(
        model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.model == f"ft:tiny:resumed:{job.id}"
    # a model finished before the kill is served again by the restarted server, to its tenant only
    model = finished[2].fine_tuned_model
    assert model in [m.id for m in client.models.list().data]
    assert model not in [m.id for m in server.client(BOB).models.list().data]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job's process in /proc")
def test_a_crashed_training_process_fails_its_job_and_the_server_goes_on(server, root):
    client = server.client()
    job = long_job(client, upload(client, root / "val.jsonl").id)
    while not _runner_pids(job.id) or client.fine_tuning.jobs.retrieve(job.id).status != "running":
        time.sleep(0.1)
    for pid in _runner_pids(job.id):
        os.kill(pid, signal.SIGKILL)
    job = wait(client, job.id)
    assert job.status == "failed" and job.error.code == "training_failed"
    assert job.error.message.startswith("the training process was killed by SIGKILL at step ")
    assert server.get("/health").json()["status"] == "ok"


def test_cli_jobs_is_a_thin_client(server, root, capsys, monkeypatch):
    monkeypatch.setenv("TUNESMITH_URL", server.url)
    monkeypatch.setenv("TUNESMITH_API_KEY", ALICE)
    args = ["jobs", "create", "--model", "tiny", "--training-file", str(root / "val.jsonl"), "--suffix", "cli"]
    assert main([*args, "--n-epochs", "1", "--batch-size", "3", "--follow"]) == 0
    out = capsys.readouterr().out
    assert "uploaded " in out and ": processed" in out
    job_id = out.split("\n")[1].split()[0]
    assert job_id.startswith("ftjob-") and f"{job_id}: succeeded" in out
    assert "Step 2/2: training loss=" in out
    assert main(["jobs", "list"]) == 0
    assert f"{job_id}  succeeded        tiny  ft:tiny:cli:{job_id}" in capsys.readouterr().out
    assert main(["jobs", "show", job_id]) == 0
    shown = capsys.readouterr().out
    assert "n_epochs 1, batch_size 3" in shown and f"ft:tiny:cli:{job_id}" in shown
    assert main(["jobs", "events", job_id]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"successfully completed: ft:tiny:cli:{job_id}")
    # user errors: one line, exit code 2
    assert main(["jobs", "cancel", job_id]) == 2
    assert "already succeeded (HTTP 400)" in capsys.readouterr().err
    assert main(["jobs", "--api-key", "wrong-key", "list"]) == 2
    assert "Incorrect or missing API key" in capsys.readouterr().err
    assert main(["jobs", "--url", "http://127.0.0.1:9", "list"]) == 2
    assert "cannot reach the server at http://127.0.0.1:9" in capsys.readouterr().err
    assert main(["jobs", "create", "--model", "tiny", "--training-file", "file-x", "--n-epochs", "many"]) == 2


# ---- units: the store and the keys file -----------------------------------------------------------------------------


def test_store_migrates_an_old_database_and_pages_like_openai(tmp_path):
    path = tmp_path / "jobs.db"
    db = sqlite3.connect(path)
    st.m001_initial(db)  # a database written by the first version of the schema
    db.execute("PRAGMA user_version=1")
    db.execute(
        "INSERT INTO jobs (id, tenant, created_at, model, training_file, status, method, seed) "
        "VALUES ('ftjob-old', 't', 1, 'tiny', 'file-a', 'queued', '{\"type\": \"supervised\"}', 1)"
    )
    db.commit()
    db.close()
    store = st.Store(path)
    assert store.version == len(st.MIGRATIONS) == 2
    assert store.job_row("ftjob-old")["attempts"] == 0  # m002's column, with its default
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ids = [store.add_job("t", model="tiny", training_file="file-a", method={"type": "supervised"}, seed=1)["id"]]
    ids += [store.add_job("t", model="tiny", training_file="file-a", method={"type": "supervised"}, seed=1)["id"]]
    first = store.list_jobs("t", None, 2)
    assert [j["id"] for j in first.data] == ids[::-1] and first.has_more
    second = store.list_jobs("t", first.data[-1]["id"], 2)
    assert [j["id"] for j in second.data] == ["ftjob-old"] and not second.has_more
    assert store.list_jobs("other", None, 10).data == []
    assert store.add_event(ids[0], "info", "step 1", "metrics", {"step": 1}, dedupe="train:1")
    assert not store.add_event(ids[0], "info", "step 1 again", "metrics", {"step": 1}, dedupe="train:1")
    assert store.metric_events(ids[0]) == [{"step": 1}]
    store.close()
    newer = sqlite3.connect(path)
    newer.execute("PRAGMA user_version=99")
    newer.commit()
    newer.close()
    with pytest.raises(ConfigError, match="schema version 99 is newer than this tunesmith knows"):
        st.Store(path)


def test_keys_file_problems_are_all_named(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - key: short\n    tenant: a b\n  - key: sk-0123456789\n    tenant: x\n    limit: 3\n")
    with pytest.raises(ConfigError) as e:
        load_keys_file(path)
    text = str(e.value)
    assert "keys.0.key: String should have at least 8 characters" in text
    assert "keys.0.tenant: String should match pattern" in text and "keys.1.limit: Extra inputs" in text
    path.write_text("keys:\n  - {key: sk-0123456789, tenant: a}\n  - {key: sk-0123456789, tenant: b}\n")
    with pytest.raises(ConfigError, match="a key is listed twice"):
        load_keys_file(path)
    path.write_text("defaults: {max_file_bytes: 10}\nkeys:\n  - {key: sk-0123456789, tenant: a, max_queued_jobs: 2}\n")
    (tenant,) = load_keys_file(path).values()
    assert (tenant.name, tenant.max_file_bytes, tenant.max_queued_jobs) == ("a", 10, 2)
    assert main(["serve", "--keys-file", str(tmp_path / "missing.yaml")]) == 2


# ---- the dashboard, in headless Chromium driven over the DevTools protocol ------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    from test_report import find_chromium

    path = find_chromium()
    if path is None:
        reason = "no chromium binary on PATH (Debian's `chromium` package; `make browser` installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)
    return path


class DevTools:
    """Chromium with --remote-debugging-pipe: DevTools protocol messages (JSON, NUL-terminated) on fds 3 and 4,
    so no driver and no websocket library is needed."""

    def __init__(self, binary: str, profile: Path):
        import fcntl
        import threading

        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # move the child's ends above 10 so that dup2 onto 3 and 4 cannot overwrite one with the other
        low_r, low_w = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def fds():
            os.dup2(low_r, 3)
            os.dup2(low_w, 4)

        flags = ["--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions"]
        flags += ["--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        flags += ["--window-size=1400,1400", "--hide-scrollbars", "about:blank"]
        self.proc = subprocess.Popen(
            [binary, *flags], pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.close(low_r)
        os.close(low_w)
        self._next, self._replies, self.events = 0, {}, []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Runtime.enable", session=True)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=1400,
            height=1400,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _read(self):
        buffer = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._replies[message["id"]] = message
                    else:
                        self.events.append(message)
                    self._cond.notify_all()

    def send(self, method: str, session: bool = False, timeout: float = 30, **params):
        with self._cond:
            self._next += 1
            number = self._next
        message = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        with self._cond:
            assert self._cond.wait_for(lambda: number in self._replies, timeout), f"{method}: no answer"
            reply = self._replies.pop(number)
        assert "error" not in reply, reply
        return reply["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_js(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            assert time.monotonic() < deadline, f"still false after {timeout} s: {expression}"
            time.sleep(0.2)
        return self.js(expression)

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")  # fmt: skip
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left", clickCount=1
            )

    def type(self, selector: str, text: str) -> None:
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", session=True, text=text)

    def close(self):
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._to_chrome)


def test_dashboard_in_headless_chromium(chromium, server, root, finished, tmp_path):
    from PIL import Image

    client = server.client()
    job = finished[2]
    # 50 epochs (the API's most) of 120 examples, 1,500 steps: still running when the page polls it, even on an idle
    # machine; cancelled at the end
    write_chat_data(root / "long.jsonl", 120, seed=3)
    running = long_job(client, upload(client, root / "long.jsonl").id, epochs=50)
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        # the key travels in the fragment (never sent to the server); the page moves it to sessionStorage
        browser.send("Page.navigate", session=True, url=f"{server.url}/#key={ALICE}&jobs={job.id},{running.id}")
        browser.wait_js(f"document.querySelector('#jobs tr[data-job=\"{running.id}\"]') !== null")
        assert browser.js("location.hash") == f"#jobs={job.id},{running.id}"
        statuses = browser.js("Object.fromEntries([...document.querySelectorAll('#jobs tbody tr')]"
                              ".map(r => [r.dataset.job, r.querySelector('.status').textContent]))")  # fmt: skip
        assert statuses[job.id] == "succeeded" and statuses[running.id] in ("queued", "running")
        assert set(statuses) == {j.id for j in client.fine_tuning.jobs.list(limit=100).data}

        # two runs side by side: the finished one with its curves and evaluation table
        browser.wait_js("document.querySelectorAll('#panels .panel').length === 2")
        done = f'#panels .panel[data-job="{job.id}"]'
        browser.wait_js(f"document.querySelector('{done} .eval-table') !== null")
        points = json.loads(browser.js(f"document.querySelector('{done} canvas.loss').dataset.points"))
        assert points == {"train_loss": 6, "valid_loss": 2}  # steps 1-6; evaluations at 3 and 6
        assert json.loads(browser.js(f"document.querySelector('{done} canvas.lr').dataset.points")) == {
            "learning_rate": 6
        }
        systems = browser.js(
            f"[...document.querySelectorAll('{done} .eval-table tbody tr')].map(r => r.dataset.system)"
        )
        assert systems == [s["key"] for s in json.loads(client.files.content(job.result_files[0]).read())["systems"]]

        # live curves: the running job's point count grows between polls (every 2 s)
        live = f'#panels .panel[data-job="{running.id}"] canvas.loss'
        count = "(JSON.parse(document.querySelector('%s').dataset.points || '{}').train_loss || 0)" % live.replace(
            "'", "\\'"
        )
        first = browser.wait_js(f"{count} > 0 && {count}")
        browser.wait_js(f"{count} > {first}")
        assert browser.js(
            f"document.querySelector('{live}').closest('.panel').querySelector('.status').textContent"
        ) in (
            "running",
            "succeeded",
        )

        # the report link opens the run's report.html (fetched with the key) in a new tab
        browser.click(f"{done} a.report")
        deadline = time.monotonic() + 20
        while not [t for t in browser.send("Target.getTargets")["targetInfos"] if t["url"].startswith("blob:")]:
            assert time.monotonic() < deadline, "report.html did not open"
            time.sleep(0.2)

        # the chat box answers with the fine-tuned model, greedy: the same text as the API gives
        browser.js(f"document.getElementById('chat-model').value = {json.dumps(job.fine_tuned_model)}")
        browser.js("document.getElementById('chat-temperature').value = '0'")
        browser.type("#chat-input", "ticket 3: refund invoice please")
        browser.click("#chat-send")
        reply = browser.wait_js("document.querySelector('#chat-log .msg.assistant')?.textContent")
        expected = client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=[{"role": "user", "content": "ticket 3: refund invoice please"}],
            max_tokens=64,
            temperature=0,
        )
        assert reply == f"{job.fine_tuned_model}: {expected.choices[0].message.content}"

        shot = tmp_path / "dashboard.png"
        shot.write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", session=True, format="png")["data"]))
        if os.environ.get("TUNESMITH_SCREENSHOTS"):  # keep a copy to look at
            Path(os.environ["TUNESMITH_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
            (Path(os.environ["TUNESMITH_SCREENSHOTS"]) / "dashboard.png").write_bytes(shot.read_bytes())
        image = Image.open(shot).convert("RGB")
        assert image.size == (1400, 1400)
        colours = image.getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200  # text, tables and curves, not a blank page
        blue = sum(n for n, (r, g, b) in colours if b > 180 and r < 60 and g < 120)  # train_loss's #1a56db
        assert blue > 200
    finally:
        browser.close()
        if client.fine_tuning.jobs.retrieve(running.id).status in st.ACTIVE:
            client.fine_tuning.jobs.cancel(running.id)
        wait(client, running.id)


def test_follower_keeps_every_step_in_order_when_a_resumed_run_rewrites_metrics(tmp_path):
    """A resumed run rewrites metrics.jsonl with the records up to its checkpoint and appends new ones. A follower
    that had read further in the old file must not read on from its old byte offset (the middle of a new line there,
    skipped as unparsable: its step came late, after a later restart, or never)."""
    from tunesmith.jobs.worker import _RunFollower

    store = st.Store(tmp_path / "jobs.db")
    job = store.add_job("t", model="tiny", training_file="file-a", method={"type": "supervised"}, seed=1)["id"]
    run = tmp_path / "run"
    run.mkdir()
    metrics = run / "metrics.jsonl"

    def line(step, pad):
        return json.dumps({"time": 1.0, "kind": "train", "step": step, "loss": 1.0 / step, "note": "x" * pad}) + "\n"

    metrics.write_text(line(1, 0) + line(2, 0) + line(3, 200))  # the killed run: step 3 logged after the checkpoint
    follower = _RunFollower(store, job, run)
    follower.poll()
    old_size = metrics.stat().st_size
    # the resumed run (checkpoint at step 2) keeps steps 1-2 and logs 3 and 4 again, in shorter lines: the old
    # offset now falls inside step 4's line
    from tunesmith.training.metrics import MetricsLogger

    logger = MetricsLogger(run, [], resume_step=2)
    logger.log({"kind": "train", "step": 3, "loss": 0.3})
    logger.log({"kind": "train", "step": 4, "loss": 0.25, "note": "y" * 150})
    logger.log({"kind": "train", "step": 5, "loss": 0.2})
    logger.close()
    assert metrics.stat().st_size > old_size and metrics.read_bytes()[:old_size].count(b"\n") == 3  # mid-line
    follower.poll()
    assert [e["step"] for e in store.metric_events(job)] == [1, 2, 3, 4, 5]
    store.close()


def test_follower_records_a_checkpoint_saved_while_it_read_the_metrics_with_its_validation_loss(tmp_path):
    """Training logs a step's train and eval records, then saves its checkpoint. A checkpoint that appears while the
    follower is reading metrics.jsonl must not be recorded before its eval record is read (a checkpoint row is
    written once: recorded early, it kept no validation loss; a fresh-clone CI failed on that race)."""
    from tunesmith.jobs.worker import _RunFollower

    store = st.Store(tmp_path / "jobs.db")
    job = store.add_job("t", model="tiny", training_file="file-a", method={"type": "supervised"}, seed=1)["id"]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    metrics = run / "metrics.jsonl"

    def log_step(step):
        with metrics.open("a") as fh:
            fh.write(json.dumps({"time": 1.0, "kind": "train", "step": step, "loss": 1.0 / step}) + "\n")
            fh.write(json.dumps({"time": 1.0, "kind": "eval", "step": step, "val_loss": 2.0 / step}) + "\n")
        (run / "checkpoints" / f"step-{step}").mkdir()

    log_step(1)
    follower = _RunFollower(store, job, run)
    read = follower._read_metrics

    def read_then_training_goes_on():
        read()
        if not (run / "checkpoints" / "step-2").exists():
            log_step(2)  # step 2 logged and saved just after the follower read the file

    follower._read_metrics = read_then_training_goes_on
    follower.poll()
    follower.poll()
    follower.poll()
    rows = {c["step_number"]: c["metrics"] for c in store.list_checkpoints(job, None, 10).data}
    assert rows == {
        1: {"step": 1, "train_loss": 1.0, "learning_rate": None, "valid_loss": 2.0, "full_valid_loss": 2.0},
        2: {"step": 2, "train_loss": 0.5, "learning_rate": None, "valid_loss": 1.0, "full_valid_loss": 1.0},
    }
    store.close()
