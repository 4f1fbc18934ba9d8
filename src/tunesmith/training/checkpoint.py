"""Checkpoints: everything needed to continue a run exactly where it stopped, written atomically.

`checkpoints/step-N/` holds the trainable weights (safetensors), the optimizer state, the RNG state and a
small JSON of loop state (step, best validation loss, ...). The directory is built under a temporary name and
renamed into place only when every file is written and synced, so a run killed at any instant leaves the last
complete checkpoint loadable and never a half-written one (the next start removes the half-written folder:
RunDir.clean_partial).

`kill_point(name)` marks the instants tests/test_checkpoint_kill.py stops a run at with SIGKILL: a test sets
TUNESMITH_TEST_KILL_AT to one name and the process kills itself there, so each test kills at an exact instant
instead of racing a timer against the run.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith.atomic import atomic_dir, remove_dir
from tunesmith.run_dir import CHECKPOINT_PREFIX, CHECKPOINTS, list_checkpoints

KILL_AT = "TUNESMITH_TEST_KILL_AT"  # test hook: the name of a kill_point where the process SIGKILLs itself
KILL_RANK = "TUNESMITH_TEST_KILL_RANK"  # with several processes: only the one of this RANK kills itself
KILL_SIGNAL = "TUNESMITH_TEST_KILL_SIGNAL"  # the signal it sends itself (default KILL; TERM, INT: a stop request)


@dataclass
class LoopState:
    """What the training loop carries from step to step, saved as a checkpoint's state.json."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on so far (padding excluded)
    best_val_loss: float | None = None
    evals_without_improvement: int = 0  # validations since best_val_loss last improved (early stopping)

    def to_dict(self) -> dict:
        """state.json's content; its key order is the file format's (kept from before this class existed)."""
        return {
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "evals_without_improvement": self.evals_without_improvement,
            "tokens": self.tokens,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "LoopState":
        """From a state.json; keys it lacks take their defaults, keys it does not know are ignored."""
        return cls(**{k: raw[k] for k in ("step", "tokens", "best_val_loss", "evals_without_improvement") if k in raw})


def save_checkpoint(run_dir: Path, trainable: dict, optimizer, state: LoopState, keep: int) -> Path:
    """checkpoints/step-N/ for the loop state `state` (N = state.step), then prune to the last `keep`.

    An OSError (a full disk, a quota) leaves no trace: the temporary folder is removed and the earlier
    checkpoints are untouched; the caller says what happened."""
    target = Path(run_dir) / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{state.step}"
    name = f"checkpoint-{state.step}"
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        kill_point(f"{name}-mid-write")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(state.to_dict(), indent=2))
        kill_point(f"{name}-before-rename")  # every file written, none synced, the folder still hidden
    kill_point(f"{name}-after-rename")  # complete, older ones not pruned yet
    prune(run_dir, keep)
    return target


def kill_point(name: str) -> None:
    """SIGKILL this process when TUNESMITH_TEST_KILL_AT is `name` (tests only; unset, a dict lookup). With several
    processes only rank TUNESMITH_TEST_KILL_RANK does (default: every rank); TUNESMITH_TEST_KILL_SIGNAL picks
    another signal (TERM, INT)."""
    if os.environ.get(KILL_AT) != name:
        return
    rank = os.environ.get("RANK", "0")
    if os.environ.get(KILL_RANK, rank) == rank:
        os.kill(os.getpid(), getattr(signal, f"SIG{os.environ.get(KILL_SIGNAL, 'KILL')}"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_dir(old)  # hidden first: a kill half-way leaves no step-N that looks whole


def load_checkpoint(path: Path, device) -> tuple[dict, dict, LoopState]:
    """Returns (trainable state, optimizer state, loop state) and restores the RNG states."""
    path = Path(path)
    trainable = load_file(path / "trainable.safetensors", device=str(device))
    # weights_only: a checkpoint is only ever data (tensors and numbers), never code
    optim = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    state = LoopState.from_dict(json.loads((path / "state.json").read_text()))
    return trainable, optim, state
