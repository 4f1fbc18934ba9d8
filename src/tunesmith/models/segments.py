"""Attention over packed rows that computes only what the mask allows: each example attends within itself.

A packed row holds several examples one after another (data/batching.py), and a block-diagonal mask keeps them
apart. SDPA on a CPU (and on a GPU with a mask) computes every query against every key of the row and masks
afterwards, so a row of 8 tickets does ~5x the attention work its examples need (the demo's 444-token shared-prefix
row, 9 heads of 64: forward + backward 17.8-20.7 ms a layer over the whole row, 12.2 ms per example; 30 layers a
step; bench/RESULTS.md run 22: 1.07x on a LoRA step).

Here the examples of a batch are cut out of the row into a padded batch of segments (queries: the example's
tokens; keys: the tokens it may see, i.e. the context it shares with the others, such as the shared prefix or a
pair's prompt, then its own tokens) and attention runs on that, under a mask that is causal within the segment;
the outputs are put back where the queries came from. Every query sees exactly the keys the row's mask lets it
see, so the result equals the masked attention over the whole row to float rounding (tests/test_segments.py).
Positions of the row that belong to no segment (the padding at a row's end) get a zero attention output: no
labelled position ever sees them.

How it reaches the attention layers: the forward call passes `tunesmith_segments=SegmentLayout(...)`, which
transformers hands down, with the rest of its keyword arguments, to the attention function of every layer. The
"sdpa" entry of transformers' attention registry is wrapped once (models/attention.py): without that keyword it
calls the original unchanged, and any attention function that does not know the keyword ignores it and uses the 4D
mask, which every call still passes, so the result is the same either way. Used only where a custom mask means the
same to every layer (`usable`: no sliding-window layers, SDPA attention).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Segment:
    """One example's queries in a model call: positions start..start+length of row `row` (in the call's input,
    the T axis). It sees, besides its own earlier tokens: every cached key before the input (`sees_past`) and the
    `context` ranges (start, length) of the same row's input, in full."""

    row: int
    start: int
    length: int
    context: tuple[tuple[int, int], ...] = ()
    sees_past: bool = False

    def shifted(self, by: int, context: tuple[tuple[int, int], ...] = ()) -> "Segment":
        """The segment `by` positions later in its row (the row behind a prefix), seeing `context` as well."""
        return Segment(
            self.row,
            self.start + by,
            self.length,
            context + tuple((s + by, n) for s, n in self.context),
            self.sees_past,
        )


def consecutive(lengths_per_row: list[list[int]]) -> list[Segment]:
    """Segments of rows that hold examples back to back from position 0 (packing), each seeing only itself."""
    out = []
    for r, lengths in enumerate(lengths_per_row):
        at = 0
        for n in lengths:
            out.append(Segment(r, at, n))
            at += n
    return out


def behind_cached_prefix(segments: list[Segment]) -> list[Segment]:
    """The segments, every one also seeing the keys/values cached before the rows (a shared prefix run first)."""
    return [replace(s, sees_past=True) for s in segments]


def behind_prefix_in_row(segments: list[Segment], prefix_len: int) -> list[Segment]:
    """One row run as [prefix, row]: the prefix is a segment of its own (causal), and every segment of the row
    moves behind it and sees it whole."""
    if any(s.row != 0 for s in segments):
        raise ValueError("the prefix goes in front of one row only")
    return [Segment(0, 0, prefix_len)] + [s.shifted(prefix_len, ((0, prefix_len),)) for s in segments]


class SegmentLayout:
    """The segments of one model call, and the index tensors that cut them out of (and back into) the rows, built
    on the first attention call and reused by every layer."""

    def __init__(self, segments: list[Segment]):
        if not segments:
            raise ValueError("a segment layout needs at least one segment")
        self.segments = list(segments)
        self._plans: dict = {}

    def plan(self, batch: int, T: int, S: int, device) -> "_Plan":
        key = (batch, T, S, str(device))
        if key not in self._plans:
            self._plans[key] = _Plan.build(self.segments, batch, T, S, device)
        return self._plans[key]


# The cost of attention on a CPU (torch's flash-attention kernel, forward + backward, SmolLM2's 9 heads of 64, 2
# cores) is mostly per query row: ~21 us a row with 78 keys, ~37 us with 450, i.e. ~18 us + ~0.04 us per key, plus
# ~1 ms a call (bench/RESULTS.md run 22). Segments padded to the longest of their group waste whole rows, so
# segments are grouped by length (a few calls) to minimise that cost, in units of one query row:
# rows * (1 + keys / KEYS_PER_ROW) + CALL_ROWS per call.
KEYS_PER_ROW = 450
CALL_ROWS = 60


@dataclass
class _Group:
    n: int  # queries per segment (padded)
    m: int  # keys per segment (padded)
    q_index: torch.Tensor  # (G * n,) rows of the flattened (B * T) queries
    k_index: torch.Tensor  # (G * m,) rows of the flattened (B * S) keys/values
    mask: torch.Tensor  # (G, 1, n, m) bool

    @property
    def size(self) -> int:
        return self.mask.shape[0]


