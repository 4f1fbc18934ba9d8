"""Save the final model of a run (`runs/<name>/model/`) and load it back onto a base model.

Formats, so that other tools can read what we write:
- lora/dora/ia3/prefix/prompt: peft's adapter dir (adapter_config.json + adapter_model.safetensors), loadable
  with `peft.PeftModel.from_pretrained(base, dir)` and by vLLM / LoRAX for LoRA;
- full/freeze: a complete Hugging Face model dir (config.json + model.safetensors; tied weights stored once),
  loadable on its own with `AutoModelForCausalLM.from_pretrained(dir)`; the caller adds the tokenizer;
- adapter: adapter_config.json `{"tunesmith_method": "adapter", ...}` + adapter_model.safetensors (ours);
- always tunesmith.json: the method, the base model's name, the method's settings and parameter counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tunesmith.atomic import atomic_dir
from tunesmith.config import Config
from tunesmith.errors import ModelError, RunError
from tunesmith.methods import adapter, peft_methods
from tunesmith.methods.apply import load_trainable_state_dict, trainable_parameters, trainable_state_dict

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
META = "tunesmith.json"


def save_trained(
    model: nn.Module, config: Config, out_dir: Path, tokenizer=None, state_dict: dict | None = None
) -> None:
    """Write the fine-tuned model (and its tokenizer) to `out_dir`, replacing it whole: a crash leaves the old or
    the new dir, never a model/ without its tokenizer. `state_dict`: the full weights when the model's own are
    sharded (FSDP; full/freeze only), gathered by the caller."""
    with atomic_dir(Path(out_dir)) as tmp:
        _write(model, config, tmp, state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def _write(model: nn.Module, config: Config, path: Path, state_dict: dict | None = None) -> None:
    method = config.method
    if state_dict is not None and method in ("full", "freeze"):
        model.save_pretrained(path, state_dict=state_dict)  # gathered from FSDP's shards
    elif method in peft_methods.PEFT_METHODS or method in ("full", "freeze"):
        model.save_pretrained(path)  # peft's adapter format, or a transformers model dir
    elif method == "adapter":
        from safetensors.torch import save_file

        a = config.adapter
        settings = {
            "tunesmith_method": "adapter",
            "style": a.style,
            "bottleneck": a.bottleneck,
            "activation": a.activation,
            "positions": adapter.positions(model, a.style),
        }
        (path / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
        tensors = {k: v.contiguous().cpu() for k, v in trainable_state_dict(model).items()}
        save_file(tensors, path / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    else:
        raise ModelError(f"cannot save method {method!r}")
    section = {"lora": "lora", "dora": "lora"}.get(method, method)
    trainable, total = trainable_parameters(model)
    meta = {
        "method": method,
        "base_model": config.model.name,
        "settings": getattr(config, section).model_dump(mode="json") if section in Config.model_fields else {},
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")


def load_trained(base_model: nn.Module, model_dir: Path) -> nn.Module:
    """The fine-tuned model saved in `model_dir`, built on `base_model` (loaded by the caller), in eval mode.

    peft methods return a PeftModel wrapping `base_model`; full/freeze load the saved weights into
    `base_model` (a full dir also loads on its own with from_pretrained); adapter inserts and loads adapters.
    """
    model_dir = Path(model_dir)
    method = saved_method(model_dir)
    if method in peft_methods.PEFT_METHODS or method == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_model, model_dir)
    elif method in ("full", "freeze"):
        _load_full(base_model, model_dir)
        model = base_model
    else:
        _load_adapters(base_model, model_dir)
        model = base_model
    return model.eval()


def merged_for_inference(model: nn.Module) -> nn.Module:
    """A LoRA/DoRA/IA3-tuned model with its adapter folded into the weights it modifies (peft's merge_and_unload),
    when they are float32 or float64: each adapted linear layer is then one matmul instead of three, which takes
    ~3% off an evaluation of the default model on 2 CPU cores (bench/RESULTS.md run 19b), and no forward changes
    but for rounding (~1e-7 relative). In bf16/fp16 the adapter's small update would be rounded into the
    low-precision weights, so such a model is returned as it is, as is every other method.
    Not for a model that must still run with its adapter disabled (that is the base model for free)."""
    peft_type = getattr(getattr(model, "active_peft_config", None), "peft_type", None)
    if str(getattr(peft_type, "value", peft_type)) not in ("LORA", "IA3"):
        return model
    if any(p.dtype not in (torch.float32, torch.float64) for p in model.parameters() if p.is_floating_point()):
        return model
    return model.merge_and_unload(safe_merge=True).eval()


def saved_method(model_dir: Path) -> str:
    """The method a model dir was trained with (from tunesmith.json, else guessed from its files)."""
    model_dir = Path(model_dir)
    if (model_dir / META).is_file():
        return json.loads((model_dir / META).read_text())["method"]
    if (model_dir / ADAPTER_CONFIG).is_file():
        settings = json.loads((model_dir / ADAPTER_CONFIG).read_text())
        if settings.get("tunesmith_method") == "adapter":
            return "adapter"
        peft_type = settings.get("peft_type")
        if peft_type is None:
            raise RunError(f"{model_dir / ADAPTER_CONFIG}: neither a peft adapter nor one of ours")
        known = {
            "LORA": "dora" if settings.get("use_dora") else "lora",
            "IA3": "ia3",
            "PREFIX_TUNING": "prefix",
            "PROMPT_TUNING": "prompt",
        }
        return known.get(peft_type, "peft")  # another peft method (made elsewhere): peft still loads it
    if (model_dir / "config.json").is_file():
        return "full"
    raise RunError(f"{model_dir}: not a saved model (no {META}, {ADAPTER_CONFIG} or config.json)")


def _load_full(model: nn.Module, model_dir: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise RunError(f"{model_dir}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied weight is stored once (embed_tokens); lm_head.weight is the same tensor, so it was loaded too
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in state}
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in missing if not (k in params and id(params[k]) in loaded)]
    if missing or unexpected:
        raise ModelError(
            f"{model_dir}: the saved weights do not fit this base model "
            f"({len(missing)} missing, {len(unexpected)} unexpected); was it trained from another model?",
            [f"  missing: {k}" for k in missing[:5]] + [f"  unexpected: {k}" for k in unexpected[:5]],
        )


def _load_adapters(model: nn.Module, model_dir: Path) -> None:
    from safetensors.torch import load_file

    settings = json.loads((model_dir / ADAPTER_CONFIG).read_text())
    where = adapter.insert_adapters(
        model, settings["style"], settings["bottleneck"], settings["activation"], init_scale=0.0
    )
    if where != settings["positions"]:
        raise ModelError(f"{model_dir}: the adapters were trained on a model with other blocks than this one")
    device = next(model.parameters()).device
    load_trainable_state_dict(model, load_file(model_dir / ADAPTER_WEIGHTS, device=str(device)))
    for p in model.parameters():
        p.requires_grad_(False)
