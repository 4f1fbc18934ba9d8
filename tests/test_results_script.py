"""scripts/results.py: the train time of a run interrupted and resumed counts every attempt."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunesmith.errors import Interrupted

ROOT = Path(__file__).resolve().parents[1]


def _results_module():
    spec = importlib.util.spec_from_file_location("results_script", ROOT / "scripts" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_interrupted_run_keeps_its_train_time_and_the_resumed_run_adds_it(tmp_path, monkeypatch):
    import tunesmith

    results = _results_module()
    recipe = ROOT / "recipes" / "ticket-triage-lora.yaml"
    run_dir = tmp_path / "run"
    clock = iter([100.0, 130.0, 1000.0, 1045.0, 2000.0, 2000.0])
    monkeypatch.setattr(results.time, "time", lambda: next(clock))
    args = SimpleNamespace(retrain=False, limit=5, shots=None, probe_limit=3)

    def interrupted(*a, **k):
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        raise Interrupted("interrupted at step 3 of 9; checkpoint saved.")

    monkeypatch.setattr(tunesmith, "train", interrupted)
    with pytest.raises(Interrupted):
        results.produce(recipe, run_dir, args)
    stamp = json.loads((run_dir / "results-run.json").read_text())
    assert stamp["train_seconds_interrupted"] == 30.0 and "train_seconds" not in stamp

    calls = []

    def resumed(*a, **k):
        calls.append(k)
        (run_dir / "model").mkdir()

    monkeypatch.setattr(tunesmith, "train", resumed)
    monkeypatch.setattr(tunesmith, "load", lambda path: path)
    monkeypatch.setattr(tunesmith, "evaluate", lambda *a, **k: None)
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "task.json").write_text("{}")
    results.produce(recipe, run_dir, args)
    assert calls == [{"resume": run_dir}]
    stamp = json.loads((run_dir / "results-run.json").read_text())
    assert stamp["train_seconds"] == 75.0  # 30 s before the interruption + 45 s after


def test_the_recipe_hash_ignores_the_eval_section(tmp_path):
    results = _results_module()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ntrain:\n  lr: 1.0e-4\neval:\n  shots: 3\n")
    before = results._recipe_hash(recipe)
    recipe.write_text("model: m\ntrain:\n  lr: 1.0e-4\neval:\n  shots: 3\n  format: 'A: .+'\n")
    assert results._recipe_hash(recipe) == before  # an eval setting re-evaluates, it does not retrain
    assert results._recipe_eval(recipe)["format"] == "A: .+"
    recipe.write_text("model: m\ntrain:\n  lr: 2.0e-4\neval:\n  shots: 3\n")
    assert results._recipe_hash(recipe) != before
