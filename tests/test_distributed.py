"""Training on 2 processes (torch.distributed, gloo on CPU) computes what 1 process computes, and stops and resumes
like it.

Each comparison trains the tiny model for 6 steps of 8 examples: once in one process, once with `--nproc 2` (each
process 4 examples of every step). Equal means: every logged loss within 1e-5 relative, and every final weight
tensor within 1e-5 relative in norm (|got - want| / |want|) with no element off by more than 1e-6. Why not bit-equal:
the two processes sum their halves of the step's gradient (and of the loss) in another order than one process
summing its micro-batches, which moves the last bits of a float32 sum (~1e-7 relative). AdamW keeps such relative
differences the same size for most weights, but for a weight whose gradient is near 0 its step m / (sqrt(v) + eps)
is a ratio of two tiny numbers, and there the difference is absolute: a fraction of the learning rate (measured:
2e-7 on a LoRA B element of 5e-3 after 6 steps at lr 5e-3, 4e-5 relative). Hence the norm-wise relative bound plus
an element-wise absolute one of 1e-6 (2e-4 x lr). A bug (a step's examples counted twice or missed, a loss
normalised by one process's tokens, gradients averaged instead of summed) moves the losses by 1e-2 or more and
the weights by about the learning rate.

Resume across world sizes (2 -> 1, 1 -> 2), a rank killed (the run ends with a message naming it, in seconds, and
the checkpoint left behind resumes), a stop request on one rank (every rank checkpoints at the same step, exit 130),
bad input, and the memory estimate of --dry-run are tested below. Every process runs 1 thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import write_chat_data
from tunesmith.cli import main

RTOL, ATOL = 1e-5, 1e-6
STEPS = 6
COMMON = ["--max-steps", str(STEPS), "--batch-size", "8", "--lr", "5e-3", "--train.save_every", "3"]
COMMON += ["--train.eval_every", "3", "--train.threads", "1", "--train.micro_batch_size", "2"]
LORA = ["--method", "lora", "--lora.r", "4", "--lora.dropout", "0"]
FULL = ["--method", "full", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-data")
    return write_chat_data(root / "train.jsonl", 48), write_chat_data(root / "val.jsonl", 12, seed=1)


def _args(model_dir, data, out, *extra) -> list[str]:
    train, val = data
    return ["train", "--model", str(model_dir), "--data", str(train), "--val-data", str(val), "--output", str(out)]


def _tunesmith(args: list[str], env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m tunesmith ARGS` in a subprocess (PYTHONPATH and the rest of the environment passed on)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNESMITH_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "tunesmith", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _one_process(model_dir, data, out, *extra) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_THREADS", "1")
        assert main([*_args(model_dir, data, out), "--quiet", "--seed", "3", *COMMON, *extra]) == 0
    return out


def _two_processes(model_dir, data, out, *extra, env=None) -> subprocess.CompletedProcess:
    return _tunesmith(
        [*_args(model_dir, data, out), "--quiet", "--seed", "3", *COMMON, *extra, "--nproc", "2"], env=env
    )


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1)), "each step logged once (rank 0 only)"
    return [r["loss"] for r in train]


def _weights(out: Path) -> dict:
    model = out / "model"
    name = "adapter_model.safetensors" if (model / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(model / name)


def _assert_same(out: Path, reference: Path) -> None:
    assert _losses(out) == pytest.approx(_losses(reference), rel=RTOL)
    got, want = _weights(out), _weights(reference)
    assert got.keys() == want.keys()
    for k in want:
        diff = (got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)
        assert diff <= RTOL, f"{k}: relative difference {diff:.2e}"
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def lora_reference(tiny_model_dir, data, tmp_path_factory) -> Path:
    return _one_process(tiny_model_dir, data, tmp_path_factory.mktemp("lora1") / "run", *LORA)


@pytest.fixture(scope="module")
def full_reference(tiny_model_dir, data, tmp_path_factory) -> Path:
    return _one_process(tiny_model_dir, data, tmp_path_factory.mktemp("full1") / "run", *FULL)


def test_lora_ddp_on_two_processes_equals_one(tiny_model_dir, data, tmp_path, lora_reference):
    out = tmp_path / "run"
    # launched as on several machines (README: torchrun on each node, a c10d rendezvous), here with one node; with
    # gradient checkpointing on, which must not change what DDP computes
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    torchrun += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "-m", "tunesmith"]
    args = [*_args(tiny_model_dir, data, out), "--quiet", "--seed", "3", *COMMON, *LORA]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [*torchrun, *args, "--train.gradient_checkpointing", "true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_same(out, lora_reference)
    assert json.loads((out / "data.json").read_text())["distributed"] == {"world_size": 2, "strategy": "ddp"}
    assert proc.stdout.count("done: ") == 1, "rank 0 alone speaks"
    ckpt = out / "checkpoints" / f"step-{STEPS}"
    assert (ckpt / "dcp" / ".metadata").is_file()
    assert json.loads((ckpt / "distributed.json").read_text())["world_size"] == 2


def test_full_fsdp_on_two_processes_equals_one(tiny_model_dir, data, tmp_path, full_reference):
    out = tmp_path / "run"
    proc = _two_processes(tiny_model_dir, data, out, *FULL, "--train.gradient_checkpointing", "true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_same(out, full_reference)
    assert json.loads((out / "data.json").read_text())["distributed"] == {"world_size": 2, "strategy": "fsdp"}
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # gathered and written as a plain transformers model
    # each rank wrote its shard of the weights and of AdamW's moments
    assert sorted(p.name for p in (out / "checkpoints" / f"step-{STEPS}" / "dcp").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]


def test_a_killed_rank_ends_the_run_with_its_name_and_the_checkpoint_resumes_on_one_process(
    tiny_model_dir, data, tmp_path, lora_reference
):
    out = tmp_path / "run"
    start = time.monotonic()
    env = {"TUNESMITH_TEST_KILL_AT": "after-step-4", "TUNESMITH_TEST_KILL_RANK": "1"}
    proc = _two_processes(tiny_model_dir, data, out, *LORA, env=env)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "error: rank 1 (pid " in output and "was killed by SIGKILL" in output, output
    assert "Traceback" not in proc.stderr.split("error: rank 1")[-1]
    assert elapsed < 90, f"the surviving rank took {elapsed:.0f}s to stop"
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-3"]

    resumed = _tunesmith(["train", "--resume", str(out), "--quiet"])  # 2 -> 1 process
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "written by 2 processes on 1" in resumed.stdout
    _assert_same(out, lora_reference)


def test_one_process_checkpoint_resumes_on_two_fsdp(tiny_model_dir, data, tmp_path, full_reference):
    out = tmp_path / "run"
    killed = _tunesmith(
        [*_args(tiny_model_dir, data, out), "--quiet", "--seed", "3", *COMMON, *FULL],
        env={"TUNESMITH_TEST_KILL_AT": "after-step-4"},
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    resumed = _tunesmith(["train", "--resume", str(out), "--quiet", "--nproc", "2"])  # 1 -> 2 processes
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "written by 1 process on 2" in resumed.stdout
    _assert_same(out, full_reference)


@pytest.mark.long  # ~25 s; test_ctrl_c_stops_every_process_at_one_checkpoint covers the stop in the default suite
def test_a_stop_on_one_rank_stops_both_at_one_checkpoint_then_resumes_on_one(
    tiny_model_dir, data, tmp_path, full_reference
):
    out = tmp_path / "run"
    # rank 1 alone gets SIGTERM after step 1 (as a cluster's scheduler would send it): both stop after step 2
    env = {
        "TUNESMITH_TEST_KILL_AT": "after-step-1",
        "TUNESMITH_TEST_KILL_RANK": "1",
        "TUNESMITH_TEST_KILL_SIGNAL": "TERM",
    }
    proc = _two_processes(tiny_model_dir, data, out, *FULL, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 130, output
    assert output.count(f"Resume with: tunesmith train --resume {out} --nproc 2") == 1, output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    assert "Traceback" not in output

    resumed = _tunesmith(["train", "--resume", str(out), "--quiet"])  # 2 -> 1 process, FSDP shards gathered
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _assert_same(out, full_reference)


def test_ctrl_c_stops_every_process_at_one_checkpoint(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    args = [*_args(tiny_model_dir, data, out), "--quiet", *LORA, "--max-steps", "400", "--batch-size", "4"]
    args += ["--train.save_every", "1000", "--train.eval_every", "1000", "--train.threads", "1", "--nproc", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # its own process group, as a terminal's: Ctrl-C reaches the launcher and both ranks at once
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunesmith", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").stat().st_size:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert output.count(f"Resume with: tunesmith train --resume {out} --nproc 2") == 1, output
    assert "Traceback" not in output
    ckpts = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(ckpts) == 1 and ckpts[0].startswith("step-"), ckpts
    step = int(ckpts[0].split("-")[1])
    assert step < 400
    assert json.loads((out / "checkpoints" / ckpts[0] / "state.json").read_text())["step"] == step


def test_fsdp_with_an_adapter_method_names_the_alternative(tiny_model_dir, data, tmp_path, capsys):
    args = [*_args(tiny_model_dir, data, tmp_path / "r"), "--quiet", *LORA, "--train.distributed", "fsdp"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "method lora trains small adapter weights that are replicated instead: use train.distributed ddp" in err


def test_preference_objectives_refuse_several_processes(monkeypatch):
    from tunesmith.config import validate_config
    from tunesmith.errors import ConfigError
    from tunesmith.training import distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = validate_config({"train": {"objective": "dpo"}, "data": {"train": "x.jsonl"}})
    with pytest.raises(ConfigError, match="train.objective dpo trains in one process only for now"):
        distributed.strategy(cfg, 2)


def test_more_processes_than_cores_warns(monkeypatch):
    from tunesmith.training.launch import check_nproc

    said = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    check_nproc(2, said.append)
    assert said == []
    check_nproc(3, said.append)
    assert said and said[0].startswith("warning: --nproc 3 on 2 CPU cores")


def test_resume_refuses_a_checkpoint_of_another_method(tiny_model_dir, data, tmp_path):
    from tunesmith.errors import RunError
    from tunesmith.training import distributed

    ckpt = tmp_path / "step-3"
    ckpt.mkdir()
    (ckpt / "distributed.json").write_text(json.dumps({"world_size": 2, "strategy": "ddp", "method": "lora"}))
    with pytest.raises(RunError, match="holds weights of method lora, this run trains full; cannot resume"):
        distributed.load_checkpoint(ckpt, None, None, distributed.Dist(), "full", print)


def test_dry_run_estimates_memory_per_process(tiny_model_dir, data, tmp_path, capsys):
    def estimate(nproc: str) -> dict:
        args = [*_args(tiny_model_dir, data, tmp_path / "r"), *FULL, "--batch-size", "8", "--dry-run", "--nproc", nproc]
        assert main(args) == 0
        lines = capsys.readouterr().out.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("estimated memory per process"))
        return {line.split()[0]: float(line.split()[1]) for line in lines[at + 1 :] if line.startswith("  ")}

    one, two = estimate("1"), estimate("2")
    for key in ("weights", "gradients", "optimizer"):
        assert two[key] == pytest.approx(one[key] / 2, abs=0.1), key  # FSDP shards them over 2 processes
    assert two["activations"] == pytest.approx(one["activations"] / 2, abs=0.1)  # 4 of the step's 8 examples
    assert "gathered" in two and "gathered" not in one  # one decoder layer all-gathered while it runs
    # 1.6M fp32 parameters: 6.1 MiB of weights, as many of gradients, twice that of AdamW moments
    assert one["weights"] == pytest.approx(1_595_552 * 4 / 2**20, abs=0.05)
    assert not (tmp_path / "r").exists(), "a dry run writes nothing"


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_each_example_of_a_step_is_trained_once_by_one_rank(n):
    from tunesmith.training.distributed import Dist

    indices = [10 + i for i in range(n)]
    shares = [Dist(rank=r, world_size=3, strategy="ddp").share(indices) for r in range(3)]
    trained = [i for share, weight in shares if weight == 1.0 for i in share]
    assert trained == indices  # in order, none twice, none missed
    assert all(share for share, _ in shares)  # a rank without examples still makes its passes (weight 0)
    assert Dist().share(indices) == (indices, 1.0)
