"""Tensor functions on a model's inputs and outputs that training and evaluation both use.

- `takes_custom_masks` / `mask_for`: custom 4D attention masks (the shared-prefix training path and label scoring
  both put several sequences' tokens after one cached prefix);
- `pair_batch_logits` / `sequence_logps`: the answers' log-probabilities of preference pairs (data/pairs.py layout),
  for preference training and its evaluation;
- `contiguous_head_input`: the LM head never sees a strided view (a slow matmul path of frozen weights);
- `kl_per_position`: KL(p || q) of next-token distributions, the one definition behind the `train.kl_to_base`
  penalty and the forgetting measure.
"""

from __future__ import annotations

import torch

from tunesmith.models import segments as seg
from tunesmith.models.kv import cache_kw, cache_of


def takes_custom_masks(model) -> tuple[bool, str]:
    """Whether a custom 4D attention mask means the same to every attention layer of the model (not so for
    sliding-window layers, nor for kernels that take no 4D mask); the reason when it does not."""
    config = getattr(model, "config", None)
    if config is None:
        return False, "the model has no config"
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text_config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or getattr(text_config, "sliding_window", None):
        return False, "the model has sliding-window attention layers"
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return False, f"attention implementation {impl!r} takes no custom 4D mask"
    return True, ""


def mask_for(model, mask: torch.Tensor) -> torch.Tensor:
    """A boolean 4D mask (True: may attend) as the model's attention takes it: as is for SDPA, additive
    (0 / most negative value) for eager attention, which adds the mask to the scores."""
    if getattr(model.config, "_attn_implementation", "eager") == "sdpa":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def contiguous_head_input(model) -> None:
    """Make the LM head always see a contiguous input (a forward pre-hook on the output embedding; idempotent).

    `logits_to_keep=1` (our prompt encodings, transformers' generate) hands the head `hidden[:, -1:, :]`, a strided
    view. When the head's weight does not require grad (every fine-tuned model: peft freezes it; a merged model)
    torch 2.13's matmul then does not fold the batch into one matmul: it expands the weight over the batch and
    copies it for a bmm. Measured on SmolLM2-135M (2 cores, 50 rows): 4.3 s instead of 7 ms in bf16, 166 ms
    instead of 18 ms in fp32, per call; the fine-tuned model's prompt encodings in `tunesmith eval` were 10x slower
    than the base model's. A contiguous copy of the kept rows costs nothing next to that."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_tunesmith_contiguous_input", False):
        return
    head.register_forward_pre_hook(_contiguous_first_argument)
    head._tunesmith_contiguous_input = True


def _contiguous_first_argument(module, args):
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def kl_per_position(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats at every position, from logits over the vocabulary (last dimension); differentiable in
    both arguments. Computed from log-softmax, so large logits do not overflow."""
    p_log = torch.log_softmax(p_logits, -1)
    q_log = torch.log_softmax(q_logits, -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def forward_after_prefix(model, batch) -> torch.Tensor:
    """Logits at `batch.keep` for a batch whose rows all follow `batch.prefix_ids` (1, L).

    One row (the usual micro-batch of short examples): the prefix goes in front of the row and the whole runs as
    one forward, its 4D mask (1, 1, L + T, L + T) causal over the prefix and the row's own mask after it. Several
    rows: the prefix runs once with use_cache=True (its keys/values stay in the autograd graph), each layer's cache
    is expanded (a view) over the rows, and the rows run on it with their 4D mask (R, 1, T, L + T) and positions
    starting after the prefix. Both equal encoding every example whole, to rounding; the one-row form does it in one
    pass instead of two, which halves the number of (mostly small) ops of a step: 1.2x fp32 and 1.4x bf16-mixed
    tokens/s on the demo's 8-ticket micro-batches (bench/RESULTS.md run 20)."""
    rows = batch.input_ids.shape[0]
    if rows == 1:
        return _forward_prefix_in_row(model, batch)
    # no LM head on the prefix: an all-False boolean logits_to_keep selects no position
    no_logits = torch.zeros_like(batch.prefix_ids, dtype=torch.bool)
    cache = cache_of(model(input_ids=batch.prefix_ids, use_cache=True, logits_to_keep=no_logits))
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    segments = batch.segments
    out = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=mask_for(model, batch.attention_mask),
        **cache_kw(cache),
        use_cache=True,
        logits_to_keep=batch.keep,
        **seg.keyword(model, segments and seg.behind_cached_prefix(segments)),
    )
    return out.logits


def _forward_prefix_in_row(model, batch) -> torch.Tensor:
    """forward_after_prefix for one row: [prefix, row] in one forward, no logits at the prefix's positions."""
    prefix = batch.prefix_ids
    L, T = prefix.shape[1], batch.input_ids.shape[1]
    device = batch.input_ids.device
    top = torch.zeros(1, 1, L, L + T, dtype=torch.bool, device=device)
    top[..., :L] = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    segments = batch.segments
    out = model(
        input_ids=torch.cat([prefix.to(device), batch.input_ids], dim=1),
        position_ids=torch.cat([torch.arange(L, device=device)[None], batch.position_ids], dim=1),
        attention_mask=mask_for(model, torch.cat([top, batch.attention_mask], dim=2)),
        use_cache=False,
        logits_to_keep=torch.cat([batch.keep.new_zeros(1, L), batch.keep], dim=1),
        **seg.keyword(model, segments and seg.behind_prefix_in_row(segments, L)),
    )
    return out.logits


def pair_batch_logits(model, batch) -> torch.Tensor:
    """Logits (n_keep, vocab) at the kept positions of a data.pairs.PairBatch (tree layout: its 4D mask; a common
    prompt prefix fed once when the batch carries one)."""
    if batch.prefix_ids is not None:
        logits = forward_after_prefix(model, batch)
    else:
        kwargs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "logits_to_keep": batch.keep}
        if batch.attention_mask is not None:
            kwargs["attention_mask"] = mask_for(model, batch.attention_mask)
        kwargs.update(seg.keyword(model, batch.segments))
        logits = model(**kwargs, use_cache=False).logits
    return logits.reshape(-1, logits.shape[-1])


def sequence_logps(logits: torch.Tensor, batch) -> torch.Tensor:
    """(2 * n_pairs,) summed log-probabilities of each answer's trained tokens (even: chosen, odd: rejected), in
    fp32, from `pair_batch_logits`; differentiable."""
    logits = logits.float()
    picked = logits[batch.target_slot, batch.target_token] - torch.logsumexp(logits, -1)[batch.target_slot]
    out = torch.zeros(2 * batch.n_pairs, dtype=torch.float32, device=logits.device)
    return out.index_add(0, batch.target_seq, picked)
