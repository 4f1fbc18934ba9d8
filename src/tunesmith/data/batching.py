"""Turning encoded examples into the tensors of one optimizer step.

An optimizer step always consumes `batch_size` examples (the effective batch), whatever the layout:

- pack: the step's examples are packed, first-fit decreasing, into rows of at most `row_tokens` tokens with
  per-example position ids that restart at 0. transformers (>= 4.56) sees restarting position ids with no
  attention mask and builds a block-diagonal causal mask, so no example attends to another and there is no
  padding at all. Rows shorter than the longest are filled with a tail of pad tokens that form their own
  "sequence" (positions 0..k): they attend only among themselves and carry no labels.
- pad: examples in their shuffled order, padded on the right to the longest in the micro-batch, with an
  attention mask (what Hugging Face Trainer does with dynamic padding).
- group: like pad, but each step's examples are taken from a length-sorted window so a micro-batch holds
  examples of similar length (Trainer's group_by_length).

- pack with a shared prefix (`share_prefix=True`): when every example of a micro-batch starts with the same
  tokens (the system prompt of chat data), the prefix is cut off and carried once as `prefix_ids`; only the
  suffixes are packed. `attention_mask` is then a 4D boolean (R, 1, T, L + T) mask: each suffix token sees
  the whole prefix and the earlier tokens of its own example. training/prefix.py runs the prefix once and
  lets every row attend to its keys/values. The prefix stops before the first position whose next token is
  labelled, so no label falls inside it.

Every batch carries `keep`: a boolean (B, T) mask of the positions whose *next* token is labelled. The loop
passes it as `logits_to_keep`, so the LM head and the loss run only where there is something to learn
(for classification data that is a few positions out of ~80; the LM head is ~20% of a small model's compute).

Tokens after the position that predicts an example's last label are not fed at all (`_span`): nothing is
predicted from them and, attention being causal, nothing attends to them, so they change neither loss nor
gradients. For chat data that is the last label itself (the end-of-turn token) and the template's newline
after it. Each position's target is stored with it, so examples never need a neighbour's slot. `n_tokens`
still counts every token of the data (that is the work a user asked for).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tunesmith.models.segments import Segment, consecutive

if TYPE_CHECKING:
    from tunesmith.data.templates import Encoded

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T) padded; None packed; (B, 1, T, L + T) bool with a shared prefix
    keep: torch.Tensor  # (B, T) bool: positions whose next token has a label
    targets: torch.Tensor  # (n_keep,) the labels those positions predict, in keep's row-major order
    n_examples: int
    n_tokens: int  # real (non-padding) tokens, the shared prefix counted once per example
    prefix_ids: torch.Tensor | None = None  # (1, L) tokens every example of the batch starts with
    # packed rows: where each example lies in its row (after the prefix), for attention per example
    segments: list[Segment] | None = None

    @property
    def n_targets(self) -> int:
        return int(self.targets.numel())

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.attention_mask),
            move(self.keep),
            move(self.targets),
            self.n_examples,
            self.n_tokens,
            move(self.prefix_ids),
            self.segments,
        )


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so a resumed run
    replays exactly the order it would have seen."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def step_indices(
    lengths: list[int], batch_size: int, seed: int, epoch: int, mode: str = "pack", window: int = 50
) -> list[list[int]]:
    """Split one epoch into optimizer steps (lists of example indices)."""
    order = epoch_order(len(lengths), seed, epoch)
    if mode == "group":
        # sort within windows of `window` steps, then shuffle the steps: similar lengths share a step
        span = batch_size * window
        chunks = []
        for start in range(0, len(order), span):
            part = sorted(order[start : start + span], key=lambda i: -lengths[i])
            chunks += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
        random.Random(f"{seed}:{epoch}:steps").shuffle(chunks)
        return chunks
    return [order[j : j + batch_size] for j in range(0, len(order), batch_size)]


def make_batches(
    examples: list[Encoded],
    mode: str,
    micro_batch_size: int,
    pad_id: int,
    row_tokens: int,
    share_prefix: int = 0,
    shared_row_tokens: int | None = None,
    width_multiple: int = 1,
) -> list[Batch]:
    """The micro-batches of one optimizer step. With mode "pack" and share_prefix > 0, a micro-batch whose
    examples share a prefix of at least `share_prefix` tokens gets the shared-prefix layout, in rows of
    `shared_row_tokens` (prefix included; default row_tokens). `width_multiple`: rows padded at the tail to a
    width (with the shared prefix in front of them: a prefix + width) that is a multiple of it (round_width)."""
    if mode == "pack":
        batches = []
        for start in range(0, len(examples), micro_batch_size):
            group = examples[start : start + micro_batch_size]
            n = shared_prefix_length(group) if share_prefix else 0
            if n >= share_prefix > 0 and len(group) > 1:
                batches.append(_prefix_packed(group, n, pad_id, shared_row_tokens or row_tokens, width_multiple))
            else:
                batches.append(_packed(group, pad_id, row_tokens, width_multiple))
        return batches
    if mode == "group":
        # sort a step's examples by length so each micro-batch pads as little as possible
        examples = sorted(examples, key=lambda e: -len(e.input_ids))
    return [
        _padded(examples[i : i + micro_batch_size], pad_id, width_multiple)
        for i in range(0, len(examples), micro_batch_size)
    ]


def round_width(width: int, multiple: int, offset: int = 0) -> int:
    """The smallest w >= width with offset + w a multiple of `multiple` (1: width itself).

    Why: oneDNN compiles and caches kernels for every matrix shape it meets, and in bf16 on a CPU that memory is
    not given back: packed rows of a new width every step grew a bf16-mixed demo run from 1.6 to 2.7 GB over 63
    steps (fp32 matmuls do not grow). Widths in steps of 16 bound the shapes a run meets, for at most 15 padding
    tokens a row (bench/RESULTS.md run 20)."""
    if multiple <= 1:
        return width
    return width + (-(offset + width)) % multiple


def _span(e: Encoded, start: int = 0) -> tuple[list[int], list[int]]:
    """(input tokens, the label each of them predicts) of example e from `start` on, ending at the position
    that predicts its last label (an example without labels is kept whole)."""
    last = max((p for p, t in enumerate(e.labels) if t != IGNORE), default=len(e.input_ids))
    end = max(last, start + 1)
    return list(e.input_ids[start:end]), list(e.labels[start + 1 : end + 1]) + [IGNORE] * (end + 1 - len(e.labels))


def _targets_and_keep(rows_next: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keep and targets from rows of next-token labels aligned with the input positions."""
    keep = torch.zeros(len(rows_next), width, dtype=torch.bool)
    targets: list[int] = []
    for r, nxt in enumerate(rows_next):
        for p, label in enumerate(nxt):
            if label != IGNORE:
                keep[r, p] = True
                targets.append(label)
    return keep, torch.tensor(targets, dtype=torch.long)


