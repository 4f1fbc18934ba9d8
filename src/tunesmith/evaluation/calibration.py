"""Contextual calibration of label scores (Zhao et al. 2021, "Calibrate Before Use", arXiv 2102.09690).

A prompted model is biased towards some labels whatever the input: labels frequent in the shots, the label
of the last shot, labels common in pretraining. Scoring the labels on content-free inputs ("N/A", "",
"[MASK]" in place of the test input, same prompt otherwise) measures that bias, p_cf; dividing each test
example's label distribution by it (W = diag(p_cf)^-1, b = 0) and renormalising removes it. The paper reports
large gains for few-shot prompting at no training cost, so a baseline without it understates prompting.

Inputs are per-label log-probabilities log p(label | prompt), each the sum of the label's token log-probs.
Length normalisation (mean log-prob per token) is optional: a summed log-prob penalises labels with more
tokens, which decides between labels like "billing" and "technical support" for reasons unrelated to the
input. Whatever is done to the test scores must be done to the content-free scores too, or p_cf measures
something else; `content_free_prior` and `predict` take the same `token_counts` for that reason.

Plain Python and math (no torch, no numpy), so every number is checked by hand in tests/test_calibration.py;
softmax is computed with log-sum-exp, so summed log-probs of long labels (-300 and below) do not underflow.
"""

from __future__ import annotations

import math
from typing import Sequence

CONTENT_FREE = ("N/A", "", "[MASK]")
"""The paper's content-free inputs; their label distributions are averaged into the prior."""


def _check(logprobs: Sequence[float], what: str = "label log-probabilities") -> list[float]:
    values = [float(x) for x in logprobs]
    if not values:
        raise ValueError(f"{what}: no labels")
    if any(math.isnan(x) or x == math.inf for x in values):
        raise ValueError(f"{what} must be finite or -inf: {values}")
    if all(x == -math.inf for x in values):
        raise ValueError(f"{what}: every label has probability 0")
    return values


def log_softmax(logprobs: Sequence[float]) -> list[float]:
    """log of the distribution over labels: x - logsumexp(x), stable for very negative x."""
    values = _check(logprobs)
    top = max(values)
    log_z = top + math.log(sum(math.exp(x - top) for x in values))
    return [x - log_z for x in values]


def label_distribution(logprobs: Sequence[float]) -> list[float]:
    """Softmax over the labels: p(label | prompt, one of the labels). The labels' raw probabilities do not sum
    to 1 (the model may put mass on other text), and only their relative sizes choose a label."""
    return [math.exp(x) for x in log_softmax(logprobs)]


def length_normalise(logprobs: Sequence[float], token_counts: Sequence[int]) -> list[float]:
    """Each label's log-prob divided by its token count: the mean log-prob per token."""
    values = _check(logprobs)
    counts = list(token_counts)
    if len(counts) != len(values):
        raise ValueError(f"{len(values)} label log-probabilities but {len(counts)} token counts")
    if any(int(c) != c or c < 1 for c in counts):
        raise ValueError(f"token counts must be whole numbers >= 1: {counts}")
    return [x / c for x, c in zip(values, counts)]


def content_free_prior(
    content_free_logprobs: Sequence[Sequence[float]], token_counts: Sequence[int] | None = None
) -> list[float]:
    """p_cf: the mean, over the content-free inputs, of their label distributions.

    Each input's scores are normalised before averaging, so every content-free input has an equal say in the
    prior. (The paper's code averages the raw label probabilities and normalises after, which lets the input
    with the most mass on the labels dominate; the two differ only when the inputs do.) `token_counts`:
    length-normalise each input's scores first, as `predict` does with the same counts.
    """
    rows = [list(row) for row in content_free_logprobs]
    if not rows:
        raise ValueError("content_free_prior needs the label log-probabilities of at least one content-free input")
    if len({len(row) for row in rows}) != 1:
        raise ValueError(f"content-free inputs scored different numbers of labels: {[len(r) for r in rows]}")
    if token_counts is not None:
        rows = [length_normalise(row, token_counts) for row in rows]
    dists = [label_distribution(row) for row in rows]
    return [sum(d[i] for d in dists) / len(dists) for i in range(len(dists[0]))]


def calibrate(label_logprobs: Sequence[float], prior: Sequence[float]) -> list[float]:
    """The calibrated distribution: p(label) / p_cf(label), renormalised to sum to 1.

    That is W·p with W = diag(p_cf)^-1 and b = 0, normalised. The paper writes softmax(W·p + b) and its code
    takes the argmax of W·p; renormalising picks the same label and keeps the scores probabilities that are
    proportional to W·p (a softmax of probabilities would squash them towards uniform). Computed as
    softmax(log p - log p_cf), so nothing underflows. A label with no prior mass cannot be calibrated.
    """
    logs = _check(label_logprobs)
    prior = [float(x) for x in prior]
    if len(prior) != len(logs):
        raise ValueError(f"{len(logs)} label log-probabilities but a prior over {len(prior)} labels")
    if any(not (x > 0 and math.isfinite(x)) for x in prior):
        raise ValueError(f"the content-free prior must be positive for every label: {prior}")
    return label_distribution([x - math.log(p) for x, p in zip(logs, prior)])


def predict(
    label_logprobs: Sequence[float],
    prior: Sequence[float] | None = None,
    token_counts: Sequence[int] | None = None,
) -> int:
    """Index of the predicted label: the argmax of the (length-normalised, then calibrated) scores.

    `token_counts`: length-normalise first (the prior must come from `content_free_prior` with the same
    counts). `prior`: contextual calibration. Equal scores go to the first label, so results are reproducible.
    """
    scores = _check(label_logprobs)
    if token_counts is not None:
        scores = length_normalise(scores, token_counts)
    dist = calibrate(scores, prior) if prior is not None else label_distribution(scores)
    return max(range(len(dist)), key=lambda i: (dist[i], -i))
