"""Hold out a validation set from the training examples.

- deterministic: the same examples, fraction and seed give the same split
- no leakage through duplicates: examples with the same (normalised) input always land on the same side
- stratified for classification-like data (`validate.is_classification`): each label is split in the
  given fraction, and a label with at least 2 examples appears on both sides whenever its examples are not
  all one input
- at least one validation example when fraction > 0 and there are 2 or more examples
Both sides keep the examples' original order.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Sequence

from tunesmith.data.example import Example
from tunesmith.data.validate import is_classification, normalize_text
from tunesmith.errors import DataError


def split_train_val(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split into (train, validation) with about `fraction` of the examples in validation."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    if fraction == 0 or n < 2:
        return list(examples), []

    # groups of indices sharing an input: the unit that is assigned to a side
    by_input: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_input[normalize_text(ex.input_key())].append(i)
    groups = list(by_input.values())
    if len(groups) < 2:
        raise DataError(
            f"cannot hold out validation examples: all {n} examples have the same input; "
            "give a validation file (data.validation) or set data.val_fraction=0"
        )

    labels = set(is_classification(examples) or [])
    strata: dict[str | None, list[list[int]]] = defaultdict(list)
    for group in groups:
        answer = (examples[group[0]].answer() or "").strip()
        strata[answer if answer in labels else None].append(group)

    rng = random.Random(seed)
    quotas = _quotas({key: sum(map(len, gs)) for key, gs in strata.items()}, fraction, n)
    val: set[int] = set()
    for key in sorted(strata, key=lambda k: (k is None, k or "")):  # a fixed order, so the seed decides alone
        stratum = strata[key]
        rng.shuffle(stratum)
        val.update(_take(stratum, quotas[key]))
    if not val:  # every stratum's quota was 0 or its groups too big: the smallest group that leaves a train side
        val.update(min(groups, key=len))
    if len(val) == n:
        val.difference_update(max(groups, key=len))
    return [ex for i, ex in enumerate(examples) if i not in val], [ex for i, ex in enumerate(examples) if i in val]


def _quotas(sizes: dict[str | None, int], fraction: float, n: int) -> dict[str | None, int]:
    """Validation examples per stratum: largest-remainder shares of round(fraction * n), at least 1 (and
    at most size - 1) for every stratum of 2 or more examples."""
    target = min(n - 1, max(1, round(fraction * n)))
    exact = {k: fraction * size for k, size in sizes.items()}
    quotas = {k: math.floor(v) for k, v in exact.items()}
    for k, size in sizes.items():
        quotas[k] = min(max(quotas[k], 1 if size >= 2 else 0), max(size - 1, 0))
    by_remainder = sorted(sizes, key=lambda k: (quotas[k] - exact[k], str(k)))
    for k in by_remainder:
        if sum(quotas.values()) >= target:
            break
        if quotas[k] < sizes[k] - 1 or (sizes[k] == 1 and quotas[k] == 0 and exact[k] >= 0.5):
            quotas[k] += 1
    return quotas


def _take(groups: list[list[int]], quota: int) -> list[int]:
    """Fill `quota` from the shuffled groups, skipping a group that would overshoot it (keeping a train side)."""
    taken: list[int] = []
    total = sum(map(len, groups))
    for group in groups:
        if len(taken) + len(group) <= quota and len(taken) + len(group) < total:
            taken.extend(group)
        if len(taken) == quota:
            break
    return taken