def _padded(examples: list[Encoded], pad_id: int, width_multiple: int = 1) -> Batch:
    spans = [_span(e) for e in examples]
    width = round_width(max(len(ids) for ids, _ in spans), width_multiple)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, (tokens, _) in enumerate(spans):
        ids[r, : len(tokens)] = torch.tensor(tokens)
        mask[r, : len(tokens)] = 1
    keep, targets = _targets_and_keep([nxt for _, nxt in spans], width)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, positions, mask, keep, targets, len(examples), sum(len(e.input_ids) for e in examples))


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """First-fit decreasing bin packing of example indices into rows of at most row_tokens tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_tokens - lengths[i])
    return rows


def _packed(group: list[Encoded], pad_id: int, row_tokens: int, width_multiple: int = 1) -> Batch:
    spans = [_span(e) for e in group]
    lengths = [len(ids) for ids, _ in spans]
    rows = pack_rows(lengths, max(row_tokens, max(lengths)))
    width = round_width(max(sum(lengths[i] for i in row) for row in rows), width_multiple)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    rows_next = []
    segments = consecutive([[lengths[i] for i in row] for row in rows])
    for r, row in enumerate(rows):
        nxt: list[int] = []
        at = 0
        for i in row:
            tokens, targets = spans[i]
            n = len(tokens)
            ids[r, at : at + n] = torch.tensor(tokens)
            pos[r, at : at + n] = torch.arange(n)
            nxt += targets
            at += n
        pos[r, at:] = torch.arange(width - at)
        rows_next.append(nxt + [IGNORE] * (width - at))
    keep, targets = _targets_and_keep(rows_next, width)
    return Batch(ids, pos, None, keep, targets, len(group), sum(len(e.input_ids) for e in group), None, segments)


def shared_prefix_length(group: list[Encoded]) -> int:
    """Tokens every example of `group` starts with, stopped before the first position that predicts a label
    (so no logits are needed inside the prefix) and leaving every example at least one token of its own."""
    first = group[0].input_ids
    n = min(len(e.input_ids) for e in group) - 1
    for e in group:
        labelled = next((p for p, t in enumerate(e.labels) if t != IGNORE), len(e.labels))
        n = min(n, labelled - 1)  # position labelled-1 predicts the first label: it must be a suffix position
        ids = e.input_ids
        i = 0
        while i < n and ids[i] == first[i]:
            i += 1
        n = i
        if n <= 0:
            return 0
    return max(n, 0)


def _prefix_packed(
    group: list[Encoded], prefix_len: int, pad_id: int, row_tokens: int, width_multiple: int = 1
) -> Batch:
    """Suffixes (what follows the shared prefix) packed into rows; a 4D mask lets each see the prefix and
    its own earlier tokens only. Positions continue from prefix_len, as if each example were whole."""
    L = prefix_len
    spans = [_span(e, L) for e in group]  # the prefix predicts no label: it stops before the first one
    lengths = [len(ids) for ids, _ in spans]
    rows = pack_rows(lengths, max(row_tokens - L, max(lengths)))
    width = round_width(max(sum(lengths[i] for i in row) for row in rows), width_multiple, L)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.full((len(rows), width), L, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    rows_next = []
    for r, row in enumerate(rows):
        nxt: list[int] = []
        at = 0
        for i in row:
            tokens, targets = spans[i]
            n = lengths[i]
            ids[r, at : at + n] = torch.tensor(tokens)
            pos[r, at : at + n] = torch.arange(L, L + n)
            segment[r, at : at + n] = i
            nxt += targets
            at += n
        rows_next.append(nxt + [IGNORE] * (width - at))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    # tail padding (segment -1) sees only itself, so no attention row is empty (an empty row gives NaN)
    own = same & causal & ((segment[:, :, None] >= 0) | torch.eye(width, dtype=torch.bool))
    mask = torch.cat([torch.ones(len(rows), width, L, dtype=torch.bool), own], dim=2)[:, None]
    keep, targets = _targets_and_keep(rows_next, width)
    prefix = torch.tensor([group[0].input_ids[:L]], dtype=torch.long)
    n_tokens = sum(len(e.input_ids) for e in group)
    segments = consecutive([[lengths[i] for i in row] for row in rows])
    return Batch(ids, pos, mask, keep, targets, len(group), n_tokens, prefix, segments)
