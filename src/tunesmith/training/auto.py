"""Choosing `auto` hyperparameters from the data and the method, with a reason for each value.

The rule, in one place so it can be read, tested and printed:

- batch_size: about n/64 rounded to a power of two, between 4 and 32. Small datasets need more optimizer
  steps per epoch; large ones gain little from more noise.
- epochs: 3, raised for tiny datasets so the model sees at least ~100 examples in all and lowered for large
  ones so it sees at most ~25,000 (the rule OpenAI's fine-tuning API documents for its `auto`).
- lr: by method, the values commonly used for each (LoRA 2e-4 as in the LoRA/QLoRA papers and peft's
  examples; full fine-tuning 2e-5; IA3 3e-3; prompt/prefix tuning 3e-2 and 1e-2; bottleneck adapters 5e-4).
- warmup: 5% of the optimizer steps, at least one.
- micro_batch_size: as many examples per forward pass as fit a token budget (4,096 tokens on CPU, 16,384 on
  a GPU), measured on the longer examples of the data (95th percentile), never more than batch_size. The
  budget shrinks to what half of the memory available at the start can hold: autograd keeps activations for
  every token of a micro-batch (about 4 MB per token for a 135M model in fp32, `activation_bytes_per_token`),
  so 4,096 tokens of raw text would need ~16 GB — more than a 16 GB laptop has free.
- eval_every: validation costs at most ~15% of the training compute (a validation token costs about half a
  training token: forward only), with 2 to 8 evaluations per run. save_every: the same as eval_every.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LR_BY_METHOD = {
    "full": 2e-5,
    "freeze": 5e-5,
    "lora": 2e-4,
    "dora": 2e-4,
    "ia3": 3e-3,
    "prefix": 1e-2,
    "prompt": 3e-2,
    "adapter": 5e-4,
}
# Preference objectives at a lower rate than SFT on the same method. DPO's gradient on a pair is beta * sigmoid(-margin)
# times the difference of the two answers' log-prob gradients: it does not fade as the chosen answer's likelihood
# rises (SFT's does), and pushing the rejected answer down has no floor, so at SFT rates the margin grows by driving
# both answers' likelihoods down and generations degrade (Rafailov et al. 2024, "From r to Q*"; the DPO recipes of
# TRL and the alignment handbook use 5e-7 for full fine-tuning and 5e-6 for LoRA on 7B models, ~40x below their SFT
# rates, over tens of thousands of pairs). With a small model and a few hundred pairs such rates barely move in a few
# epochs, so tunesmith goes only 4x below SFT: measured for DPO + LoRA on data/safety-preferences (bench/RESULTS.md
# run 16: validation reward accuracy 1.0, the chosen answers' reward stayed above zero, +0.62; but the greedy answers
# did not follow the ranking, which dpo.sft_weight fixed, at 1e-4, in recipes/safety-dpo.yaml). SimPO's reward is
# beta (2.0) times a mean log-prob, a gradient per pair as large as DPO's, so it gets the same factor; ORPO is SFT on
# the chosen answers plus a small odds-ratio term, so it keeps the SFT rate. Measured on the same data with LoRA
# (bench/RESULTS.md run 19): SimPO at 5e-5 ranked 84% of the test pairs right and, like plain DPO, left the greedy
# answers as they were (no refusals learnt); ORPO at 2e-4 learnt the chosen answers' opening so well that it refused
# 96% of harmful and 73% of harmless prompts. Both rates do what their objective asks; neither alone gives the
# behaviour the pairs describe on that data, so the rates stay and the safety recipe uses DPO + dpo.sft_weight.
LR_SCALE_BY_OBJECTIVE = {"sft": 1.0, "dpo": 0.25, "orpo": 1.0, "simpo": 0.25}
LR_WHY = {
    "dpo": "DPO's pairwise gradient does not fade as SFT's does; at SFT rates it lowers both answers",
    "orpo": "ORPO is SFT on the chosen answers plus a small odds-ratio term: SFT rates suit it",
    "simpo": "SimPO's reward is beta 2.0 times a mean log-prob: a large gradient per pair",
}
TOKENS_PER_FORWARD = {"cpu": 4096, "cuda": 16384, "mps": 8192}


@dataclass
class TrainingPlan:
    """Resolved hyperparameters and, for each chosen automatically, why."""

    epochs: int
    batch_size: int
    micro_batch_size: int
    lr: float
    warmup_steps: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    save_every: int
    batching: str
    reasons: dict[str, str] = field(default_factory=dict)


def plan_training(
    train_cfg,
    method: str,
    n_examples: int,
    lengths: list[int],
    device_type: str = "cpu",
    val_tokens: int = 0,
    memory: tuple[int, int] | None = None,
) -> TrainingPlan:
    """memory: (bytes available for training, activation bytes per token), to cap the auto micro-batch."""
    reasons: dict[str, str] = {}
    t = train_cfg

    if t.batch_size == "auto":
        batch = int(min(32, max(4, 2 ** round(math.log2(max(n_examples, 1) / 64)))))
        reasons["batch_size"] = f"{n_examples} examples -> about n/64 as a power of two, within 4..32"
    else:
        batch = t.batch_size
    batch = min(batch, max(n_examples, 1))

    if t.epochs == "auto":
        epochs = 3
        if n_examples * 3 < 100:
            epochs = min(25, math.ceil(100 / max(n_examples, 1)))
        elif n_examples * 3 > 25_000:
            epochs = max(1, 25_000 // n_examples)
        reasons["epochs"] = f"{n_examples} examples -> {epochs} (3, kept between ~100 and ~25,000 examples seen)"
    else:
        epochs = t.epochs

    if t.lr == "auto":
        objective = getattr(t, "objective", "sft")
        lr = LR_BY_METHOD[method] * LR_SCALE_BY_OBJECTIVE[objective]
        reasons["lr"] = f"the usual peak rate for {method}"
        if objective != "sft":
            reasons["lr"] += f", x{LR_SCALE_BY_OBJECTIVE[objective]:g} for {objective} ({LR_WHY[objective]})"
    else:
        lr = float(t.lr)

    steps_per_epoch = math.ceil(n_examples / batch)
    total = t.max_steps if t.max_steps else steps_per_epoch * epochs
    if t.max_steps:
        epochs = math.ceil(total / steps_per_epoch)

    if t.warmup == "auto":
        warmup = max(1, round(0.05 * total))
        reasons["warmup"] = "5% of the optimizer steps"
    else:
        warmup = round(t.warmup * total) if t.warmup < 1 else int(t.warmup)

    if t.micro_batch_size == "auto":
        budget = TOKENS_PER_FORWARD.get(device_type, 4096)
        why = f"{budget} tokens per forward pass"
        if memory is not None and memory[1] > 0:
            fits = int(0.5 * memory[0] / memory[1])
            if fits < budget:
                budget = max(fits, 1)
                why = (
                    f"{budget} tokens per forward pass (half of the {memory[0] / 2**30:.1f} GB available, "
                    f"~{memory[1] / 2**20:.1f} MB of activations per token)"
                )
        longest = sorted(lengths)[int(0.95 * (len(lengths) - 1))] if lengths else 1
        micro = max(1, min(batch, budget // max(longest, 1)))
        reasons["micro_batch_size"] = f"{why} / {longest}-token examples (p95)"
    else:
        micro = min(t.micro_batch_size, batch)

    batching = t.batching
    if batching == "auto":
        batching = "pad" if method in ("prefix", "prompt") else "pack"
        reasons["batching"] = (
            "virtual tokens of prefix/prompt tuning need one sequence per row"
            if batching == "pad"
            else "packing removes padding; attention never crosses examples"
        )

    train_tokens = sum(lengths) * total / max(steps_per_epoch, 1)
    n_evals = 8 if not val_tokens else min(8, max(2, int(0.3 * train_tokens / val_tokens)))
    eval_every = max(1, math.ceil(total / n_evals)) if t.eval_every == "auto" else t.eval_every
    save_every = eval_every if t.save_every == "auto" else t.save_every
    if t.eval_every == "auto":
        reasons["eval_every"] = f"{n_evals} evaluations: validation kept under ~15% of the training compute"
    return TrainingPlan(
        epochs, batch, micro, lr, warmup, steps_per_epoch, total, eval_every, save_every, batching, reasons
    )


def lr_at(step: int, plan: TrainingPlan, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/linear decay to 0 or constant."""
    if step < plan.warmup_steps:
        return plan.lr * (step + 1) / plan.warmup_steps
    if schedule == "constant":
        return plan.lr
    done = (step - plan.warmup_steps) / max(1, plan.total_steps - plan.warmup_steps)
    done = min(1.0, done)
    if schedule == "linear":
        return plan.lr * (1.0 - done)
    return plan.lr * 0.5 * (1.0 + math.cos(math.pi * done))


