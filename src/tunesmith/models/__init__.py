"""Built-in model names, loading of local Hugging Face directories and GGUF files, device and dtype choice.

    from tunesmith import models
    model, tokenizer = models.load("smollm2-135m-instruct")       # or a local HF dir, or a .gguf file
    models.info("smollm2-135m-instruct")["parameters"]            # 134515008

Importing this package is cheap: torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

from tunesmith.models.cache import home, models_dir
from tunesmith.models.describe import count_parameters, info, list_models
from tunesmith.models.loading import load, pick_device, pick_dtype, pull, resolve, unknown_model_message
from tunesmith.models.registry import BUILTINS, DEFAULT_MODEL, BuiltinModel, Wheel

__all__ = [
    "BUILTINS",
    "DEFAULT_MODEL",
    "BuiltinModel",
    "Wheel",
    "count_parameters",
    "home",
    "info",
    "list_models",
    "load",
    "models_dir",
    "pick_device",
    "pick_dtype",
    "pull",
    "resolve",
    "unknown_model_message",
]
