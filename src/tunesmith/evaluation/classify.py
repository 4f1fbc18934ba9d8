"""Classification by label scoring: which candidate label does the model find most likely?

For each example the prompt is encoded once; every candidate label (its tokens plus the end-of-turn token,
exactly as training renders it, so `bill` cannot win over `billing`) is then scored from the prompt's cached
keys/values. Examples are batched with left padding, so a batch of E examples and K labels costs one prompt
forward of E rows and one short forward of E*K rows. This is both faster than generating (no sampling loop)
and fairer to a base model that would answer "The category is: Billing." when asked to generate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.data.example import Example, Message


@dataclass
class LabelScores:
    prediction: str
    logprobs: dict[str, float]  # total log-probability of each label's continuation


def label_continuations(renderer, example: Example, labels: list[str]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, continuation ids per label) as training would render `prompt + label`."""
    prompt_msgs = example.prompt_messages()
    prompt = renderer.prompt_ids(prompt_msgs, add_generation_prompt=True)
    conts = []
    for label in labels:
        full = Example(kind="chat", messages=[*prompt_msgs, Message("assistant", label)], source=example.source)
        enc = renderer.encode(full, max_length=None)
        if enc.input_ids[: len(prompt)] != prompt:
            # the template tokenises differently at the boundary; score the labelled tokens of the full render
            first = next(i for i, label_id in enumerate(enc.labels) if label_id != -100)
            raise ValueError(f"prompt/continuation boundary differs from the generation prompt at token {first}")
        cont = [t for t, label_id in zip(enc.input_ids[len(prompt):], enc.labels[len(prompt):]) if label_id != -100]
        conts.append(cont)
    return prompt, conts


@torch.no_grad()
def score_labels(model, tokenizer, renderer, examples: list[Example], labels: list[str], batch_size: int = 8,
                 progress=None) -> list[LabelScores]:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[LabelScores] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoded = [label_continuations(renderer, ex, labels) for ex in chunk]
        scores = _score_chunk(model, encoded, pad, device)  # (E, K)
        for row in scores.tolist():
            best = max(range(len(labels)), key=lambda k: row[k])
            results.append(LabelScores(labels[best], dict(zip(labels, row))))
        if progress is not None:
            progress(len(chunk))
    return results


def _score_chunk(model, encoded, pad: int, device) -> torch.Tensor:
    E, K = len(encoded), len(encoded[0][1])
    P = max(len(p) for p, _ in encoded)
    prompt_ids = torch.full((E, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((E, P), dtype=torch.long)
    for e, (p, _) in enumerate(encoded):
        prompt_ids[e, P - len(p):] = torch.tensor(p)  # left padding: every prompt ends at column P-1
        prompt_mask[e, P - len(p):] = 1
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device), position_ids=prompt_pos.to(device),
        use_cache=True,
    )
    first_logp = torch.log_softmax(out.logits[:, -1].float(), -1)  # (E, V): predicts each label's first token
    cache = out.past_key_values
    _repeat_cache(cache, K)

    C = max(len(c) for _, conts in encoded for c in conts)
    cont_ids = torch.full((E * K, C), pad, dtype=torch.long)
    cont_mask = torch.zeros((E * K, C), dtype=torch.long)
    for e, (p, conts) in enumerate(encoded):
        for k, c in enumerate(conts):
            cont_ids[e * K + k, : len(c)] = torch.tensor(c)
            cont_mask[e * K + k, : len(c)] = 1
    lengths = prompt_mask.sum(-1).repeat_interleave(K)  # (E*K,)
    cont_pos = lengths[:, None] + torch.arange(C)[None, :]
    full_mask = torch.cat([prompt_mask.repeat_interleave(K, 0), cont_mask], dim=1)
    logits = model(
        input_ids=cont_ids.to(device), attention_mask=full_mask.to(device), position_ids=cont_pos.to(device),
        past_key_values=cache, use_cache=True,
    ).logits.float()
    logp = torch.log_softmax(logits, -1)  # position j predicts token j+1 of the continuation

    total = torch.zeros(E * K)
    first = first_logp.repeat_interleave(K, 0).cpu()
    logp = logp.cpu()
    for row in range(E * K):
        n = int(cont_mask[row].sum())
        ids = cont_ids[row, :n]
        s = first[row, ids[0]]
        if n > 1:
            s = s + logp[row, torch.arange(n - 1), ids[1:]].sum()
        total[row] = s
    return total.view(E, K)


def _repeat_cache(cache, k: int) -> None:
    """Repeat every layer's keys/values k times along the batch (example e -> rows e*k .. e*k+k-1)."""
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(k)
        return
    for layer in cache.layers:  # transformers >= 4.56 cache layout
        layer.keys = layer.keys.repeat_interleave(k, dim=0)
        layer.values = layer.values.repeat_interleave(k, dim=0)


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label a generated answer names: an exact (case-insensitive, trimmed) match, else the only label
    that appears as a word at the start; None when the answer names no label (counted as invalid)."""
    clean = text.strip().strip(".!\"'`*").strip().lower()
    by_lower = {label.lower(): label for label in labels}
    if clean in by_lower:
        return by_lower[clean]
    first = clean.split()[0].strip(".,:;!\"'`*") if clean.split() else ""
    return by_lower.get(first)