def activation_bytes_per_token(model_config, dtype_bytes: int = 4, row_tokens: int = 512) -> int:
    """Rough bytes a training forward + backward needs per token of a micro-batch, beyond the model.

    Per layer and token: ~38 hidden-sized values (norm inputs and outputs, q/k/v/o inputs and outputs, the
    residual stream, LoRA's dropout copies and low-rank inputs, backward transients), ~5 intermediate-sized
    ones (gate, up, activation, their product, the down projection's input) and the attention weights of a
    row (heads x row length). Checked with bench/lm_memory.py on SmolLM2-135M with LoRA, 896 tokens of raw
    text: peak RSS rose 3.94 MB (2^20 bytes) per token, this gives 3.91 (bench/RESULTS.md run 8). An estimate
    for choosing a micro-batch, not a promise.
    """
    config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = getattr(config, "hidden_size", 0) or 0
    inter = getattr(config, "intermediate_size", 0) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", 0) or 0
    heads = getattr(config, "num_attention_heads", 0) or 0
    return int(layers * (38 * hidden + 5 * inter + heads * row_tokens) * dtype_bytes)


def available_memory(device) -> int | None:
    """Bytes free for training on `device` now: MemAvailable on Linux CPUs, free memory on CUDA; None if unknown."""
    try:
        if device.type == "cuda":
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None
