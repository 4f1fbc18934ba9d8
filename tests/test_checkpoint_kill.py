"""Runs stopped at the worst instants recover to the weights of a run never stopped.

SIGKILL lands at exact instants (the process kills itself where TUNESMITH_TEST_KILL_AT names a
`training.checkpoint.kill_point`): half-way through writing the first checkpoint, with the first one written but
not yet renamed into place, half-way through a later one, between checkpoints, after the last one. Each time the
next start recovers: --resume from the last whole checkpoint, or from step 0 (with --resume, or with the original
command) when no checkpoint was whole. A full disk during a save stops with one line, the earlier checkpoint whole.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import RESUME_ARGS, _train_args, write_chat_data
from tunesmith.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-data")
    return write_chat_data(root / "train.jsonl", 48), write_chat_data(root / "val.jsonl", 12, seed=1)


@pytest.fixture()
def one_thread(monkeypatch):
    # in-process runs use the thread count of the subprocesses, so the float sums (and the weights) are the same
    monkeypatch.setenv("TUNESMITH_THREADS", "1")


@pytest.fixture(scope="module")
def straight(tiny_model_dir, data, tmp_path_factory) -> dict:
    """The final adapter of the run never stopped (trained in this process)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNESMITH_THREADS", "1")
        assert main(_train_args(tiny_model_dir, data, out, *RESUME_ARGS)) == 0
    return load_file(out / "model" / "adapter_model.safetensors")


def _killed_at(point: str, args: list[str]) -> str:
    """Run `tunesmith ARGS` in a subprocess that SIGKILLs itself at `point`; its output."""
    env = {**os.environ, "TUNESMITH_THREADS": "1", "TUNESMITH_TEST_KILL_AT": point}
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith", *args], env=env, capture_output=True, text=True, timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point} (exit {proc.returncode}):\n{output}"
    return output


def _on_disk(out: Path) -> tuple[list[str], list[str]]:
    """(the whole checkpoints, the hidden half-written folders) under OUT/checkpoints."""
    names = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
    return [n for n in names if not n.startswith(".")], [n.split(".tmp-")[0] for n in names if n.startswith(".")]


def _assert_same_weights(out: Path, straight: dict) -> None:
    got = load_file(out / "model" / "adapter_model.safetensors")
    assert got.keys() == straight.keys()
    for k in got:
        assert torch.equal(got[k], straight[k]), f"{k} differs from the run never stopped"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 11))  # one uninterrupted log
    assert [r["step"] for r in records if r["kind"] == "eval"] == [5, 10]
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name or p.name.endswith(".old")], "leftovers"


def test_sigkill_anywhere_then_recover_gives_the_same_weights(tiny_model_dir, data, tmp_path, straight, one_thread):
    out = tmp_path / "run"
    original = _train_args(tiny_model_dir, data, out, *RESUME_ARGS)
    resume = ["train", "--resume", str(out), "--quiet"]

    # 1. half-way through the first checkpoint: nothing whole is saved
    _killed_at("checkpoint-3-mid-write", original)
    assert _on_disk(out) == ([], [".step-3"]) and not (out / "model").exists()
    assert sorted(p.name for p in (out / "checkpoints" / _hidden(out)).iterdir()) == ["trainable.safetensors"]

    # 2. --resume with nothing whole starts over from step 0, and says so; killed again with every file of the first
    # checkpoint written but the folder not yet renamed into place
    said = _killed_at("checkpoint-3-before-rename", resume)
    assert (
        f"{out}: no complete checkpoint to resume from: the run stopped before its first one was saved "
        "(3 logged steps, half-written checkpoints/step-3). Starting it again from step 0 with its saved config."
    ) in said
    assert _on_disk(out) == ([], [".step-3"])
    assert len(list((out / "checkpoints" / _hidden(out)).iterdir())) == 4  # whole, but never renamed: not trusted

    # 3. the original command may start afresh over it (it used to say: use --resume); killed mid-way through the
    # second checkpoint
    said = _killed_at("checkpoint-6-mid-write", original)
    assert (
        f"{out} held a run that stopped before its first checkpoint; discarding it "
        "(3 logged steps, half-written checkpoints/step-3) and starting afresh"
    ) in said
    assert _on_disk(out) == (["step-3"], [".step-6"])

    # 4. --resume continues from step 3 and removes the half-written step 6; killed between checkpoints
    said = _killed_at("after-step-8", resume)
    assert f"{out}: removed the half-written checkpoints/step-6" in said
    assert f"resuming from {out / 'checkpoints' / 'step-3'} (step 3 of 10)" in said
    assert _on_disk(out) == (["step-3", "step-6"], [])

    # 5. from step 6; killed after the last checkpoint is renamed into place, before pruning and the final model
    said = _killed_at("checkpoint-10-after-rename", resume)
    assert "(step 6 of 10)" in said
    assert _on_disk(out) == (["step-10", "step-6", "step-9"], []) and not (out / "model").exists()

    # 6. from step 10: no step left to train, the final model is written
    assert main(resume) == 0
    _assert_same_weights(out, straight)


