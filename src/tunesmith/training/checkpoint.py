"""Checkpoints: everything needed to continue a run exactly where it stopped, written atomically.

`checkpoints/step-N/` holds the trainable weights (safetensors), the optimizer state, the RNG state and a
small JSON of loop state (step, best validation loss, ...). The directory is built under a temporary name and
renamed into place only when every file is written and synced, so a run killed at any instant leaves the last
complete checkpoint loadable and never a half-written one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunesmith.atomic import atomic_dir

PREFIX = "step-"


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
    """checkpoints/step-N/ for the loop state `state` (N = state.step), then prune to the last `keep`."""
    target = Path(run_dir) / "checkpoints" / f"{PREFIX}{state.step}"
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(state.to_dict(), indent=2))
    prune(run_dir, keep)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


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
