"""Key/value caches across transformers releases.

transformers 5.24 renamed the forward argument and output field `past_key_values` to `cache` (the old name still
works with a FutureWarning and goes in 5.40). tunesmith passes and reads caches itself (shared prefixes, label
scoring, its own decoding loops), so every such call goes through `cache_kw` / `cache_of`, which use whichever name
the installed transformers declares.
"""

from __future__ import annotations

import functools


@functools.cache
def cache_name() -> str:
    """'cache' on transformers >= 5.24, else 'past_key_values'."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def cache_kw(cache) -> dict:
    """Keyword arguments that hand `cache` to a model's forward."""
    return {cache_name(): cache}


def cache_of(output):
    """The key/value cache a model's forward returned."""
    return getattr(output, cache_name())
