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
from tunesmith.models.kv import cache_kw, cache_of
from tunesmith.models.util import pad_id


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


@dataclass
class Scored:
    """What score_rows returns: per prompt, (total log-probability, tokens) of each continuation; the same for each
    side prompt; and (keep_state) the prompts' PromptState, from which greedy decoding can continue."""

    scores: list[list[tuple[float, int]]]
    side: list[list[list[tuple[float, int]]]] | None = None
    state: object = None


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
    """For each prompt, (total log-probability, tokens) of each of its continuations given the prompt (score_rows)."""
    return score_rows(model, prompts, continuations, pad=pad, prefix_len=prefix_len, prefix_cache=prefix_cache).scores


@torch.no_grad()
def score_rows(
    model,
    prompts: list[list[int]],
    continuations: list[list[list[int]]],
    *,
    pad: int,
    prefix_len: int = 0,
    prefix_cache=None,
    side: list[list[tuple[list[int], list[list[int]]]]] | None = None,
    keep_state: bool = False,
) -> Scored:
    """For each prompt, (total log-probability, tokens) of each of its continuations given the prompt.

    All prompts start with the same prefix_len tokens whose cache is prefix_cache (or prefix_len = 0).
    One call is one batch: the caller chooses its size.

    One forward does it all: row e holds prompt e's tail (left-padded to the widest tail), then all its
    continuations side by side (each minus its last token, which is predicted, never fed), and a 4D mask lets every
    continuation see the prefix, the prompt and its own earlier tokens only, with positions that restart after the
    prompt for each continuation. Nothing is copied per label.

    side: per prompt, more (prompt, continuations) pairs that share a beginning with it (contextual calibration's
    content-free input in the same retrieved shots): each is laid out after the row's own continuations as a branch
    that sees the row's tokens up to where the two prompts differ, so the shared shots are encoded once.

    keep_state: also return the prompts' PromptState (their cache cut after the tails, which no continuation column
    touched), so that greedy generation continues without encoding the prompts again.

    Models whose custom masks would be wrong (sliding-window layers, attention kernels without 4D masks) take
    `_score_with_copies`; peft prefix/prompt tuning takes `full_sequence_logprobs` (and neither keeps a state
    when there are side prompts)."""
    if uses_prompt_learning(model):
        return Scored(
            [full_sequence_logprobs(model, p, c, pad=pad) for p, c in zip(prompts, continuations)],
            _side_alone(model, side, pad, 0, None) if side is not None else None,
        )
    from tunesmith.models.functional import mask_for, takes_custom_masks

    if not takes_custom_masks(model)[0]:
        scores, state = _score_with_copies(
            model,
            prompts,
            continuations,
            pad=pad,
            prefix_len=prefix_len,
            prefix_cache=prefix_cache,
            keep_state=keep_state,
        )
        extra = _side_alone(model, side, pad, prefix_len, prefix_cache) if side is not None else None
        return Scored(scores, extra, state)
    device = next(model.parameters()).device
    trunks = [p[prefix_len:] for p in prompts]
    if not all(trunks):
        raise ValueError("every prompt needs at least one token after the shared prefix")
    trunk_width = max(map(len, trunks))
    # per row: its branches as (trunk tokens seen, own prompt tokens, continuations); the first is the prompt's own
    rows = []
    for r, (trunk, conts) in enumerate(zip(trunks, continuations)):
        branches = [(len(trunk), [], conts)]
        for other, other_conts in side[r] if side is not None else []:
            if len(other) <= prefix_len or other[:prefix_len] != prompts[r][:prefix_len]:
                raise ValueError("a side prompt must continue the shared prefix with at least one token")
            tail, seen = other[prefix_len:], 0
            while seen < min(len(trunk), len(tail) - 1) and trunk[seen] == tail[seen]:
                seen += 1
            branches.append((seen, tail[seen:], other_conts))
        rows.append(branches)
    # columns: [0, trunk_width) the left-padded trunk; then per branch its own tokens and continuations, right-padded
    layouts, width = [], trunk_width
    for branches in rows:
        at, placed = trunk_width, []
        for seen, own, conts in branches:
            spans = []
            own_at = at
            at += len(own)
            for c in conts:
                spans.append((at, c))
                at += len(c) - 1
            placed.append((seen, own_at, own, spans))
        layouts.append(placed)
        width = max(width, at)
    n = len(rows)
    ids = torch.full((n, width), pad, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, 1, width, prefix_len + width), dtype=torch.bool)
    keep = torch.zeros((n, width), dtype=torch.bool)
    mask[:, :, :, :prefix_len] = True
    idx = torch.arange(width)
    mask[:, 0, idx, prefix_len + idx] = True  # every column sees itself (padding sees nothing else)
    first_col = []  # per row, per branch: the column whose logits predict each continuation's first token
    for r, (trunk, placed) in enumerate(zip(trunks, layouts)):
        off = trunk_width - len(trunk)
        ids[r, off:trunk_width] = torch.tensor(trunk, dtype=torch.long)
        pos[r, off:trunk_width] = torch.arange(prefix_len, prefix_len + len(trunk))
        m = mask[r, 0, :, prefix_len:]
        m[off:trunk_width, off:trunk_width] = torch.ones(len(trunk), len(trunk), dtype=torch.bool).tril()
        keep[r, trunk_width - 1] = True  # the prompt's next token (generation starts from it)
        cols = []
        for seen, own_at, own, spans in placed:
            seen_cols = slice(off, off + seen)
            start = prefix_len + seen
            if own:
                o = slice(own_at, own_at + len(own))
                ids[r, o] = torch.tensor(own, dtype=torch.long)
                pos[r, o] = torch.arange(start, start + len(own))
                m[o, seen_cols] = True
                m[o, o] = torch.ones(len(own), len(own), dtype=torch.bool).tril()
                cols.append(own_at + len(own) - 1)
            else:
                cols.append(off + seen - 1)
            keep[r, cols[-1]] = True
            after = start + len(own)
            for col, c in spans:
                k = len(c) - 1
                if k:
                    s = slice(col, col + k)
                    ids[r, s] = torch.tensor(c[:-1], dtype=torch.long)
                    pos[r, s] = torch.arange(after, after + k)
                    m[s, seen_cols] = True
                    if own:
                        m[s, own_at : own_at + len(own)] = True
                    m[s, s] = torch.ones(k, k, dtype=torch.bool).tril()
                    keep[r, s] = True
        first_col.append(cols)
    out = model(
        input_ids=ids.to(device),
        position_ids=pos.to(device),
        attention_mask=mask_for(model, mask.to(device)),
        **cache_kw(expand_cache(prefix_cache, n)),
        use_cache=keep_state or prefix_cache is not None,
        logits_to_keep=keep.to(device),
    )
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    at_kept = torch.full((n, width), -1, dtype=torch.long)
    at_kept[keep] = torch.arange(int(keep.sum()))  # logits rows follow keep in row-major order
    logp = torch.log_softmax(logits.float(), -1).cpu()
    scores, extra = [], []
    for r, placed in enumerate(layouts):
        per_branch = []
        for (*_, spans), col in zip(placed, first_col[r]):
            first = logp[at_kept[r, col]]
            got = []
            for col0, c in spans:
                k = len(c) - 1
                total = float(first[c[0]])
                if k:
                    total += float(logp[at_kept[r, col0 : col0 + k], torch.tensor(c[1:])].sum())
                got.append((total, len(c)))
            per_branch.append(got)
        scores.append(per_branch[0])
        extra.append(per_branch[1:])
    state = None
    if keep_state:
        from tunesmith.evaluation.generate import PromptState

        cache = cache_of(out)
        extra_columns = cache.get_seq_length() - (prefix_len + trunk_width)
        if extra_columns:  # the continuation columns go; the prompts' keys/values stay
            cache.crop(-extra_columns)  # negative: tokens to remove, in every transformers version
        tmask = torch.zeros((n, trunk_width), dtype=torch.long)
        for r, trunk in enumerate(trunks):
            tmask[r, trunk_width - len(trunk) :] = 1
        full = torch.cat([torch.ones((n, prefix_len), dtype=torch.long), tmask], 1)
        state = PromptState(cache, full, full.sum(-1), logits[at_kept[:, trunk_width - 1].to(logits.device)].float())
    return Scored(scores, extra if side is not None else None, state)


