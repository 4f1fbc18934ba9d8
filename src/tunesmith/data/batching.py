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

Every batch carries `keep`: a boolean (B, T) mask of the positions whose *next* token is labelled. The loop
passes it as `logits_to_keep`, so the LM head and the loss run only where there is something to learn
(for classification data that is a few positions out of ~80; the LM head is ~20% of a small model's compute).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tunesmith.data.templates import Encoded

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T) for padded layouts; None when packed
    keep: torch.Tensor  # (B, T) bool: positions whose next token has a label
    targets: torch.Tensor  # (n_keep,) the labels those positions predict, in keep's row-major order
    n_examples: int
    n_tokens: int  # real (non-padding) tokens

    @property
    def n_targets(self) -> int:
        return int(self.targets.numel())

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.position_ids), move(self.attention_mask), move(self.keep),
            move(self.targets), self.n_examples, self.n_tokens,
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
    examples: list[Encoded], mode: str, micro_batch_size: int, pad_id: int, row_tokens: int
) -> list[Batch]:
    """The micro-batches of one optimizer step."""
    if mode == "pack":
        return _packed(examples, micro_batch_size, pad_id, row_tokens)
    if mode == "group":
        # sort a step's examples by length so each micro-batch pads as little as possible
        examples = sorted(examples, key=lambda e: -len(e.input_ids))
    return [
        _padded(examples[i : i + micro_batch_size], pad_id) for i in range(0, len(examples), micro_batch_size)
    ]


def _targets_and_keep(rows_labels: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.zeros(len(rows_labels), width, dtype=torch.bool)
    targets: list[int] = []
    for r, labels in enumerate(rows_labels):
        for p in range(len(labels) - 1):
            if labels[p + 1] != IGNORE:
                keep[r, p] = True
                targets.append(labels[p + 1])
    return keep, torch.tensor(targets, dtype=torch.long)


def _padded(examples: list[Encoded], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows_labels = []
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        mask[r, :n] = 1
        rows_labels.append(list(e.labels) + [IGNORE] * (width - n))
    keep, targets = _targets_and_keep(rows_labels, width)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids, positions, mask, keep, targets, len(examples), int(mask.sum()))


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


def _packed(examples: list[Encoded], micro_batch_size: int, pad_id: int, row_tokens: int) -> list[Batch]:
    batches = []
    for start in range(0, len(examples), micro_batch_size):
        group = examples[start : start + micro_batch_size]
        rows = pack_rows([len(e.input_ids) for e in group], max(row_tokens, max(len(e.input_ids) for e in group)))
        width = max(sum(len(group[i].input_ids) for i in row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        rows_labels = []
        n_tokens = 0
        for r, row in enumerate(rows):
            labels: list[int] = []
            at = 0
            for i in row:
                e = group[i]
                n = len(e.input_ids)
                ids[r, at : at + n] = torch.tensor(e.input_ids)
                pos[r, at : at + n] = torch.arange(n)
                # position 0 of an example is never a target inside the example; in a packed row it would be
                # the target of the previous example's last token, so it is masked to keep examples apart
                labels += [IGNORE] + list(e.labels[1:n])
                at += n
            n_tokens += at
            pos[r, at:] = torch.arange(width - at)
            labels += [IGNORE] * (width - at)
            rows_labels.append(labels)
        keep, targets = _targets_and_keep(rows_labels, width)
        batches.append(Batch(ids, pos, None, keep, targets, len(group), n_tokens))
    return batches
