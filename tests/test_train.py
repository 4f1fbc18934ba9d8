"""End-to-end training on a tiny model: the CLI, the run directory, resume after SIGKILL, Ctrl-C, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import tunesmith
from tunesmith.cli import main

WORDS = {
    "billing": ["invoice", "refund", "charge", "price"],
    "shipping": ["parcel", "courier", "delivery", "tracking"],
    "technical": ["crash", "error", "bug", "freeze"],
}


def write_chat_data(path: Path, n: int, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    labels = list(WORDS)
    with open(path, "w") as fh:
        for i in range(n):
            label = labels[i % len(labels)]
            words = rng.sample(WORDS[label], 2) + [rng.choice(["please", "help", "today", "now"])]
            msgs = [
                {"role": "system", "content": "Classify the ticket."},
                {"role": "user", "content": f"ticket {i}: " + " ".join(words)},
                {"role": "assistant", "content": label},
            ]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write_chat_data(root / "train.jsonl", 48), write_chat_data(root / "val.jsonl", 12, seed=1)


def _train_args(tiny_model_dir, data, out, *extra):
    train, val = data
    return [
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(train),
        "--val-data",
        str(val),
        "--output",
        str(out),
        "--quiet",
        "--seed",
        "3",
        *extra,
    ]


def test_train_cli_writes_a_complete_run_directory(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        _train_args(
            tiny_model_dir,
            data,
            out,
            "--max-steps",
            "12",
            "--lr",
            "2e-2",
            "--batch-size",
            "8",
            "--lora.r",
            "4",
            "--train.eval_every",
            "4",
        )
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "plan: 12 steps" in printed and "trainable" in printed

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert "auto" not in json.dumps(cfg["train"])  # every auto value of training resolved and written out
    assert cfg["data"]["max_length"] == 512  # auto: the tiny model's context
    assert cfg["lora"]["r"] == 4 and cfg["train"]["lr"] == 2e-2 and cfg["train"]["batch_size"] == 8

    summary = json.loads((out / "data.json").read_text())
    assert summary["train"]["examples"] == 48 and summary["validation"]["examples"] == 12
    assert len(summary["files"]["train"]["sha256"]) == 64

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if r["kind"] == "train"]
    eval_rec = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_rec] == list(range(1, 13))
    assert [r["step"] for r in eval_rec] == [4, 8, 12]
    # a tiny random model with frozen tied embeddings can only move its logits a little: ~0.6 nats at most
    assert train_rec[-1]["loss"] < train_rec[0]["loss"] - 0.1
    assert eval_rec[-1]["val_loss"] < eval_rec[0]["val_loss"]
    assert all(r["tokens_per_s"] > 0 for r in train_rec)

    assert (out / "model" / "adapter_config.json").is_file()
    assert (out / "model" / "tokenizer.json").is_file()
    assert not list(out.rglob(".*tmp*")), "a temporary file was left behind"

    code = main(["generate", str(out), "--prompt", "ticket 99: refund invoice please", "--max-new-tokens", "4"])
    assert code == 0


def test_existing_run_needs_resume_and_bad_flags_are_user_errors(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    assert main(_train_args(tiny_model_dir, data, out, "--max-steps", "2")) == 2
    assert f"tunesmith train --resume {out}" in capsys.readouterr().err

    assert main(_train_args(tiny_model_dir, data, tmp_path / "r2", "--lora.rank", "4")) == 2
    assert "unknown key 'lora.rank'; did you mean 'lora.r'?" in capsys.readouterr().err

    assert main(_train_args(tiny_model_dir, data, tmp_path / "r3", "--data.max_length", "100000")) == 2
    assert "longer than the model's context (512 tokens)" in capsys.readouterr().err


def test_unknown_data_keys_warn_in_train_and_fail_with_strict(tiny_model_dir, data, tmp_path, capsys):
    train, val = data
    extra = tmp_path / "extra.jsonl"
    rows = [{**json.loads(line), "source": "web"} for line in train.read_text().splitlines()]
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _train_args(tiny_model_dir, (extra, val), tmp_path / "strict", "--max-steps", "1", "--strict")
    assert main(args) == 2
    assert f'{extra}:1: unknown key "source"; remove it' in capsys.readouterr().err
    args = _train_args(tiny_model_dir, (extra, val), tmp_path / "lenient", "--max-steps", "1")
    args.remove("--quiet")  # the warning goes to the log
    assert main(args) == 0
    assert f'{extra}:1: warning: unknown key "source" is ignored (lines 1-48)' in capsys.readouterr().out


def test_train_reports_a_lone_surrogate_as_a_file_line_problem(tiny_model_dir, data, tmp_path, capsys):
    train, val = data
    bad = tmp_path / "bad.jsonl"
    lines = train.read_text().splitlines()
    lines[4] = lines[4].replace('"content": "', '"content": "\\ud800', 1)
    bad.write_text("\n".join(lines) + "\n")
    assert main(_train_args(tiny_model_dir, (bad, val), tmp_path / "run", "--max-steps", "1")) == 2
    assert f"{bad}:5: messages[0].content holds a lone surrogate \\ud800" in capsys.readouterr().err


def test_accumulation_is_normalised_by_label_tokens(tiny_model_dir, data, tmp_path):
    """One step of 8 examples has the same loss and gradient in one micro-batch or eight (a mean of
    per-micro-batch means would weigh short answers more and change both)."""
    import tunesmith

    records = []
    for micro in (8, 1):
        run = tunesmith.train(
            None,
            quiet=True,
            log=lambda *_: None,
            **{
                "model.name": str(tiny_model_dir),
                "data.train": str(data[0]),
                "data.validation": str(data[1]),
                "output": str(tmp_path / f"m{micro}"),
                "train.max_steps": 1,
                "train.batch_size": 8,
                "train.micro_batch_size": micro,
                "train.lr": 1e-2,
                "train.batching": "pad",
                "lora.r": 4,
                "train.max_grad_norm": None,
            },
        )
        records.append(next(r for r in run.metrics if r["kind"] == "train"))
    assert records[0]["label_tokens"] == records[1]["label_tokens"]
    assert records[0]["loss"] == pytest.approx(records[1]["loss"], rel=1e-5)
    assert records[0]["grad_norm"] == pytest.approx(records[1]["grad_norm"], rel=1e-4)


def _spawn(args, env_extra=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNESMITH_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _wait_for(path: Path, proc, timeout=120):
    start = time.time()
    while not (path.exists() and (path.is_dir() or path.stat().st_size > 0)):
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared:\n{proc.stdout.read()}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


# checkpoints at steps 3, 6, 9 and 10 (the last step), two kept; dropout so a wrong RNG state after resume shows
RESUME_ARGS = [
    "--max-steps",
    "10",
    "--batch-size",
    "8",
    "--lr",
    "5e-3",
    "--lora.r",
    "4",
    "--lora.dropout",
    "0.1",
    "--train.save_every",
    "3",
    "--train.eval_every",
    "5",
]


def test_resume_after_sigkill_gives_the_same_weights(tiny_model_dir, data, tmp_path):
    straight = tmp_path / "straight"
    assert (
        subprocess.run(
            [sys.executable, "-m", "tunesmith", *_train_args(tiny_model_dir, data, straight, *RESUME_ARGS)],
            env={**os.environ, "TUNESMITH_THREADS": "1"},
            capture_output=True,
        ).returncode
        == 0
    )

    killed = tmp_path / "killed"
    proc = _spawn(_train_args(tiny_model_dir, data, killed, *RESUME_ARGS))
    _wait_for(killed / "checkpoints" / "step-6", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "tunesmith", "train", "--resume", str(killed), "--quiet"],
        env={**os.environ, "TUNESMITH_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout

    a = load_file(straight / "model" / "adapter_model.safetensors")
    b = load_file(killed / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), f"{k} differs after resume"
    steps = [
        json.loads(line)["step"]
        for line in (killed / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == list(range(1, 11))  # the log reads as one uninterrupted run


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_model_dir, data, tmp_path):
    out = tmp_path / "interrupted"
    proc = _spawn(
        _train_args(
            tiny_model_dir,
            data,
            out,
            "--max-steps",
            "400",
            "--batch-size",
            "4",
            "--train.save_every",
            "1000",
            "--train.eval_every",
            "1000",
        )
    )
    _wait_for(out / "metrics.jsonl", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert f"Resume with: tunesmith train --resume {out}" in output
    assert "Traceback" not in output
    ckpts = list((out / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].name.startswith("step-")


def test_tensorboard_events_are_readable(tiny_model_dir, data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert main(_train_args(tiny_model_dir, data, out, "--max-steps", "3", "--log", "tensorboard")) == 0
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert "eval/val_loss" in acc.Tags()["scalars"]


def test_early_stopping_stops_when_validation_loss_stalls(tiny_model_dir, data, tmp_path):
    import tunesmith

    run = tunesmith.train(
        None,
        quiet=True,
        log=lambda *_: None,
        **{
            "model.name": str(tiny_model_dir),
            "data.train": str(data[0]),
            "data.validation": str(data[1]),
            "output": str(tmp_path / "es"),
            "train.max_steps": 20,
            "train.batch_size": 8,
            "train.lr": 0.0,
            "train.eval_every": 2,
            "train.early_stopping_patience": 2,
            "lora.r": 4,
        },
    )
    evals = [r["step"] for r in run.metrics if r["kind"] == "eval"]
    assert evals == [2, 4, 6]  # lr 0: nothing improves after the first evaluation; two more, then stop
    assert max(r["step"] for r in run.metrics if r["kind"] == "train") == 6
    assert (run.path / "model").is_dir()


def test_generate_file_and_chat(tiny_model_dir, data, tmp_path, capsys):
    from conftest import build_tiny_model

    out = tmp_path / "run"
    # an untied tiny model, kept random (lr 0), so its answers depend on the conversation (asserted below for the
    # history): the tied one answers "\n\n\n" to everything, and an answer that ignored the history would go unnoticed
    untied = build_tiny_model(tmp_path / "untied", tied=False)
    assert main(_train_args(untied, data, out, "--max-steps", "2", "--lr", "0")) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "ticket: refund"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "ticket: parcel"}]})
        + "\n"
    )
    capsys.readouterr()
    assert main(["generate", str(out), "--file", str(prompts), "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows][0] == "ticket: refund" and len(rows) == 2
    run = tunesmith.load(out)  # the answers are the run's greedy answers, whether asked as a string or as messages
    assert [r["answer"] for r in rows] == [
        run.generate("ticket: refund", max_new_tokens=3),
        run.generate([{"role": "user", "content": "ticket: parcel"}], max_new_tokens=3),
    ]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\nnot json\n')
    assert main(["generate", str(out), "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert (
        f'{bad}:2: expected {{"prompt": "..."}} or {{"messages": [{{"role": "user", "content": "..."}}, ...]}}' in err
    )
    assert f"{bad}:3: invalid JSON" in err

    chat = subprocess.run(
        [sys.executable, "-m", "tunesmith", "chat", str(out), "--max-new-tokens", "3"],
        input="hello there\n/reset\nsecond turn\nthird turn\n\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TUNESMITH_THREADS": "1"},
    )
    assert chat.returncode == 0, chat.stderr
    # stdout: "you> model> ANSWER\n" per turn ("you> " alone for /reset)
    answers = [re.sub(r"\n(you> )*$", "", chunk) for chunk in chat.stdout.split("model> ")[1:]]
    first = run.generate([{"role": "user", "content": "hello there"}], max_new_tokens=3)
    second = run.generate([{"role": "user", "content": "second turn"}], max_new_tokens=3)  # /reset: no history
    third = run.generate(
        [
            {"role": "user", "content": "second turn"},
            {"role": "assistant", "content": second},
            {"role": "user", "content": "third turn"},
        ],
        max_new_tokens=3,
    )
    assert answers == [first, second, third]
    kept = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first}]
    assert run.generate([*kept, {"role": "user", "content": "second turn"}], max_new_tokens=3) != second, (
        "the history changes the answer, so a /reset that kept it would fail the test"
    )


def test_generate_on_an_unfinished_run_says_how_to_continue(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("data: {train: x.jsonl}\n")
    assert main(["generate", str(run), "--prompt", "hi"]) == 2
    assert f"Finish it with: tunesmith train --resume {run}" in capsys.readouterr().err
