"""Scoring continuations: which candidate label does the model find most likely, and how likely is a reference?

`score_continuations` is the engine. Each prompt is encoded once; every continuation of it (a candidate label,
or the reference answer) is then scored from the prompt's cached keys/values in one batched forward. Prompts
that share a prefix (system prompt, few-shot examples) reuse that prefix's cache, computed once for the whole
evaluation (`generate.encode_prefix`). So a batch of E examples and K labels costs one forward of the E prompt
tails and one short forward of E*K continuation rows: no sampling loop, and fairer to a base model that would
answer "The category is: Billing." when asked to generate.

A candidate label is scored as training renders it (its tokens plus the end-of-turn token), so `bill` cannot
win over `billing`. `full_sequence_logprobs` scores the same continuations the slow obvious way (one
right-padded forward over prompt + continuation, no cache); tests hold the two equal, and models whose
forward() adds virtual tokens (peft prefix/prompt tuning) use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.data.example import Example, Message
from tunesmith.evaluation.generate import expand_cache, left_pad, uses_prompt_learning


@dataclass
class LabelScores:
    prediction: str
    logprobs: dict[str, float]  # total log-probability of each label's continuation


def split_encoded(renderer, example: Example, prompt: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids) of a one-answer example as training renders it: the continuation is the
    trained tokens of the final answer (content + end-of-turn / EOS). For chat, `prompt` is the generation
    prompt; training's tokens must start with it."""
    enc = renderer.encode(example, max_length=None)
    if prompt is None:  # completion: the prompt is everything before the first trained token
        start = next(i for i, label in enumerate(enc.labels) if label != -100)
        return enc.input_ids[:start], enc.input_ids[start:]
    if enc.input_ids[: len(prompt)] != prompt:
        first = next(i for i, (a, b) in enumerate(zip(enc.input_ids, prompt)) if a != b)
        raise ValueError(f"prompt/continuation boundary differs from the generation prompt at token {first}")
    return prompt, [t for t, label in zip(enc.input_ids[len(prompt) :], enc.labels[len(prompt) :]) if label != -100]


