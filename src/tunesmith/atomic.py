"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Everything is written under a temporary name in the same folder, synced, then renamed into place, so a
process killed at any instant never leaves a half-written result that later looks valid.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

TMP = ".tmp-"  # a temporary name is `.{final name}.tmp-XXXX`; `clean_partial` recognises it by this
REMOVING = f"{TMP}removing"  # remove_dir's: a folder half-way through being removed


@contextmanager
def atomic_dir(target: Path):
    """Yield a temporary directory next to `target`; on success, sync it and rename it to `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP}", dir=target.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clean_partial(parent: Path, names: tuple[str, ...], where: str = "") -> list[str]:
    """Undo what a writer killed mid-way left in `parent` for the final names matching `names` (fnmatch patterns).

    - `.NAME.tmp-*` was never renamed into place, so nothing vouches for it: removed;
    - `.NAME.old` (atomic_dir's previous version, moved aside just before the new one is renamed in): when NAME is
      missing, the process died between the two renames and `.NAME.old` is the last complete version, so it is
      renamed back; when NAME exists, it is removed.
    Only names the caller lists are touched, so a user's own dotfiles in the folder are never. Returns one phrase
    per thing done ("removed the half-written checkpoints/step-3" with where="checkpoints/"), to report."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    done = []
    for entry in sorted(parent.iterdir()):
        name = entry.name
        if name.startswith(".") and TMP in name:
            final = name[1 : name.index(TMP)]
            if any(fnmatch.fnmatch(final, pattern) for pattern in names):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                if name.endswith(REMOVING):
                    done.append(f"finished removing the old {where}{final}")
                else:
                    done.append(f"removed the half-written {where}{final}")
        elif name.startswith(".") and name.endswith(".old") and entry.is_dir():
            final = name[1 : -len(".old")]
            if any(fnmatch.fnmatch(final, pattern) for pattern in names):
                if (parent / final).exists():
                    shutil.rmtree(entry)
                else:
                    os.rename(entry, parent / final)
                    done.append(f"restored {where}{final} (its replacement was interrupted)")
    if done:
        _fsync_dir(parent)
    return done


def remove_dir(path: Path) -> None:
    """Remove the directory `path` so that a kill half-way leaves no folder under its name with files missing: it is
    renamed to a hidden temporary name first (which clean_partial finishes removing)."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}{REMOVING}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
