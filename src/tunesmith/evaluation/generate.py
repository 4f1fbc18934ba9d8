"""Generation from a run's model: one prompt, a batch of prompts, or a token stream for chat.

For evaluation, `greedy_batch` decodes many prompts that share a common prefix (system prompt, few-shot
examples): the prefix is encoded once (`encode_prefix`) and its keys/values are copied for every batch, so a
long shared prompt costs one forward in total instead of one per example. Our own loop rather than
`model.generate` because generate cannot start from a batch-expanded cache with padding after the prefix;
a test checks that it produces the tokens `model.generate` produces.

Prefix- and prompt-tuned models (peft adds their virtual tokens inside forward()) decode through the same loop: the
virtual tokens are the first columns of the cache (`virtual_cache`) and the base model is called (`decoder`), so
generation does not depend on peft's generation hook, which transformers 5.24's renaming of `past_key_values` broke.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tunesmith.models.kv import cache_kw, cache_of
from tunesmith.models.util import pad_id
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
    cached = uses_prompt_learning(model)  # virtual tokens: our cached decoding (see virtual_cache), not model.generate
    for start in range(0, len(prompts), batch_size):
        encoded = [prompt_ids(tokenizer, renderer, p) for p in prompts[start : start + batch_size]]
        if cached:
            answers = greedy_batch(
                model,
                tokenizer,
                encoded,
                stop_ids=renderer.stop_token_ids,
                stop_strings=renderer.stop_strings,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
            )
            outputs += [_cut(a, stop) for a in answers]
            continue
        width = max(len(e) for e in encoded)
        pad = pad_id(tokenizer)
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
    """Whether the model is peft prefix or prompt tuning, whose forward() adds virtual tokens in front of every row
    (not inside peft's `disable_adapter()`, where forward is the base model's)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False)) and not getattr(model, "_adapters_disabled", False)


def virtual_tokens(model) -> int:
    """How many virtual tokens (prefix/prompt tuning) come before every prompt: 0 for other models."""
    return int(model.active_peft_config.num_virtual_tokens) if uses_prompt_learning(model) else 0


def decoder(model):
    """The module our decoding loops call. A prefix/prompt-tuned model's virtual tokens are the first columns of the
    key/value cache those loops pass (`virtual_cache`), so they call its base model, whose forward adds nothing;
    calling peft's forward would add the virtual tokens a second time."""
    return model.get_base_model() if uses_prompt_learning(model) else model


@torch.no_grad()
def virtual_cache(model):
    """The key/value cache (batch of 1) of a prefix/prompt-tuned model's virtual tokens, None for other models.

    What peft's forward does on every call, done once: prefix tuning's virtual tokens are keys/values already
    (peft's get_prompt builds the cache); prompt tuning's are input embeddings, run through the base model. Either
    way the prompt's tokens then take positions from num_virtual_tokens on, as in training (peft offsets prefix
    tuning's positions and counts prompt tuning's virtual tokens as the first positions)."""
    if not uses_prompt_learning(model):
        return None
    n = virtual_tokens(model)
    config = model.active_peft_config
    if str(getattr(config.peft_type, "value", config.peft_type)).upper() == "PREFIX_TUNING":
        cache = model.get_prompt(batch_size=1, max_cache_len=n)
        if isinstance(cache, (tuple, list)):  # older peft: per-layer (key, value) pairs
            from transformers import DynamicCache

            cache = DynamicCache.from_legacy_cache(tuple(cache))
        return cache
    base = model.get_base_model()
    embeds = model.get_prompt(batch_size=1).to(next(base.parameters()).dtype)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return cache_of(base(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1))


@torch.no_grad()
def encode_prefix(model, prefix: list[int]):
    """The key/value cache (batch of 1) of a shared prompt prefix, after the model's virtual tokens if it has any;
    None for an empty prefix on a model without them."""
    cache = virtual_cache(model)
    if not prefix:
        return cache
    device = next(model.parameters()).device
    ids = torch.tensor([prefix], device=device)
    v = virtual_tokens(model)
    out = decoder(model)(
        input_ids=ids,
        attention_mask=torch.ones((1, v + len(prefix)), dtype=torch.long, device=device),
        position_ids=torch.arange(v, v + len(prefix), device=device)[None],
        **cache_kw(cache),
        use_cache=True,
        logits_to_keep=1,
    )
    return cache_of(out)


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


@dataclass
class PromptState:
    """Where greedy decoding starts: the prompts' key/value cache (the shared prefix, then each prompt left-padded
    to the widest), which cache columns are real tokens, each row's length (the next token's position) and the
    logits that predict each prompt's next token. Made by `encode_prompts`, or by label scoring, which encodes
    the same prompts anyway (classify.score_rows with keep_state=True)."""

    cache: object
    mask: torch.Tensor  # (rows, cache columns), 1 = a real token
    lengths: torch.Tensor  # (rows,)
    next_logits: torch.Tensor  # (rows, vocabulary)


