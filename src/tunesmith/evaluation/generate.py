"""Generation from a run's model: one prompt, a batch of prompts, or a token stream for chat.

For evaluation, `greedy_batch` decodes many prompts that share a common prefix (system prompt, few-shot
examples): the prefix is encoded once (`encode_prefix`) and its keys/values are copied for every batch, so a
long shared prompt costs one forward in total instead of one per example. Our own loop rather than
`model.generate` because generate cannot start from a batch-expanded cache with padding after the prefix;
a test checks that it produces the tokens `model.generate` produces.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import torch

from tunesmith.run_dir import RunDir


def load_run_model(run: RunDir | str | Path, device: str | None = None, dtype: str | None = None):
    """Base model + the run's trained weights, the tokenizer, and a Renderer configured as in training; in `dtype`
    (default: the run's model.dtype, auto: bf16 where the device computes it natively)."""
    from tunesmith import methods, models
    from tunesmith.data.templates import Renderer

    run = run if isinstance(run, RunDir) else RunDir.open(run)
    model_dir = run.require_model("load")
    cfg = run.config
    model, tokenizer = models.load(cfg.model.name, dtype=dtype or cfg.model.dtype, device=device or cfg.model.device)
    model = methods.load_trained(model, model_dir)
    model.eval()
    renderer = Renderer(tokenizer, cfg.model.chat_template, cfg.data.system_prompt, raw_prompts=run.raw_prompts)
    return model, tokenizer, renderer


def prompt_ids(tokenizer, renderer, prompt: str | list[dict]) -> list[int]:
    """Token ids a model is given: the chat template with a generation prompt, or raw text for runs trained
    on prompt/completion or plain text."""
    if isinstance(prompt, str):
        if renderer.raw_prompts:
            return tokenizer(prompt, add_special_tokens=True)["input_ids"]
        prompt = [{"role": "user", "content": prompt}]
    return renderer.prompt_ids(prompt, add_generation_prompt=True)


def _gen_kwargs(tokenizer, renderer, max_new_tokens, temperature, top_p, seed) -> dict:
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": renderer.stop_token_ids,
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if renderer.stop_strings:  # end-of-turn markers that are several tokens in this vocabulary
        kwargs.update(stop_strings=list(renderer.stop_strings), tokenizer=tokenizer)
    return kwargs


def _cut(text: str, stop: list[str] | None) -> str:
    for s in stop or []:
        at = text.find(s)
        if at >= 0:
            text = text[:at]
    return text


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    renderer,
    prompts: list,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    batch_size: int = 8,
) -> list[str]:
    """Answers to many prompts, batched with left padding."""
    device = next(model.parameters()).device
    outputs: list[str] = []
    kwargs = _gen_kwargs(tokenizer, renderer, max_new_tokens, temperature, top_p, seed)
    for start in range(0, len(prompts), batch_size):
        encoded = [prompt_ids(tokenizer, renderer, p) for p in prompts[start : start + batch_size]]
        width = max(len(e) for e in encoded)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for row in out[:, width:]:
            outputs.append(_cut(tokenizer.decode(row, skip_special_tokens=True), stop))
    return outputs


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each sequence after the prefix (the
    last prompt token's logits are needed)."""
    if not sequences:
        return 0
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return max(n, 0)


def uses_prompt_learning(model) -> bool:
    """peft prefix/prompt tuning adds virtual tokens inside forward(); explicit caches and positions do not mix
    with that, so such models take the plain (uncached) paths."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


@torch.no_grad()
def encode_prefix(model, prefix: list[int]):
    """The key/value cache of a shared prompt prefix (batch of 1), or None for an empty prefix."""
    if not prefix:
        return None
    device = next(model.parameters()).device
    ids = torch.tensor([prefix], device=device)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1).past_key_values


def expand_cache(cache, rows: int | torch.Tensor):
    """A copy of a batch-1 cache with `rows` rows (or, given an index tensor, one row per index)."""
    import copy

    if cache is None:
        return None
    out = copy.deepcopy(cache)
    index = torch.zeros(rows, dtype=torch.long) if isinstance(rows, int) else rows
    out.batch_select_indices(index.to(_cache_device(out)))
    return out


def _cache_device(cache):
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if keys is not None:
            return keys.device
    return "cpu"


def left_pad(suffixes: list[list[int]], pad: int, prefix_len: int):
    """(ids, attention mask incl. the prefix, position ids) for prompts continuing a prefix of prefix_len
    tokens, left-padded so every prompt ends at the last column (padding sits between prefix and prompt;
    the mask hides it and positions skip it)."""
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad, dtype=torch.long)
    mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for i, s in enumerate(suffixes):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    positions = (prefix_len + mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([torch.ones((len(suffixes), prefix_len), dtype=torch.long), mask], dim=1)
    return ids, full_mask, positions


@torch.no_grad()
def greedy_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    stop_ids: list[int],
    stop_strings: list[str] = (),
    max_new_tokens: int = 64,
    prefix_len: int = 0,
    prefix_cache=None,
) -> list[str]:
    """Greedy answers to prompts (token ids) that all start with the same prefix_len tokens, whose cache is
    prefix_cache (from encode_prefix). Each answer stops at a stop token (not included) or a stop string
    (cut off)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask, positions = left_pad([p[prefix_len:] for p in prompts], pad, prefix_len)
    cache = expand_cache(prefix_cache, len(prompts))
    lengths = mask.sum(-1)  # real tokens per row so far (prefix included)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )  # the LM head only where needed
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    multi_token_stops = [s for s in stop_strings if len(tokenizer(s, add_special_tokens=False)["input_ids"]) > 1]
    stops = set(stop_ids)
    for step in range(max_new_tokens):
        next_ids = out.logits[:, -1].argmax(-1).cpu()
        for i, t in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if t in stops:
                done[i] = True
                continue
            generated[i].append(t)
            if multi_token_stops and any(s in tokenizer.decode(generated[i][-8:]) for s in multi_token_stops):
                done[i] = True
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long)], dim=1)
        out = model(
            input_ids=next_ids[:, None].to(device),
            attention_mask=mask.to(device),
            position_ids=lengths[:, None].to(device) + step,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return [_cut(tokenizer.decode(g, skip_special_tokens=True), list(stop_strings)) for g in generated]


def generate(model, tokenizer, renderer, prompt, **kwargs) -> str:
    return generate_batch(model, tokenizer, renderer, [prompt], **kwargs)[0]


def stream(
    model,
    tokenizer,
    renderer,
    messages,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield text pieces as they are generated (generation runs in a background thread)."""
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, renderer, messages)], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = _gen_kwargs(tokenizer, renderer, max_new_tokens, temperature, top_p, seed)
    thread = threading.Thread(
        target=lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs),
        daemon=True,
    )
    thread.start()
    yield from streamer
    thread.join()