def _hidden(out: Path) -> str:
    (name,) = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    return name


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(
    tiny_model_dir, data, tmp_path, straight, one_thread, monkeypatch, capsys
):
    from tunesmith import methods
    from tunesmith.training import checkpoint

    out = tmp_path / "run"
    real_save_file, real_save_trained = checkpoint.save_file, methods.save_trained
    full_at = {"step": 3}  # the checkpoint whose writing finds the disk full

    def save_file(tensors, path, *args, **kwargs):
        if Path(path).parent.name.startswith(f".step-{full_at['step']}.tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save_file(tensors, path, *args, **kwargs)

    def disk_full(model, config, out_dir, tokenizer=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_dir))

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    nospace = os.strerror(errno.ENOSPC)

    # the first checkpoint cannot be written: nothing whole yet, and the message says how to start again
    assert main(_train_args(tiny_model_dir, data, out, *RESUME_ARGS)) == 1
    assert _error(capsys) == (
        f"error: could not save the checkpoint of step 3: {nospace}; no checkpoint is complete yet: free some "
        f"space, then start again with: tunesmith train --resume {out} (from step 0, with the saved config)"
    )
    assert _on_disk(out) == ([], [])  # the half-written folder is gone

    # a later one: step 3 stays whole and loadable
    full_at["step"] = 6
    assert main(["train", "--resume", str(out), "--quiet"]) == 1
    assert _error(capsys) == (
        f"error: could not save the checkpoint of step 6: {nospace}; the last complete checkpoint (step-3) is "
        f"intact: free some space, then continue with: tunesmith train --resume {out}"
    )
    assert _on_disk(out) == (["step-3"], [])
    _, _, state = checkpoint.load_checkpoint(out / "checkpoints" / "step-3", "cpu")
    assert state.step == 3

    # the final model
    full_at["step"] = None
    monkeypatch.setattr(methods, "save_trained", disk_full)
    assert main(["train", "--resume", str(out), "--quiet"]) == 1
    assert _error(capsys) == (
        f"error: could not save the final model (model/): {nospace}; the last complete checkpoint (step-10) is "
        f"intact: free some space, then continue with: tunesmith train --resume {out}"
    )

    # space again: the run finishes as if never stopped
    monkeypatch.setattr(methods, "save_trained", real_save_trained)
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    _assert_same_weights(out, straight)


def _error(capsys) -> str:
    """The error the command ended with, checked to be one line with no traceback before it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: ") and not any(line.startswith("error: ") for line in lines[:-1])
    return lines[-1]


def test_clean_partial_removes_half_written_and_restores_an_interrupted_replacement(tmp_path):
    from tunesmith.atomic import clean_partial

    (tmp_path / ".step-3.tmp-abc").mkdir()  # never renamed into place
    (tmp_path / ".step-3.tmp-abc" / "trainable.safetensors").write_text("half")
    (tmp_path / ".step-9.old").mkdir()  # killed between atomic_dir's two renames: step-9 is missing
    (tmp_path / ".step-9.old" / "state.json").write_text("{}")
    (tmp_path / ".step-6.old").mkdir()  # killed while removing the old copy: step-6 is there
    (tmp_path / "step-6").mkdir()
    (tmp_path / ".bashrc.old").mkdir()  # not a name we were asked about
    (tmp_path / ".model.tmp-x").mkdir()
    (tmp_path / ".step-2.tmp-removing").mkdir()  # killed while pruning

    done = clean_partial(tmp_path, ("step-*",), where="checkpoints/")
    assert done == [
        "finished removing the old checkpoints/step-2",
        "removed the half-written checkpoints/step-3",
        "restored checkpoints/step-9 (its replacement was interrupted)",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bashrc.old", ".model.tmp-x", "step-6", "step-9"]
    assert (tmp_path / "step-9" / "state.json").is_file()
