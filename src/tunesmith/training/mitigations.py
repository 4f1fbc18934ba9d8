"""Training options against catastrophic forgetting: replay of general data and a KL penalty toward the base.

Replay (`train.replay`, `train.replay_data`): general chat examples are mixed into the training set so that
`replay` is their share of it: with N task examples, R = round(N * replay / (1 - replay)) general ones (0.1 ->
one in ten). They are drawn once per run from the replay file with a generator seeded by `train.seed`
(the whole file, shuffled, repeated if R is larger than it), so the same config always trains on the same
mixture, and every epoch sees them, like the task examples, in a new order. They are rendered with the run's
chat template but without the task's system prompt (a general request should not be answered as a task
item), and they never enter the validation set, so validation loss still measures the task. The default file
is the built-in general chat set (resources/replay/general-chat.jsonl), which shares nothing with the
forgetting probe (resources/probe/).

KL to base (`train.kl_to_base`, weight w): each training batch adds w * sum KL(p_base || p_model) over the
positions the task loss is computed at (the labelled positions), normalised like the loss by the step's
labelled tokens. Why those positions: the loop runs the LM head only there (`logits_to_keep`), so the penalty
costs one extra no-grad forward of the base model and no extra LM-head work, where all positions would add the
LM head over every token twice (~25% of a small model's compute per token, for ~20x more positions on
classification data). On those positions, CE(label) + w * KL(p_base || q) equals (1 + w) times the cross-entropy
toward the mixture (label + w * p_base) / (1 + w), up to a constant: the penalty keeps the tuned distribution
from collapsing onto the task's answers and keeps the base model's ranking of the alternatives. It does not
constrain the prompt positions; replay is the mitigation that covers general inputs.
The base distribution comes from the same model with its adapter disabled (peft methods: no second copy in
memory) or from a frozen copy taken before the method is applied (full, freeze, bottleneck adapters).
"""

from __future__ import annotations

import copy
import hashlib
import random
from contextlib import nullcontext
from pathlib import Path

import torch

from tunesmith.errors import DataError
from tunesmith.models.functional import kl_per_position

REPLAY_DEFAULT = Path(__file__).resolve().parent.parent / "resources" / "replay" / "general-chat.jsonl"


# ----------------------------------------------------------------------------------------------------
# Replay


def replay_count(n_task: int, share: float) -> int:
    """How many general examples make them `share` of the mixed training set."""
    if share <= 0:
        return 0
    return max(1, round(n_task * share / (1.0 - share)))


def mix_replay(train: list, cfg, tokenizer, log=print) -> tuple[list, dict]:
    """The encoded training set with general examples added (per `cfg.train.replay`), and a summary for
    data.json. The task examples keep their order and come first; the loop shuffles every epoch."""
    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer, TooLong

    path = Path(cfg.train.replay_data) if cfg.train.replay_data else REPLAY_DEFAULT
    if not path.is_file():
        raise DataError(
            f"train.replay_data: {path}: no such file; give a chat JSONL file of general examples, "
            "or leave train.replay_data unset to use the built-in general-chat set"
        )
    examples = [e for e in read_examples(path, "auto") if e.kind == "chat"]
    if not examples:
        raise DataError(f'train.replay_data: {path}: no chat examples (rows with "messages") to replay')
    renderer = Renderer(tokenizer, cfg.model.chat_template, None)  # general requests: no task system prompt
    max_length = cfg.data.max_length if isinstance(cfg.data.max_length, int) else None  # the loop resolves auto first
    pool = []
    for ex in examples:
        try:
            enc = renderer.encode(ex, max_length=max_length, truncation="drop")
        except TooLong:
            continue  # replay is optional material: skip what does not fit rather than cut answers short
        if enc.n_label_tokens:
            pool.append(enc)
    if not pool:
        raise DataError(f"train.replay_data: {path}: no example fits data.max_length={cfg.data.max_length}")
    want = replay_count(len(train), cfg.train.replay)
    rng = random.Random(f"{cfg.train.seed}:replay")
    chosen: list = []
    while len(chosen) < want:
        order = list(range(len(pool)))
        rng.shuffle(order)
        chosen += [pool[i] for i in order[: want - len(chosen)]]
    summary = {
        "share": cfg.train.replay,
        "examples": len(chosen),
        "task_examples": len(train),
        "path": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "pool": len(pool),
        "tokens": sum(len(e.input_ids) for e in chosen),
        "label_tokens": sum(e.n_label_tokens for e in chosen),
    }
    log(
        f"replay: {len(chosen)} general examples from {path.name} mixed into {len(train)} task examples "
        f"({cfg.train.replay:.0%} of the training set)"
    )
    return train + chosen, summary


# ----------------------------------------------------------------------------------------------------
# KL to base


def frozen_base(model, cfg):
    """A frozen copy of the base model for `kl_to_base` with methods that change the model in place (full,
    freeze, bottleneck adapters); None when not needed. Call before the method is applied."""
    from tunesmith.methods.peft_methods import PEFT_METHODS

    if not cfg.train.kl_to_base or cfg.method in PEFT_METHODS:
        return None
    base = copy.deepcopy(model).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


class KLToBase:
    """The penalty term of one run; also sums the KL of the current optimizer step for the metrics."""

    def __init__(self, weight: float, model, base=None, autocast=None):
        if base is None and not hasattr(model, "disable_adapter"):
            raise ValueError("kl_to_base needs a peft model (adapter can be disabled) or a frozen base copy")
        self.weight = weight
        self.model = model
        self.base = base
        self.autocast = autocast if autocast is not None else nullcontext()  # the run's (bf16-mixed: head in fp32)
        self.kl_sum = 0.0

    @classmethod
    def create(cls, cfg, model, base, autocast=None) -> "KLToBase | None":
        return cls(cfg.train.kl_to_base, model, base, autocast) if cfg.train.kl_to_base else None

    @torch.no_grad()
    def base_logits(self, batch, kwargs: dict) -> torch.Tensor:
        """Base model logits at batch.keep, (n_keep, vocab), computed the way the loop computed the model's."""
        model = self.base if self.base is not None else self.model
        ctx = self.model.disable_adapter() if self.base is None else nullcontext()
        from tunesmith.training.chunked_loss import logits_head_outside
        from tunesmith.training.prefix import forward_shared_prefix

        def forward():
            if getattr(batch, "prefix_ids", None) is not None:  # a micro-batch sharing its system prompt
                return forward_shared_prefix(model, batch)
            # the base has no virtual tokens (prompt tuning): keep the batch's own positions
            return model(**{**kwargs, "logits_to_keep": batch.keep}).logits

        with ctx:
            logits = logits_head_outside(model, forward, self.autocast)
        return logits.reshape(-1, logits.shape[-1]).float()

    def penalty(self, batch, kwargs: dict, logits: torch.Tensor) -> torch.Tensor:
        """weight * sum over kept positions of KL(p_base || p_model); logits: the model's (n_keep, vocab)."""
        kl = kl_per_position(self.base_logits(batch, kwargs), logits).sum()
        self.kl_sum += kl.item()
        return self.weight * kl

    def pop(self, n_targets: int, objective: float) -> dict:
        """Metrics of the finished optimizer step, then reset: the mean KL per labelled token (nats), the task
        loss alone (`loss`, comparable with runs without the penalty) and the objective that was minimised."""
        kl = self.kl_sum / max(n_targets, 1)
        self.kl_sum = 0.0
        return {
            "loss": round(objective - self.weight * kl, 6),
            "kl_to_base": round(kl, 6),
            "objective": round(objective, 6),
        }
