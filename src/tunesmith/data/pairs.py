"""Preference pairs as the tensors of one forward pass: each pair's prompt fed once, both answers scored on it.

A pair is a prompt P and two answers C (chosen) and R (rejected); what preference objectives need is
log p(C | P) and log p(R | P), summed over the answers' trained tokens. Scoring the two sequences P+C and P+R,
as TRL does (it concatenates chosen and rejected into one batch), feeds the prompt twice. Here a pair is laid out
as a tree in one row segment:

    tokens     P0 P1 ... Pp-1 | C0 ... Cc-2 | R0 ... Rr-2
    positions  0  1  ... p-1  | p  ... p+c-2 | p  ... p+r-2
    sees       causal prompt  | prompt + own earlier answer tokens (never the other answer)

with a 4D boolean attention mask. Each answer's last token is predicted, never fed; its first token is
predicted from the prompt's last position, which both answers share. Every position sees exactly the tokens it
would see in its own full sequence, at the same position ids, so the log-probabilities are those of the two
full sequences (to float rounding; tests/test_preference.py) for about (p + c + r) / (2p + c + r) of the work.
Several pairs are packed into a row (first-fit decreasing, as for SFT); padding at a row's end sees only itself.

Models whose attention cannot take a custom 4D mask (sliding-window layers; see models.functional) use the
`shared=False` layout: P+C and P+R as two packed sequences with restarting position ids, like SFT packing.

A batch's targets say which kept position predicts which token of which sequence: sequence 2i is pair i's
chosen answer, 2i+1 its rejected one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tunesmith.data.batching import pack_rows, round_width
from tunesmith.models.segments import Segment

if TYPE_CHECKING:
    from tunesmith.data.templates import EncodedPair

IGNORE = -100


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, 1, T, T) bool (shared layout); None: packed by position ids
    keep: torch.Tensor  # (B, T) bool: positions whose logits are needed
    target_slot: torch.Tensor  # (n,) index of the predicting position among keep's True entries (row-major)
    target_token: torch.Tensor  # (n,) the token it predicts
    target_seq: torch.Tensor  # (n,) 2 * pair + (0 chosen, 1 rejected)
    n_pairs: int
    n_tokens: int  # tokens of the two sequences of every pair (prompt counted twice): the work a user asks for
    prefix_ids: torch.Tensor | None = None  # (1, L) prompt tokens every pair of the batch starts with, fed once
    segments: list[Segment] | None = None  # the prompts and answers in their rows, for attention per segment

    def to(self, device) -> "PairBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PairBatch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.attention_mask),
            move(self.keep),
            move(self.target_slot),
            move(self.target_token),
            move(self.target_seq),
            self.n_pairs,
            self.n_tokens,
            move(self.prefix_ids),
            self.segments,
        )

    @property
    def tokens_per_seq(self) -> torch.Tensor:
        """(2 * n_pairs,) trained answer tokens of each sequence."""
        return torch.bincount(self.target_seq, minlength=2 * self.n_pairs)


def _segments(
    pair: EncodedPair, shared: bool, skip: int = 0
) -> list[tuple[list[int], list[int], list[tuple[int, int, int]]]]:
    """The row segments of one pair: (tokens, positions, [(offset in segment, token, side)]) — each target is
    the token predicted at that offset. Shared: one segment (the tree), without the first `skip` prompt tokens
    (the batch's common prefix, fed apart); else one per answer."""
    p = len(pair.prompt)
    sides = ((pair.chosen, pair.chosen_labels), (pair.rejected, pair.rejected_labels))
    if shared:
        tokens, positions, targets = list(pair.prompt[skip:]), list(range(skip, p)), []
        for side, (answer, labels) in enumerate(sides):
            start = len(tokens)  # where this answer's fed tokens (all but its last) begin
            for j, label in enumerate(labels):
                if label != IGNORE:
                    targets.append((p - skip - 1 if j == 0 else start + j - 1, label, side))
            tokens += answer[:-1]
            positions += range(p, p + len(answer) - 1)
        return [(tokens, positions, targets)]
    out = []
    for side, (answer, labels) in enumerate(sides):
        tokens = list(pair.prompt) + answer[:-1]
        targets = [(p + j - 1, label, side) for j, label in enumerate(labels) if label != IGNORE]
        out.append((tokens, list(range(len(tokens))), targets))
    return out


def make_pair_batches(
    pairs: list[EncodedPair],
    micro_batch_size: int,
    pad_id: int,
    row_tokens: int,
    shared: bool = True,
    share_prefix: int = 0,
    width_multiple: int = 1,
) -> list[PairBatch]:
    """The micro-batches of one optimizer step: `micro_batch_size` pairs each, packed into rows of at most
    `row_tokens` tokens (a row is never narrower than the longest segment it must hold). With `shared` and
    share_prefix > 0, prompt tokens that every pair of a micro-batch starts with (a system prompt), when at least
    share_prefix of them, are cut off and carried once as `prefix_ids` (training/prefix.py feeds them once).
    `width_multiple`: rows padded as data.batching.round_width says."""
    return [
        _batch(pairs[i : i + micro_batch_size], pad_id, row_tokens, shared, share_prefix, width_multiple)
        for i in range(0, len(pairs), micro_batch_size)
    ]


def common_prompt_prefix(pairs: list[EncodedPair]) -> int:
    """Prompt tokens every pair starts with, leaving each pair at least its last prompt token (which predicts the
    first answer token, so it must be fed in the pair's own row)."""
    first = pairs[0].prompt
    n = min(len(p.prompt) for p in pairs) - 1
    for p in pairs[1:]:
        i = 0
        while i < n and p.prompt[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _batch(
    pairs: list[EncodedPair], pad_id: int, row_tokens: int, shared: bool, share_prefix: int = 0, width_multiple: int = 1
) -> PairBatch:
    skip = common_prompt_prefix(pairs) if shared and share_prefix and len(pairs) > 1 else 0
    if skip < share_prefix:
        skip = 0
    segs = []  # (pair index, segment)
    for i, pair in enumerate(pairs):
        segs += [(i, s) for s in _segments(pair, shared, skip)]
    lengths = [len(s[0]) for _, s in segs]
    rows = pack_rows(lengths, max(row_tokens, max(lengths)))
    width = round_width(max(sum(lengths[k] for k in row) for row in rows), width_multiple, skip)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg_id = torch.full((len(rows), width), -1, dtype=torch.long)
    branch = torch.zeros((len(rows), width), dtype=torch.long)
    slots: list[tuple[int, int, int, int]] = []  # (row, column, token, sequence)
    attention: list[Segment] = []  # what each token may see, as models/segments.py takes it
    for r, row in enumerate(rows):
        at = 0
        for k in row:
            i, (tokens, positions, targets) = segs[k]
            n = len(tokens)
            ids[r, at : at + n] = torch.tensor(tokens)
            pos[r, at : at + n] = torch.tensor(positions)
            seg_id[r, at : at + n] = k
            if shared:  # 0 prompt, 1 chosen, 2 rejected
                p = len(pairs[i].prompt) - skip
                c = len(pairs[i].chosen) - 1
                branch[r, at + p : at + p + c] = 1
                branch[r, at + p + c : at + n] = 2
                attention.append(Segment(r, at, p))
                attention += [
                    Segment(r, start, length, ((at, p),))
                    for start, length in ((at + p, c), (at + p + c, n - p - c))
                    if length > 0  # an answer of one token feeds none
                ]
            else:
                attention.append(Segment(r, at, n))
            slots += [(r, at + off, token, 2 * i + side) for off, token, side in targets]
            at += n
        pos[r, at:] = torch.arange(width - at)  # tail padding: a sequence of its own
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, c, _, _ in slots:
        keep[r, c] = True
    index = torch.full((len(rows), width), -1, dtype=torch.long)
    index[keep] = torch.arange(int(keep.sum()))
    mask = None
    if shared:
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (seg_id[:, :, None] == seg_id[:, None, :]) & (seg_id[:, :, None] >= 0)
        branch_ok = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        mask = (same & causal & branch_ok) | torch.eye(width, dtype=torch.bool)  # padding sees itself
        if skip:  # every token sees the common prefix (padding too: harmless, it carries no target)
            mask = torch.cat([torch.ones(len(rows), width, skip, dtype=torch.bool), mask], dim=2)
        mask = mask[:, None]
    return PairBatch(
        input_ids=ids,
        position_ids=pos,
        attention_mask=mask,
        keep=keep,
        target_slot=torch.tensor([int(index[r, c]) for r, c, _, _ in slots], dtype=torch.long),
        target_token=torch.tensor([t for _, _, t, _ in slots], dtype=torch.long),
        target_seq=torch.tensor([s for _, _, _, s in slots], dtype=torch.long),
        n_pairs=len(pairs),
        n_tokens=sum(p.tokens for p in pairs),
        prefix_ids=torch.tensor([pairs[0].prompt[:skip]], dtype=torch.long) if skip else None,
        segments=attention,
    )


def budget_batches(
    pairs: list[EncodedPair], budget: int, pad_id: int, row_tokens: int, shared: bool = True, share_prefix: int = 0
) -> list[tuple[int, PairBatch]]:
    """No-grad scoring batches: consecutive pairs, as many as fit `budget` fed tokens (at least one), with the index
    of each batch's first pair."""
    out = []
    start = 0
    while start < len(pairs):
        end, fed = start, 0
        while end < len(pairs) and (end == start or fed + len(pairs[end]) <= budget):
            fed += len(pairs[end])
            end += 1
        chunk = pairs[start:end]
        out.append((start, _batch(chunk, pad_id, row_tokens, shared, share_prefix)))
        start = end
    return out
