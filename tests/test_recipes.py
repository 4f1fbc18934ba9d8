"""Every shipped recipe trains: its data path (format, template, loss mask, method) works end to end.

The recipe's own model is replaced by the tiny test model and training stops after two steps, so this proves
the recipe and its dataset fit together, not what they learn (docs/results.md has that, from `make results`).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_two_steps_on_a_tiny_model(recipe, tiny_model_dir, tmp_path):
    import tunesmith

    run = tunesmith.train(
        recipe,
        quiet=True,
        log=lambda *a, **k: None,
        **{
            "model.name": str(tiny_model_dir),
            "output": str(tmp_path / "run"),
            "train.max_steps": 2,
            "train.batch_size": 4,
            "train.eval_every": 2,
            "train.threads": 1,
        },
    )
    cfg = run.config
    assert cfg.method == tunesmith.load_config(recipe).method
    train_records = [m for m in run.metrics if m["kind"] == "train"]
    assert [m["step"] for m in train_records][-1] == 2
    assert all(math.isfinite(m["loss"]) and m["label_tokens"] > 0 for m in train_records)
    assert (run.path / "model").is_dir()
    summary = run.data_summary
    assert summary["train"]["examples"] >= 300, "issue #6: several hundred training examples per dataset"
    assert summary["train"]["truncated"] <= 0.05 * summary["train"]["examples"], "recipe max_length cuts many examples"