@torch.no_grad()
def encode_prompts(model, prompts: list[list[int]], *, pad: int, prefix_len: int = 0, prefix_cache=None) -> PromptState:
    """One forward of prompts that all start with the same prefix_len tokens, whose cache is prefix_cache (from
    `encode_prefix`; a prefix/prompt-tuned model's virtual tokens come first in it, and are made here when no
    prefix is given)."""
    device = next(model.parameters()).device
    if prefix_cache is None and not prefix_len:
        prefix_cache = virtual_cache(model)
    ids, mask, positions = left_pad([p[prefix_len:] for p in prompts], pad, virtual_tokens(model) + prefix_len)
    out = decoder(model)(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        **cache_kw(expand_cache(prefix_cache, len(prompts))),
        use_cache=True,
        logits_to_keep=1,
    )  # the LM head only where needed
    return PromptState(cache_of(out), mask, mask.sum(-1), out.logits[:, -1])


def _pick(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next token per row: the most likely one, or (temperature > 0) one sampled from the softmax at that temperature
    within the smallest set of most likely tokens whose probability reaches top_p (torch's global generator)."""
    if temperature <= 0:
        return logits.argmax(-1).cpu()
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1:
        ranked, order = probs.sort(-1, descending=True)
        ranked = ranked * ((ranked.cumsum(-1) - ranked) < top_p)  # the top token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, ranked)
    return torch.multinomial(probs, 1).squeeze(-1).cpu()


# decoding drops the rows that have finished once they are a quarter of the batch or more: a short label and a long
# answer in one batch otherwise cost the long one's steps for every row (classification's answers of 1-3 tokens
# decoded beside a 10-token one; the forgetting probe's one-word answers beside a sentence)
COMPACT_AT = 4


@torch.no_grad()
def decode_greedy(
    model,
    tokenizer,
    state: PromptState,
    *,
    stop_ids: list[int],
    stop_strings: list[str] = (),
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_token=None,
) -> list[str]:
    """Answers from a PromptState (its cache is extended in place): greedy, or sampled when temperature > 0. Each
    answer stops at a stop token (not included) or a stop string (cut off). on_token(row, token id) is called for
    every token an answer gets (streaming)."""
    device = next(model.parameters()).device
    model = decoder(model)
    rows = state.mask.shape[0]
    mask, logits, cache = state.mask, state.next_logits, with_room(state.cache, max_new_tokens)
    lengths = state.lengths
    alive = list(range(rows))  # the original row of each row still in the batch
    generated: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    multi_token_stops = [s for s in stop_strings if len(tokenizer(s, add_special_tokens=False)["input_ids"]) > 1]
    stops = set(stop_ids)
    compactable = _rows_selectable(cache)
    for step in range(max_new_tokens):
        next_ids = _pick(logits, temperature, top_p)
        for i, t in zip(alive, next_ids.tolist()):
            if done[i]:
                continue
            if t in stops:
                done[i] = True
                continue
            generated[i].append(t)
            if on_token is not None:
                on_token(i, t)
            if multi_token_stops and any(s in tokenizer.decode(generated[i][-8:]) for s in multi_token_stops):
                done[i] = True
        finished = sum(done[i] for i in alive)
        if finished == len(alive) or step == max_new_tokens - 1:
            break
        if compactable and finished * COMPACT_AT >= len(alive):  # drop the finished rows: the rest go on alone
            keep = [r for r, i in enumerate(alive) if not done[i]]
            alive = [alive[r] for r in keep]
            index = torch.tensor(keep)
            mask, lengths, next_ids = mask[index], lengths[index], next_ids[index]
            cache.batch_select_indices(index.to(device))
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=torch.long)], dim=1)
        out = model(
            input_ids=next_ids[:, None].to(device),
            attention_mask=mask.to(device),
            position_ids=lengths[:, None].to(device) + step,
            **cache_kw(cache),
            use_cache=True,
        )
        logits, cache = out.logits[:, -1], cache_of(out)
    return [_cut(tokenizer.decode(g, skip_special_tokens=True), list(stop_strings)) for g in generated]


