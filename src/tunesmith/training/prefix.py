"""Encoding a prefix that every example of a micro-batch shares once, instead of once per example.

Chat data for one task usually repeats the same system prompt (and the template's tokens around it) at the
start of every example: on the bundled ticket data that is 28 of ~81 tokens, and re-encoding it costs about a
third of the training compute. The forward pass here computes it once per micro-batch
(models/functional.forward_after_prefix):

- one packed row (the usual case for short examples): the row runs with the prefix in front of it, its 4D mask
  causal over the prefix and letting every suffix token see the whole prefix and the earlier tokens of its own
  example only: one forward, L more tokens in it;
- several rows: the prefix (1, L) runs alone with `use_cache=True` (its keys/values stay in the autograd graph),
  each layer's keys/values are expanded (a view, no copy) over the R rows, and the rows run with
  `past_key_values=cache`, positions starting at L, and the same mask.

Gradients of the suffix losses flow back into the prefix's single encoding (in the second form through the expanded
keys/values, whose backward sums them over the rows), so loss and gradients equal those of encoding each example
whole, to fp32 rounding (tests/test_prefix_sharing.py). Labels never fall inside the prefix (data/batching.py stops the
prefix before the first labelled position), so the prefix needs no LM head at all.

Used for methods that leave the attention inputs alone (LoRA, DoRA, IA3, full, freeze, bottleneck adapters).
Prefix/prompt tuning already put their own virtual tokens in front and keep the padded path; models with
sliding-window layers (e.g. Gemma 3) keep plain packing, since a custom 4D mask would be applied to their
local layers as if they were global.
"""

from __future__ import annotations

import torch

from tunesmith.models.functional import forward_after_prefix, takes_custom_masks

# Below this many shared tokens the extra prefix pass costs more than it saves (measured: see bench/RESULTS.md).
MIN_PREFIX_TOKENS = 8


def supports_prefix_sharing(model, method: str, gradient_checkpointing: bool) -> tuple[bool, str]:
    """Whether the shared-prefix forward is exact and usable for this model; the reason when it is not."""
    if method in ("prefix", "prompt"):
        return False, f"{method} tuning puts virtual tokens before every row"
    if gradient_checkpointing:
        return False, "gradient checkpointing recomputes layers without a cache"
    return takes_custom_masks(model)


def forward_shared_prefix(model, batch) -> torch.Tensor:
    """Logits at `batch.keep` positions (n_keep, vocab) for a batch whose examples share `batch.prefix_ids`."""
    return forward_after_prefix(model, batch)