def _side_alone(model, side, pad, prefix_len, prefix_cache) -> list[list[list[tuple[float, int]]]]:
    """Side prompts scored as prompts of their own (paths that cannot share their beginning)."""
    flat = [(p, c) for row in side for p, c in row]
    got = (
        score_continuations(
            model, [p for p, _ in flat], [c for _, c in flat], pad=pad, prefix_len=prefix_len, prefix_cache=prefix_cache
        )
        if flat
        else []
    )
    out, at = [], 0
    for row in side:
        out.append(got[at : at + len(row)])
        at += len(row)
    return out


@torch.no_grad()
def _score_with_copies(
    model, prompts, continuations, *, pad: int, prefix_len: int = 0, prefix_cache=None, keep_state: bool = False
):
    """(scores, PromptState or None) as score_rows gives them, for models that take no custom 4D mask: one forward
    of the prompts, then one of every (prompt, continuation) row from a copy of its prompt's cache."""
    import copy

    from tunesmith.evaluation.generate import PromptState

    device = next(model.parameters()).device
    ids, mask, positions = left_pad([p[prefix_len:] for p in prompts], pad, prefix_len)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        **cache_kw(expand_cache(prefix_cache, len(prompts))),
        use_cache=True,
        logits_to_keep=1,
    )
    state = None
    if keep_state:
        state = PromptState(copy.deepcopy(cache_of(out)), mask, mask.sum(-1), out.logits[:, -1].float())
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
        cache = cache_of(out)
        cache.batch_select_indices(owner.to(device))
        lengths = mask.sum(-1)[owner]
        logits = model(
            input_ids=cont_ids.to(device),
            attention_mask=torch.cat([mask[owner], cont_mask], 1).to(device),
            position_ids=(lengths[:, None] + torch.arange(width)[None, :]).to(device),
            **cache_kw(cache),
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
    return result, state


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
    pad = pad_id(tokenizer)
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
