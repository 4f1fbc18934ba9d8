"""Where converted models live: `$TUNESMITH_HOME/models/<name>/`, each a plain Hugging Face model directory.

A directory there is complete exactly when it holds `tunesmith-model.json`, which is written last, inside
the temporary directory that is renamed into place (see `tunesmith.atomic.atomic_dir`). A pull killed at
any instant leaves only a `.<name>.tmp-*` folder that nothing reads, and that a later pull removes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

MARKER = "tunesmith-model.json"
STALE_TMP_S = 3600  # a conversion takes minutes at most; older temp folders are leftovers of a crash


def home() -> Path:
    """`$TUNESMITH_HOME`, else the user cache dir (`~/.cache/tunesmith` on Linux)."""
    env = os.environ.get("TUNESMITH_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("tunesmith"))


def models_dir() -> Path:
    return home() / "models"


def builtin_dir(name: str) -> Path:
    return models_dir() / name


def gguf_dir(sha256: str) -> Path:
    """Cache folder of a user's .gguf file, keyed by its content so a renamed copy is not converted twice."""
    return models_dir() / f"gguf-{sha256[:16]}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def read_marker(path: Path) -> dict:
    try:
        return json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_marker(path: Path, provenance: dict) -> None:
    (path / MARKER).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def remove_stale_tmp(target: Path) -> None:
    """Delete temp folders of `target` left by a crashed pull (old enough that no live pull owns them)."""
    if not target.parent.is_dir():
        return
    now = time.time()
    for tmp in target.parent.glob(f".{target.name}.*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


@contextmanager
def pull_lock(target: Path, report=lambda msg: None):
    """Serialise pulls of one model across processes, so a second one waits and then finds it cached.

    Without fcntl (Windows) concurrent pulls both do the work and the last rename wins, which is still safe.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"waiting for another process that is pulling {target.name} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
