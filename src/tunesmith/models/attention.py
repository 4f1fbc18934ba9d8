"""tunesmith's wrapper of transformers' "sdpa" attention function: the one place it changes how attention runs.

transformers looks the attention function up by name in a global registry (ALL_ATTENTION_FUNCTIONS) at every
layer call, and hands it the keyword arguments of the model's forward. `install` wraps the "sdpa" entry once per
process; the wrapper does what a call asks for and otherwise calls the original unchanged:

- `tunesmith_segments=SegmentLayout` in the forward call: attention per packed example (models/segments.py);
- within `fp32_on_cpu()` (bf16-mixed training on a CPU: precision.Precision.autocast_context) and under CPU
  autocast: q, k and v in fp32 and autocast off for the attention itself.

Any attention function that does not know the keyword ignores it and uses the 4D mask every call still passes,
so a model whose layers bypass the registry computes the same result, only slower.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

SEGMENTS_KEYWORD = "tunesmith_segments"
_fp32_depth = 0


def install() -> None:
    """Wrap the "sdpa" entry of transformers' attention registry, once per process (idempotent)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(original, "_tunesmith", False):
        return

    def sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        layout = kwargs.pop(SEGMENTS_KEYWORD, None)
        if _fp32_depth and query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return _run(
                    original, module, query.float(), key.float(), value.float(), attention_mask, layout, args, kwargs
                )
        return _run(original, module, query, key, value, attention_mask, layout, args, kwargs)

    sdpa._tunesmith = True
    sdpa.original = original
    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa


def _run(original, module, query, key, value, attention_mask, layout, args, kwargs):
    if layout is None:
        return original(module, query, key, value, attention_mask, *args, **kwargs)
    from tunesmith.models.segments import attend

    return attend(original, module, query, key, value, layout, *args, **kwargs)


@contextmanager
def fp32_on_cpu():
    """Within (reentrant): transformers' SDPA attention called under CPU autocast runs in fp32 (autocast off, q/k/v
    as fp32); outside CPU autocast it runs unchanged.

    Under bf16 autocast torch casts q, k and v to bf16, and its CPU flash-attention backward is slower in bf16 than
    in fp32 (a 337-token packed row, 9 heads, forward + backward: 6.1 ms in bf16, 5.5 in fp32; the bf16-mixed
    demo step 5% faster with fp32 attention, no change at a batch of 32; bench/RESULTS.md run 20), while the
    q/k/v the fused LoRA layers give it are fp32 already. Entered by bf16-mixed training on a CPU
    (models/precision.Precision.autocast_context)."""
    global _fp32_depth
    install()
    _fp32_depth += 1
    try:
        yield
    finally:
        _fp32_depth -= 1