def label_continuations(renderer, example: Example, labels: list[str]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, continuation ids per label) as training would render `prompt + label`."""
    prompt_msgs = example.prompt_messages()
    prompt = renderer.prompt_ids(prompt_msgs, add_generation_prompt=True)
    conts = []
    for label in labels:
        full = Example(kind="chat", messages=[*prompt_msgs, Message("assistant", label)], source=example.source)
        conts.append(split_encoded(renderer, full, prompt)[1])
    return prompt, conts


@torch.no_grad()
def score_continuations(
    model,
    prompts: list[list[int]],
    continuations: list[list[list[int]]],
    *,
    pad: int,
    prefix_len: int = 0,
    prefix_cache=None,
) -> list[list[tuple[float, int]]]:
    """For each prompt, (total log-probability, tokens) of each of its continuations given the prompt.

    All prompts start with the same prefix_len tokens whose cache is prefix_cache (or prefix_len = 0).
    One call is one batch: the caller chooses its size.

    One forward does it all: row e holds prompt e's tail followed by all its continuations side by side
    (each continuation minus its last token, which is predicted, never fed), and a 4D mask lets every
    continuation see the prefix, the prompt and its own earlier tokens only, with positions that restart after
    the prompt for each continuation. Nothing is copied per label. Models whose custom masks would be wrong
    (sliding-window layers, attention kernels without 4D masks) take `_score_with_copies`; peft prefix/prompt
    tuning takes `full_sequence_logprobs`."""
    if uses_prompt_learning(model):
        return [full_sequence_logprobs(model, p, c, pad=pad) for p, c in zip(prompts, continuations)]
    from tunesmith.models.functional import mask_for, takes_custom_masks

    if not takes_custom_masks(model)[0]:
        return _score_with_copies(
            model, prompts, continuations, pad=pad, prefix_len=prefix_len, prefix_cache=prefix_cache
        )
    device = next(model.parameters()).device
    layouts = []  # per row: tokens, positions, tail length, [(start column, continuation)]
    for prompt, conts in zip(prompts, continuations):
        tail = prompt[prefix_len:]
        tokens, positions, spans = list(tail), list(range(prefix_len, len(prompt))), []
        for c in conts:
            spans.append((len(tokens), c))
            tokens += c[:-1]
            positions += range(len(prompt), len(prompt) + len(c) - 1)
        layouts.append((tokens, positions, len(tail), spans))
    width = max(len(t) for t, *_ in layouts)
    rows = len(layouts)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    mask = torch.zeros((rows, 1, width, prefix_len + width), dtype=torch.bool)
    keep = torch.zeros((rows, width), dtype=torch.bool)
    mask[:, :, :, :prefix_len] = True
    for r, (tokens, positions, n_tail, spans) in enumerate(layouts):
        off = width - len(tokens)  # left padding: a padded query sees only itself (no fully masked row)
        ids[r, off:] = torch.tensor(tokens, dtype=torch.long)
        pos[r, off:] = torch.tensor(positions, dtype=torch.long)
        m = mask[r, 0, :, prefix_len:]
        m[range(off), range(off)] = True
        tail = slice(off, off + n_tail)
        m[tail, tail] = torch.ones(n_tail, n_tail, dtype=torch.bool).tril()
        keep[r, off + n_tail - 1] = True  # predicts every continuation's first token
        for start, c in spans:
            n = len(c) - 1
            if n:
                own = slice(off + start, off + start + n)
                m[own, tail] = True
                m[own, own] = torch.ones(n, n, dtype=torch.bool).tril()
                keep[r, own] = True
    logits = model(
        input_ids=ids.to(device),
        position_ids=pos.to(device),
        attention_mask=mask_for(model, mask.to(device)),
        past_key_values=expand_cache(prefix_cache, rows),
        use_cache=prefix_cache is not None,
        logits_to_keep=keep.to(device),
    ).logits
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), -1).cpu()
    # logp rows follow keep in row-major order: per row, the prompt's last position, then each continuation's
    result: list[list[tuple[float, int]]] = []
    at = 0
    for *_, spans in layouts:
        first = logp[at]
        at += 1
        row = []
        for _, c in spans:
            n = len(c) - 1
            total = float(first[c[0]])
            if n:
                total += float(logp[at : at + n][torch.arange(n), torch.tensor(c[1:])].sum())
            at += n
            row.append((total, len(c)))
        result.append(row)
    return result


@torch.no_grad()
def _score_with_copies(model, prompts, continuations, *, pad: int, prefix_len: int = 0, prefix_cache=None):
    """score_continuations for models that take no custom 4D mask: one forward of the prompts, then one of
    every (prompt, continuation) row from a copy of its prompt's cache."""
    device = next(model.parameters()).device
    ids, mask, positions = left_pad([p[prefix_len:] for p in prompts], pad, prefix_len)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        past_key_values=expand_cache(prefix_cache, len(prompts)),
        use_cache=True,
        logits_to_keep=1,
    )
    first_logp = torch.log_softmax(out.logits[:, -1].float(), -1).cpu()  # predicts each continuation's 1st token

    rows = [(e, c) for e, conts in enumerate(continuations) for c in conts]
    owner = torch.tensor([e for e, _ in rows])
    totals = [float(first_logp[e, c[0]]) for e, c in rows]
    width = max(len(c) for _, c in rows) - 1  # the last token of a continuation is predicted, never fed
    if width > 0:
        cont_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        cont_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, c) in enumerate(rows):
            cont_ids[r, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            cont_mask[r, : len(c) - 1] = 1
        cache = out.past_key_values
        cache.batch_select_indices(owner.to(device))
        lengths = mask.sum(-1)[owner]
        logits = model(
            input_ids=cont_ids.to(device),
            attention_mask=torch.cat([mask[owner], cont_mask], 1).to(device),
            position_ids=(lengths[:, None] + torch.arange(width)[None, :]).to(device),
            past_key_values=cache,
            use_cache=True,
        ).logits
        for r, (_, c) in enumerate(rows):
            n = len(c) - 1
            if n:  # position j predicts token j+1 of the continuation
                logp = torch.log_softmax(logits[r, :n].float(), -1)
                totals[r] += float(
                    logp[torch.arange(n, device=logp.device), torch.tensor(c[1:], device=logp.device)].sum()
                )
    result: list[list[tuple[float, int]]] = [[] for _ in prompts]
    for (e, c), total in zip(rows, totals):
        result[e].append((total, len(c)))
    return result


@torch.no_grad()
def full_sequence_logprobs(
    model, prompt: list[int], continuations: list[list[int]], *, pad: int
) -> list[tuple[float, int]]:
    """The reference computation: each prompt + continuation as one right-padded sequence, no cache."""
    device = next(model.parameters()).device
    seqs = [prompt + c for c in continuations]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1).cpu()
    out = []
    for i, c in enumerate(continuations):
        at = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c))
        out.append((float(logp[i, at, torch.tensor(c)].sum()), len(c)))
    return out


def score_labels(
    model, tokenizer, renderer, examples: list[Example], labels: list[str], batch_size: int = 8, progress=None
) -> list[LabelScores]:
    """The most likely label of each chat example (prompt rendered by `renderer`), batched."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[LabelScores] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoded = [label_continuations(renderer, ex, labels) for ex in chunk]
        scores = score_continuations(model, [p for p, _ in encoded], [c for _, c in encoded], pad=pad)
        for row in scores:
            totals = [s for s, _ in row]
            best = max(range(len(labels)), key=lambda k: totals[k])
            results.append(LabelScores(labels[best], dict(zip(labels, totals))))
        if progress is not None:
            progress(len(chunk))
    return results


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label a generated answer names: an exact (case-insensitive, trimmed) match, else the only label
    that appears as a word at the start; None when the answer names no label (counted as invalid)."""
    clean = text.strip().strip(".!\"'`*").strip().lower()
    by_lower = {label.lower(): label for label in labels}
    if clean in by_lower:
        return by_lower[clean]
    first = clean.split()[0].strip(".,:;!\"'`*") if clean.split() else ""
    return by_lower.get(first)
