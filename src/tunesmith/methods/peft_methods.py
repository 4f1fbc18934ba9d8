"""LoRA, DoRA, IA3, prefix tuning and prompt tuning: thin translations of our config into peft's.

peft does the work (layer injection, saving in the format vLLM / LoRAX / transformers read). What is ours:
resolving `target` names per architecture, checking them against the model so a typo fails with the list
of names that exist, and refusing combinations that peft or transformers silently get wrong (see
`_check_prompt_learning`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.methods import _arch

PEFT_METHODS = ("lora", "dora", "ia3", "prefix", "prompt")


def peft_config(model: nn.Module, config: Config):
    """The peft config for `config.method`, with targets resolved and checked against `model`."""
    method = config.method
    if method in ("lora", "dora"):
        return _lora_config(model, config, dora=method == "dora")
    if method == "ia3":
        return _ia3_config(model, config)
    _check_prompt_learning(config)
    if method == "prefix":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=config.prefix.num_virtual_tokens,
            prefix_projection=config.prefix.projection,
        )
    if method == "prompt":
        from peft import PromptTuningConfig, PromptTuningInit

        # Text initialisation is done by us from the caller's tokenizer (see `init_prompt_from_text`): peft's
        # TEXT init reloads a tokenizer by name, which may be a hub id we cannot reach.
        init = PromptTuningInit.SAMPLE_VOCAB if config.prompt.init_text is None else PromptTuningInit.RANDOM
        return PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=config.prompt.num_virtual_tokens, prompt_tuning_init=init
        )
    raise ValueError(f"not a peft method: {method}")


def apply_peft(model: nn.Module, config: Config, tokenizer=None) -> nn.Module:
    from peft import get_peft_model

    if config.method == "prompt" and config.prompt.init_text is not None and tokenizer is None:
        raise ConfigError("prompt.init_text needs the tokenizer: call apply_method(model, config, tokenizer=...)")
    try:
        peft_model = get_peft_model(model, peft_config(model, config))
    except ValueError as e:
        # peft reports unusable options as ValueError (e.g. prefix tuning on a model already checkpointing)
        raise ConfigError(f"{config.method}: {e}") from None
    if config.method == "prompt" and config.prompt.init_text is not None:
        init_prompt_from_text(peft_model, tokenizer, config.prompt.init_text)
    if config.method in ("lora", "dora"):
        from tunesmith.methods.lora_fused import fuse_lora

        # same model and files, fewer full-size tensors per layer; DoRA keeps peft's forward but, under autocast, an
        # fp32 sum of the base and DoRA terms (see lora_fused.py)
        fuse_lora(peft_model)
    return peft_model


def _lora_config(model: nn.Module, config: Config, dora: bool):
    from peft import LoraConfig

    target = config.lora.target
    if target == "all-linear":
        targets: str | list[str] = "all-linear"  # peft leaves out the output layer (lm_head), tied or not
    elif target == "attention":
        targets = _arch.attention_linear_names(model)
    else:
        _arch.check_targets(model, list(target), "lora.target")
        targets = list(target)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=targets,
        use_dora=dora,
    )


def _ia3_config(model: nn.Module, config: Config):
    from peft import IA3Config
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD_DEFAULTS,
    )
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGET_DEFAULTS

    model_type = getattr(_arch.base_of(model).config, "model_type", "")
    if config.ia3.target == "auto":
        if model_type not in TARGET_DEFAULTS:
            raise ConfigError(
                f"ia3.target=auto: no default IA3 targets for model type {model_type!r}; list them, e.g. "
                f"ia3.target=[k_proj,v_proj,down_proj] (linear modules: {', '.join(_arch.linear_names(model))})"
            )
        targets = list(TARGET_DEFAULTS[model_type])
    else:
        targets = list(config.ia3.target)
        _arch.check_targets(model, targets, "ia3.target")

    if config.ia3.feedforward == "auto":
        if model_type in FEEDFORWARD_DEFAULTS:
            defaults = FEEDFORWARD_DEFAULTS[model_type]
        else:  # the MLP's output projection: its last linear layer
            _, mlp = _arch.mlp_of(_arch.find_blocks(model).modules[0])
            defaults = [[n for n, m in mlp.named_modules() if _arch.is_linear(m)][-1].rsplit(".", 1)[-1]]
        feedforward = [t for t in targets if t in defaults]
    else:
        feedforward = list(config.ia3.feedforward)
        stray = [f for f in feedforward if f not in targets]
        if stray:
            raise ConfigError(
                f"ia3.feedforward: {', '.join(map(repr, stray))} not in ia3.target ({', '.join(targets)}); "
                "feed-forward modules must be targets too"
            )
    return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)


def _check_prompt_learning(config: Config) -> None:
    method = config.method
    if config.train.batching == "pack":
        # Packed rows separate examples by restarting position ids. peft drops position_ids for prompt tuning
        # (so examples see each other), and for prefix tuning the later examples of a row lose the prefix;
        # measured: their logits differ from the unpacked ones.
        raise ConfigError(
            f"method={method} cannot train on packed rows (the virtual tokens would belong to the first example "
            "of each row only); set train.batching=pad or group"
        )
    if method == "prefix" and config.train.gradient_checkpointing:
        # transformers' checkpointed decoder layers set past_key_values=None, which is where the prefix lives
        raise ConfigError(
            "method=prefix does not work with gradient checkpointing (the prefix is passed as past key values, "
            "which checkpointed layers drop); set train.gradient_checkpointing=false or use method=prompt"
        )


def init_prompt_from_text(peft_model: nn.Module, tokenizer, text: str) -> None:
    """Set the soft prompt to the embeddings of `text`'s tokens, repeated or cut to the prompt's length (as peft)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError("prompt.init_text is empty after tokenisation; give some words or leave it unset")
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    n = embedding.num_embeddings
    ids = (ids * math.ceil(n / len(ids)))[:n]
    words = peft_model.word_embeddings
    with torch.no_grad():
        embedding.weight.copy_(words(torch.tensor(ids, device=words.weight.device)).to(embedding.weight.dtype))


def targeted_names(peft_model: nn.Module) -> list[str]:
    """Leaf names of the modules peft adapted (q_proj, ...), in model order; empty for prompt learning."""
    names: dict[str, None] = {}
    for full_name in getattr(peft_model.base_model, "targeted_module_names", []):
        names.setdefault(full_name.rsplit(".", 1)[-1], None)
    return list(names)