@dataclass
class _Plan:
    groups: list[_Group]
    out_index: torch.Tensor  # (B * T,) row of the concatenated group outputs, or past their end (a zero row)

    @classmethod
    def build(cls, segments: list[Segment], B: int, T: int, S: int, device) -> "_Plan":
        past = S - T
        contexts = []
        for s in segments:
            if s.row >= B or s.start < 0 or s.length < 1 or s.start + s.length > T:
                raise ValueError(f"segment {s} lies outside the input ({B} rows of {T} tokens)")
            ctx = list(range(past)) if s.sees_past else []
            for start, length in s.context:
                ctx += range(past + start, past + start + length)
            contexts.append(ctx)
        order = sorted(range(len(segments)), key=lambda i: (-segments[i].length, -len(contexts[i])))
        groups = []
        out_index = torch.full((B * T,), -1, dtype=torch.long)
        at = 0  # rows of the group outputs so far
        for part in _partition([segments[i].length for i in order], [len(contexts[i]) for i in order]):
            members = [order[i] for i in part]
            group, rows = _group([segments[i] for i in members], [contexts[i] for i in members], T, S, past)
            for queries, outputs in rows:
                if out_index[queries].ne(-1).any():
                    raise ValueError(f"segments overlap in {segments}")
                out_index[queries] = at + outputs
            at += group.size * group.n
            groups.append(_moved(group, device))
        out_index[out_index < 0] = at  # positions of no segment: the zero row after every group's outputs
        return cls(groups, out_index.to(device))


def _moved(group: _Group, device) -> _Group:
    return _Group(group.n, group.m, group.q_index.to(device), group.k_index.to(device), group.mask.to(device))


def _partition(lengths: list[int], contexts: list[int]) -> list[range]:
    """Split segments sorted by length (descending) into consecutive groups of least total cost (module note)."""
    count = len(lengths)

    def cost(i: int, j: int) -> float:  # segments i..j-1 as one group, padded to the longest (lengths[i])
        n, m = lengths[i], max(contexts[i:j]) + lengths[i]
        return (j - i) * n * (1 + m / KEYS_PER_ROW) + CALL_ROWS

    best = [0.0] + [float("inf")] * count
    cut = [0] * (count + 1)
    for j in range(1, count + 1):
        for i in range(j):
            c = best[i] + cost(i, j)
            if c < best[j]:
                best[j], cut[j] = c, i
    parts, j = [], count
    while j > 0:
        parts.append(range(cut[j], j))
        j = cut[j]
    return parts[::-1]


def _group(segments: list[Segment], contexts: list[list[int]], T: int, S: int, past: int):
    """One group's index tensors and mask, and for each segment (its query rows in B * T, their rows in the
    group's flattened output)."""
    n = max(s.length for s in segments)
    c = max(len(ctx) for ctx in contexts)
    m = c + n
    G = len(segments)
    q_index = torch.empty(G, n, dtype=torch.long)
    k_index = torch.empty(G, m, dtype=torch.long)
    mask = torch.zeros(G, 1, n, m, dtype=torch.bool)
    own = torch.ones(n, n, dtype=torch.bool).tril()
    rows = []
    for g, (s, ctx) in enumerate(zip(segments, contexts)):
        offsets = torch.arange(n).clamp(max=s.length - 1)  # padded queries/keys repeat the last real one
        q_index[g] = s.row * T + s.start + offsets
        own_keys = s.row * S + past + s.start + offsets
        ctx_keys = torch.tensor(ctx, dtype=torch.long) + s.row * S
        pad = own_keys[:1].expand(c - len(ctx))
        k_index[g] = torch.cat([ctx_keys, pad, own_keys])
        mask[g, 0, :, : len(ctx)] = True
        mask[g, 0, :, c:] = own
        mask[g, 0, :, c + s.length :] = False  # never a padded key (a padded query still sees its first key)
        rows.append((s.row * T + s.start + torch.arange(s.length), g * n + torch.arange(s.length)))
    return _Group(n, m, q_index.view(-1), k_index.view(-1), mask), rows


def attend(original, module, query, key, value, layout: SegmentLayout, *args, **kwargs):
    """`original` (transformers' SDPA attention: (module, q, k, v, mask, ...) -> ((B, T, H, D), weights)) run on
    the segments of `layout` instead of the whole rows; same output layout."""
    B, H, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    plan = layout.plan(B, T, S, query.device)
    queries = query.transpose(1, 2).reshape(B * T, H * D)
    keys = key.transpose(1, 2).reshape(B * S, Hkv * D)
    values = value.transpose(1, 2).reshape(B * S, Hkv * D)
    outs = []
    for g in plan.groups:
        q = queries.index_select(0, g.q_index).view(g.size, g.n, H, D).transpose(1, 2)
        k = keys.index_select(0, g.k_index).view(g.size, g.m, Hkv, D).transpose(1, 2)
        v = values.index_select(0, g.k_index).view(g.size, g.m, Hkv, D).transpose(1, 2)
        out, _ = original(module, q, k, v, g.mask, *args, **kwargs)  # (G, n, H, D)
        outs.append(out.reshape(g.size * g.n, H * D))
    outs.append(query.new_zeros(1, H * D))
    return torch.cat(outs).index_select(0, plan.out_index).view(B, T, H, D), None


def usable(model) -> bool:
    """Whether segment attention applies to the model: SDPA attention, the same mask for every layer, no virtual
    tokens."""
    from tunesmith.evaluation.generate import uses_prompt_learning
    from tunesmith.models.functional import takes_custom_masks
    from tunesmith.training.distributed import unwrap

    model = unwrap(model)  # DDP's wrapper runs the forward; the module has the config
    if uses_prompt_learning(model):
        return False  # prefix/prompt tuning put virtual tokens in front of every row: the positions would shift
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "sdpa" and takes_custom_masks(model)[0]


def keyword(model, segments: list[Segment] | None) -> dict:
    """The keyword argument to add to a forward call of `model` for these segments ({} when not usable)."""
    if not segments or not usable(model):
        return {}
    from tunesmith.models.attention import SEGMENTS_KEYWORD, install

    install()
    return {SEGMENTS_KEYWORD: SegmentLayout(segments)}
