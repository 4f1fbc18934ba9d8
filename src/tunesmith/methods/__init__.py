"""Fine-tuning methods: which weights train, and how the result is saved and loaded.

    model = apply_method(base, config, tokenizer=tok)   # full, freeze, lora, dora, ia3, prefix, prompt, adapter
    print(describe(model, config))                       # "lora r=16 ... : 1,843,200 trainable of ..."
    ...train...
    save_trained(model, config, run_dir / "model")       # peft adapter dir, full HF dir, or our adapter dir
    model = load_trained(fresh_base, run_dir / "model")

What the training loop must know:
- prompt tuning prepends `num_virtual_tokens` positions to the logits (peft pads the labels itself);
  `logits_offset(model)` says how many to drop or mask.
- prefix and prompt tuning cannot train on packed rows, and prefix tuning cannot use gradient
  checkpointing: `apply_method` raises ConfigError for those combinations.
"""

import warnings

from tunesmith.methods.apply import (
    apply_method,
    describe,
    load_trainable_state_dict,
    trainable_parameters,
    trainable_state_dict,
)
from tunesmith.methods.saving import load_trained, merged_for_inference, save_trained, saved_method

# peft 0.21 asks transformers 5.x for a renamed attribute when it wraps a model (training, and loading a run for
# eval, chat or serving); the FutureWarning is not the user's business
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def logits_offset(model) -> int:
    """Leading logit positions that belong to virtual tokens (prompt tuning), not to the input."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "peft_type", None) == "PROMPT_TUNING":
        return config.num_virtual_tokens
    return 0


__all__ = [
    "apply_method",
    "describe",
    "load_trainable_state_dict",
    "load_trained",
    "logits_offset",
    "merged_for_inference",
    "save_trained",
    "saved_method",
    "trainable_parameters",
    "trainable_state_dict",
]
