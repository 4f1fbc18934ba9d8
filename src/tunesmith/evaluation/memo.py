"""Measurements `tunesmith eval` has made before, reused when every input is the same.

Most of an evaluation is the base model: the prompt variants tried on validation examples, then zero-shot, few-shot
and the best prompt on the test split (8 retrieved shots make prompts of ~450 tokens), and half of the forgetting
probe. None of it depends on the fine-tuned run, so evaluating a second run on the same data (another recipe,
another rank, the same run again) measured it all again: ~9 of the demo's 11 minutes on 2 cores. Each such
measurement is now stored under `$TUNESMITH_HOME/eval-cache/` (or `$TUNESMITH_EVAL_CACHE_DIR`; the jobs service gives
each tenant its own) and reused when its key matches (docs/eval-format.md).

The key is everything the result is computed from, by content, never by name:
- the model's weights (a hash of every parameter and buffer: 0.7-1 s for 135M fp32 parameters, once per model
  object until a tensor changes),
  its class and config; peft-wrapped models (adapters not merged) are never cached, since their scaling lives in
  peft's config rather than in the weights;
- the exact token ids of every prompt and the examples' content (answers, labels), so the chat template, system
  prompt, instruction, shots and retrieval are all covered;
- the measuring settings (batch size, generation length, ...), the tunesmith source code (a hash of its .py files:
  any change to the code invalidates every entry), torch and transformers versions, the device, dtype and thread
  count (float results can depend on them).
A hit is reported as such (task.json: "reused"; the log says when it was measured); the seconds it shows are
the original measurement's. `TUNESMITH_EVAL_CACHE=0` (or `tunesmith eval --fresh`) measures everything again.
Entries are small JSON files (a few KB per system); nothing removes them but deleting the folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import weakref
from pathlib import Path

VERSION = 1
# model -> (stamp, hash of its weights): hashed again only when a tensor was replaced or changed in place since
# (the stamp is every tensor's storage address and torch's in-place version counter); weak, so no model is kept alive
_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def enabled() -> bool:
    return os.environ.get("TUNESMITH_EVAL_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def folder() -> Path:
    """`$TUNESMITH_EVAL_CACHE_DIR`, else `$TUNESMITH_HOME/eval-cache` (the jobs service gives each tenant its own)."""
    env = os.environ.get("TUNESMITH_EVAL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from tunesmith.models.cache import home

    return home() / "eval-cache"


@functools.cache
def code_version() -> str:
    """A hash of tunesmith's version and its own source files (their paths and bytes)."""
    from tunesmith import __version__

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(__version__.encode())
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def model_identity(model) -> dict | None:
    """What a model computes, by content; None for models that are not cached (peft-wrapped)."""
    if hasattr(model, "peft_config"):
        return None
    try:
        state = sorted(model.state_dict().items())
        stamp = tuple((t.data_ptr(), t._version) for _, t in state)
        cached = _WEIGHTS.get(model)
        if cached is None or cached[0] != stamp:
            h = hashlib.sha256()
            for name, tensor in state:
                t = tensor.detach().to("cpu").contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(dtype=_int_view(t.dtype)).numpy().tobytes() if t.numel() else b"")
            cached = (stamp, h.hexdigest()[:24])
            _WEIGHTS[model] = cached
    except (RuntimeError, TypeError, KeyError, NotImplementedError):
        return None  # weights that cannot be read here (meta, offloaded, an exotic tensor type): measured as always
    params = next(model.parameters())
    return {
        "weights": cached[1],
        "class": type(model).__name__,
        "config": model.config.to_json_string(use_diff=False),
        "dtype": str(params.dtype),
        "device": params.device.type,
    }


def _int_view(dtype):
    """A same-width integer dtype (numpy has no bfloat16): the bytes are hashed, not the values."""
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]


def key(model, parts: dict) -> str | None:
    """The entry's key: `parts` (JSON-able) with the model's identity and the environment; None: do not cache."""
    if not enabled():
        return None
    identity = model_identity(model)
    if identity is None:
        return None
    import torch
    import transformers

    whole = {
        "version": VERSION,
        "code": code_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "model": identity,
        **parts,
    }
    return hashlib.sha256(json.dumps(whole, sort_keys=True, default=repr).encode()).hexdigest()


def digest(value) -> str:
    """A short hash of a JSON-able value (token id lists, example contents)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:24]


def load(kind: str, k: str | None) -> dict | None:
    """The stored entry ({"key", "measured_at", "value"}) or None (no entry, unreadable, or caching off)."""
    if k is None:
        return None
    path = folder() / kind / f"{k}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("key") == k else None


def store(kind: str, k: str | None, value) -> None:
    """Write an entry atomically; a cache that cannot be written is skipped, never an error."""
    if k is None:
        return
    from tunesmith.atomic import atomic_write_text

    entry = {"key": k, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "value": value}
    try:
        atomic_write_text(folder() / kind / f"{k}.json", json.dumps(entry, allow_nan=True))
    except OSError:
        pass


def reused_note(when: list[str]) -> str:
    """What the log says of measurements reused from these times."""
    first, last = min(when), max(when)
    span = first if first == last else f"{first} .. {last}"
    return f"reused the identical measurement of {span} (--fresh to measure again)"