def _rows_selectable(cache) -> bool:
    """Whether every layer of the cache can drop rows (plain and sliding-window key/value layers can; a layer
    kind tunesmith has not checked is left alone, and decoding keeps every row to the end)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, DynamicLayer) for layer in layers)


def with_room(cache, extra: int):
    """The cache with room reserved for `extra` more tokens in every plain (full-attention, growing) layer, so that
    each decoding step writes its token in place instead of copying the whole cache (DynamicLayer's torch.cat):
    a decoding step 15% faster at 64 rows x 100 tokens, 30% at 36 x 450 (fp32, 2 cores), bit-identical. Other
    layer kinds (sliding windows) are left as they are."""
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(getattr(cache, "layers", None) or []):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.numel():
            cache.layers[i] = _roomy_layer().of(layer, extra)
    return cache


@functools.cache
def _roomy_layer():
    """The layer class with_room uses (defined on first use: transformers is imported only when decoding)."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A DynamicLayer whose keys/values are views of buffers with room for more tokens."""

        @classmethod
        def of(cls, layer, extra: int):
            new = cls()
            new.__dict__.update(vars(layer))  # whatever state this transformers release keeps (dtype, device, ...)
            b, h, n, d = layer.keys.shape
            new._k = layer.keys.new_empty(b, h, n + extra, d)
            new._v = layer.values.new_empty(b, h, n + extra, layer.values.shape[-1])
            new._k[:, :, :n] = layer.keys
            new._v[:, :, :n] = layer.values
            new.keys, new.values = new._k[:, :, :n], new._v[:, :, :n]
            return new

        def update(self, key_states, value_states, *args, **kwargs):
            n, m = self.keys.shape[-2], key_states.shape[-2]
            moved = self.keys.data_ptr() != self._k.data_ptr() or self.keys.shape[0] != self._k.shape[0]
            if moved or n + m > self._k.shape[-2]:  # rows selected, or out of room: grow as DynamicLayer does
                return super().update(key_states, value_states, *args, **kwargs)
            self._k[:, :, n : n + m] = key_states
            self._v[:, :, n : n + m] = value_states
            self.keys, self.values = self._k[:, :, : n + m], self._v[:, :, : n + m]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            """Keep these rows, and the room after them (DynamicLayer's would drop the room)."""
            n = self.keys.shape[-2]
            if self.keys.data_ptr() != self._k.data_ptr() or self.keys.shape[0] != self._k.shape[0]:
                return super().batch_select_indices(indices)
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    return RoomyLayer


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
    **sampling,
) -> list[str]:
    """Greedy answers to prompts (token ids) that all start with the same prefix_len tokens, whose cache is
    prefix_cache (from encode_prefix). Each answer stops at a stop token (not included) or a stop string
    (cut off). `sampling` (temperature, top_p, on_token) goes to decode_greedy."""
    pad = pad_id(tokenizer)
    state = encode_prompts(model, prompts, pad=pad, prefix_len=prefix_len, prefix_cache=prefix_cache)
    return decode_greedy(
        model, tokenizer, state, stop_ids=stop_ids, stop_strings=stop_strings, max_new_tokens=max_new_tokens, **sampling
    )


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
    ids = prompt_ids(tokenizer, renderer, messages)
    kwargs = _gen_kwargs(tokenizer, renderer, max_new_tokens, temperature, top_p, seed)
    failed: list[BaseException] = []
    if uses_prompt_learning(model):  # virtual tokens: our cached decoding (see virtual_cache), not model.generate
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)

        def run():
            greedy_batch(
                model,
                tokenizer,
                [ids],
                stop_ids=renderer.stop_token_ids,
                stop_strings=renderer.stop_strings,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                on_token=lambda _, t: streamer.put(torch.tensor([t])),
            )
            streamer.end()
    else:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        t = torch.tensor([ids], device=device)

        def run():
            model.generate(input_ids=t, attention_mask=torch.ones_like(t), streamer=streamer, **kwargs)

    def work():
        try:
            run()
        except BaseException as e:  # handed to the reader below instead of leaving it waiting for text
            failed.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failed:
        raise failed[0]


# ---- how many prompts one evaluation forward takes ----------------------------------------------------------------

MAX_ROWS = 64
MAX_FORWARD_TOKENS = 4096
FORWARD_MEMORY = 1 << 30  # bytes of keys/values and activations one no-grad evaluation forward may hold


def tokens_per_forward(model) -> int:
    """Tokens one evaluation forward may hold when `eval.batch_size` is auto: at most MAX_FORWARD_TOKENS, and each
    token's keys/values in every layer plus ~3 activations of the widest layer must fit FORWARD_MEMORY (a 1.7B
    model in fp32: ~2k tokens).

    Why 4096 (SmolLM2-135M, fp32, 2 cores): decoding reads every weight once per step, so more rows per step are
    cheaper per answer (82 ms a step for 8 rows, 125 ms for 32), and short prompts gain from up to 64 rows; but a
    forward much beyond ~4k tokens gets slower per token (36 retrieved-shot prompts of ~470 tokens scored at 420
    tokens/s against 670 for 8 of them: matmuls and elementwise ops on activations that no longer fit the caches)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", None) or 1
    hidden = getattr(config, "hidden_size", None) or 1024
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = getattr(config, "num_hidden_layers", None) or 1
    widest = max(hidden, getattr(config, "intermediate_size", None) or 4 * hidden)
    per_token = next(model.parameters()).element_size() * (2 * layers * kv_heads * head_dim + 3 * widest)
    return max(512, min(MAX_FORWARD_TOKENS, FORWARD_MEMORY // per_token))


def plan_batches(widths: list[int], batch_size: int | None, budget: int) -> list[range]:
    """Consecutive batches of rows (their fed tokens in `widths`, in the order measured): `batch_size` rows each
    when given, else as many as keep rows x the widest row within `budget` tokens (at least 1, at most MAX_ROWS)."""
    if batch_size:
        return [range(s, min(s + batch_size, len(widths))) for s in range(0, len(widths), batch_size)]
    out, start, widest = [], 0, 0
    for i, w in enumerate(widths):
        grown = max(widest, w)
        if i > start and (grown * (i - start + 1) > budget or i - start >= MAX_ROWS):
            out.append(range(start, i))
            start, grown = i, w
        widest = grown
    if start < len(widths):
        out.append(range(start, len(widths)))
    return out
