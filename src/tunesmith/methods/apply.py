"""Turn a base model into the model to train, and count, describe, get and set what trains."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.config import Config
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods import _arch, adapter, full, peft_methods


def apply_method(model: nn.Module, config: Config, tokenizer=None) -> nn.Module:
    """The model to train for `config.method`, with requires_grad True exactly on the parameters that train.

    lora/dora/ia3/prefix/prompt return a peft `PeftModel` wrapping `model`; full/freeze/adapter return `model`
    itself, changed in place. `tokenizer` is needed only for prompt tuning with `prompt.init_text`.

    Gradient checkpointing: enable it after this call. transformers 5 checkpoints non-reentrantly and calls
    `enable_input_require_grads()` itself, so frozen embeddings do not cut the gradient to LoRA/IA3/prompt/
    adapter weights. Prefix tuning cannot be checkpointed at all (ConfigError here when it is asked for).
    """
    if hasattr(model, "peft_config") or adapter.has_adapters(model):
        raise ModelError("apply_method needs a plain base model; this one already has a fine-tuning method applied")
    method = config.method
    if method == "full":
        return full.apply_full(model)
    if method == "freeze":
        return full.apply_freeze(model, config.freeze)
    if method in peft_methods.PEFT_METHODS:
        return peft_methods.apply_peft(model, config, tokenizer)
    if method == "adapter":
        a = config.adapter
        adapter.insert_adapters(model, a.style, a.bottleneck, a.activation, a.init_scale)
        return model
    raise ConfigError(f"unknown method {method!r}")


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; total is the base model's plus any added, tied weights counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def describe(model: nn.Module, config: Config) -> str:
    """One line: what trains and how much (`lora r=16 ... on 7 module types (...): 1,843,200 trainable of ...`)."""
    trainable, total = trainable_parameters(model)
    counts = f"{trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
    return f"{_what(model, config)}: {counts}"


def _what(model: nn.Module, config: Config) -> str:
    method = config.method
    if method == "full":
        return "full fine-tuning"
    if method == "freeze":
        f = config.freeze
        parts = [f"last {f.last_n_blocks} of {len(_arch.find_blocks(model))} blocks"] if f.last_n_blocks else []
        if f.modules:
            parts.append(f"parameters named like {', '.join(f.modules)}")
        return f"freeze: train {' + '.join(parts)}{full.tied_note(model)}"
    if method in ("lora", "dora"):
        names = peft_methods.targeted_names(model)
        return f"{method} r={config.lora.r} alpha={config.lora.alpha:g} on {_types(names)}"
    if method == "ia3":
        names = peft_methods.targeted_names(model)
        ff = sorted(model.peft_config[model.active_adapter].feedforward_modules or [])
        return f"ia3 on {_types(names)}, feed-forward: {', '.join(ff) or 'none'}"
    if method == "prefix":
        p = config.prefix
        projection = " through an MLP" if p.projection else ""
        return f"prefix {p.num_virtual_tokens} virtual tokens x {_arch.num_layers(model)} layers{projection}"
    if method == "prompt":
        p = config.prompt
        init = f"from the text {p.init_text!r}" if p.init_text else "from sampled vocabulary embeddings"
        return f"prompt {p.num_virtual_tokens} virtual tokens, {init}"
    if method == "adapter":
        a = config.adapter
        n = sum(isinstance(m, adapter.BottleneckAdapter) for m in model.modules())
        return f"adapter {a.style} bottleneck={a.bottleneck} {a.activation}, {n} adapters"
    return method


def _types(names: list[str]) -> str:
    return f"{len(names)} module type{'s' if len(names) != 1 else ''} ({', '.join(names)})"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: small for PEFT methods. Detached views of the live weights, not copies."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `trainable_state_dict`) into `model`; every key and shape must match."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(params.keys() - state.keys())
    unexpected = sorted(state.keys() - params.keys())
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(params[k].shape)}"
        for k in params.keys() & state.keys()
        if state[k].shape != params[k].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = [f"  missing: {k}" for k in missing[:5]] + [f"  unexpected: {k}" for k in unexpected[:5]]
        problems += [f"  wrong shape: {s}" for s in wrong_shape[:5]]
        raise ModelError(
            f"saved weights do not fit this model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong_shape)} of another shape); was it saved with another method, model or config?",
            problems,
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
