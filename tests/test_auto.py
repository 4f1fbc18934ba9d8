"""The documented `auto` rule for hyperparameters, and the learning-rate schedule."""

from __future__ import annotations

import pytest

from tunesmith.config import TrainConfig
from tunesmith.training.auto import lr_at, plan_training


@pytest.mark.parametrize(
    "n,batch,epochs",
    [(20, 4, 5), (100, 4, 3), (500, 8, 3), (2000, 32, 3), (20000, 32, 1)],
)
def test_batch_and_epochs_follow_the_rule(n, batch, epochs):
    plan = plan_training(TrainConfig(), "lora", n, [80] * n)
    assert (plan.batch_size, plan.epochs) == (batch, epochs)
    assert plan.total_steps == -(-n // batch) * epochs
    assert set(plan.reasons) >= {"batch_size", "epochs", "lr", "warmup", "micro_batch_size"}


def test_lr_by_method_and_explicit_values_win():
    assert plan_training(TrainConfig(), "lora", 100, [50] * 100).lr == 2e-4
    assert plan_training(TrainConfig(), "full", 100, [50] * 100).lr == 2e-5
    plan = plan_training(TrainConfig(lr=1e-3, batch_size=10, epochs=2), "lora", 100, [50] * 100)
    assert (plan.lr, plan.batch_size, plan.epochs, plan.total_steps) == (1e-3, 10, 2, 20)
    assert "lr" not in plan.reasons


def test_micro_batch_fits_the_token_budget_and_prefix_methods_pad():
    plan = plan_training(TrainConfig(batch_size=32), "lora", 1000, [1000] * 1000, "cpu")
    assert plan.micro_batch_size == 4  # 4096 tokens / 1000-token examples
    assert plan.batching == "pack"
    assert plan_training(TrainConfig(), "prompt", 100, [50] * 100).batching == "pad"


def test_schedule_warms_up_then_decays_to_zero():
    plan = plan_training(TrainConfig(lr=1.0, batch_size=1, epochs=1, warmup=0.1), "lora", 100, [10] * 100)
    lrs = [lr_at(s, plan, "cosine") for s in range(plan.total_steps)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0)
    assert lrs[-1] < 0.001
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(50, plan, "constant") == 1.0
    assert lr_at(55, plan, "linear") == pytest.approx(0.5)


def test_validation_budget_sets_the_number_of_evaluations():
    # 500 examples of 80 tokens, 1 epoch at batch 8 = 63 steps; validation 100 x 80 tokens
    plan = plan_training(TrainConfig(epochs=1, batch_size=8), "lora", 500, [80] * 500, val_tokens=8000)
    assert plan.eval_every == 32  # 0.3 * 40,000 / 8,000 = 1.5 -> at least 2 evaluations
    plan = plan_training(TrainConfig(epochs=3, batch_size=8), "lora", 5000, [80] * 5000, val_tokens=8000)
    assert plan.eval_every == -(-plan.total_steps // 8)  # plenty of training: 8 evaluations


def test_micro_batch_shrinks_to_the_memory_available():
    from types import SimpleNamespace

    from tunesmith.training.auto import activation_bytes_per_token

    config = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9)
    per_token = activation_bytes_per_token(config)
    assert 2 * 2**20 < per_token < 6 * 2**20  # SmolLM2-135M: a few MB per token in fp32
    plenty = plan_training(TrainConfig(batch_size=8), "lora", 600, [480] * 600, memory=(64 * 2**30, per_token))
    assert plenty.micro_batch_size == 8  # 4096 tokens / 480 fit: memory does not bind
    tight = plan_training(TrainConfig(batch_size=8), "lora", 600, [480] * 600, memory=(8 * 2**30, per_token))
    assert tight.micro_batch_size == int(0.5 * 8 * 2**30 / per_token) // 480 < 8
    assert "8.0 GB available" in tight.reasons["micro_batch_size"]
    starved = plan_training(TrainConfig(batch_size=8), "lora", 600, [480] * 600, memory=(2**20, per_token))
    assert starved.micro_batch_size == 1  # never zero
    fixed = plan_training(
        TrainConfig(batch_size=8, micro_batch_size=8), "lora", 600, [480] * 600, memory=(2**20, per_token)
    )
    assert fixed.micro_batch_size == 8  # a micro_batch_size the user set is kept
