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
    assert [{k: v for k, v in c.items() if k != "progress"} for c in calls] == [{"resume": run_dir}]
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


def test_the_table_is_rebuilt_from_the_records_when_the_run_directories_are_gone(tmp_path):
    results = _results_module()
    run_dir = tmp_path / "runs" / "ticket-triage-lora"
    (run_dir / "eval").mkdir(parents=True)
    task = {
        "task": "classification",
        "primary": "accuracy",
        "data": {"examples": 4},
        "metrics_info": {"accuracy": {"higher_is_better": True}},
        "systems": [
            {"key": "base_zero_shot", "name": "base, zero-shot", "metrics": {"accuracy": 0.25}},
            {"key": "base_few_shot", "name": "base, 3-shot", "shots": 3, "metrics": {"accuracy": 0.5}},
            {"key": "fine_tuned", "name": "fine-tuned", "metrics": {"accuracy": 0.75}},
        ],
    }
    (run_dir / "eval" / "task.json").write_text(json.dumps(task))
    scores = [(0, 1, 1), (1, 0, 1), (0, 1, 1), (0, 0, 0)]  # zero-shot, few-shot, fine-tuned per example
    (run_dir / "eval" / "task_examples.jsonl").write_text(
        "\n".join(
            json.dumps({"id": str(i), "scores": {"base_zero_shot": z, "base_few_shot": f, "fine_tuned": t}})
            for i, (z, f, t) in enumerate(scores)
        )
    )
    (run_dir / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"kind": "train", "step": s, "tokens_per_s": t}) for s, t in [(1, 90.0), (2, 110.0)])
    )
    (run_dir / "config.yaml").write_text("method: lora\n")
    (run_dir / "data.json").write_text(json.dumps({"train": {"examples": 12}, "device": "cpu"}))
    (run_dir / "results-run.json").write_text(json.dumps({"train_seconds": 120.0, "eval_commit": "abc1234"}))
    records = tmp_path / "records"
    row = results.collect(ROOT / "recipes" / "ticket-triage-lora.yaml", run_dir)
    results.save_record(row, records)
    import shutil

    shutil.rmtree(tmp_path / "runs")  # runs/ is not in git: the record is what survives
    out = tmp_path / "results.md"
    assert (
        results.main(["--table-only", "--runs", str(tmp_path / "runs"), "--records", str(records), "--out", str(out)])
        == 0
    )
    table = out.read_text()
    # against the best prompt (3-shot) only one of four examples moves: the interval holds zero
    assert row["paired"]["against"] == "base_few_shot" and row["paired"]["mean"] == 0.25
    # a record made before prompt selection existed: compared with the better of zero-/few-shot on test, and says so
    assert (
        "| ticket-triage-lora (lora) | classification (4) | accuracy | 25.0% | 50.0% | not measured | 75.0% | "
        "**tie** with prompting: +25.0 points, not significant (per-example 95% CI +0.0 to +75.0, n=4); "
        "no validation-chosen prompt in this record (measured before prompt selection) | "
        "not measured | 2.0 min, 100 |"
    ) in table
    assert "at commit abc1234" in table
    # every other shipped recipe is listed as not measured, not silently dropped
    assert "Not measured yet" in table and "review-sentiment-lora" in table.split("Not measured yet")[1]


def test_the_shipped_records_name_shipped_recipes_and_render(tmp_path):
    """docs/results.md is built from docs/results/*.json: each names a shipped recipe and renders a row."""
    results = _results_module()
    recipes = {p.stem for p in (ROOT / "recipes").rglob("*.yaml")}
    records = sorted((ROOT / "docs" / "results").glob("*.json"))
    assert records, "no records in docs/results"
    for path in records:
        assert path.stem in recipes, f"{path.name} names no shipped recipe"
        row = json.loads(path.read_text())
        assert {"task", "forgetting", "train_seconds", "tokens_per_s", "measured"} <= row.keys(), path.name
        assert {s["key"] for s in row["task"]["systems"]} >= {"base_zero_shot", "fine_tuned"}, path.name
    out = tmp_path / "results.md"
    args = SimpleNamespace(note=[], records="docs/results", runs="runs/results")
    results.write_table([json.loads(p.read_text()) for p in records], out, args)
    table = out.read_text()
    for path in records:
        assert f"| {path.stem} (" in table and f"### {path.stem}" in table


def _table(results, tmp_path, task: dict, **row) -> str:
    """docs/results.md's text for one record of `task` (a lora run, no forgetting measured)."""
    row = {
        "recipe": "r",
        "method": "lora",
        "task": task,
        "forgetting": None,
        "train_examples": 1,
        "steps": 1,
        "device": "cpu",
        **row,
    }
    out = tmp_path / "t.md"
    results.write_table([row], out, SimpleNamespace(note=[], records="docs/results", runs="runs/results"))
    return out.read_text()


@pytest.mark.parametrize(
    "low, high, expected",
    [
        (0.05, 0.30, "**beats** prompting by +20.0 points (per-example 95% CI +5.0 to +30.0, n=40)"),
        (-0.02, 0.30, "**tie** with prompting: +20.0 points, not significant (per-example 95% CI -2.0 to +30.0, n=40)"),
        (
            -0.30,
            -0.05,
            "**unclear**: +20.0 points on the whole set, the other way per example "
            "(per-example 95% CI -30.0 to -5.0, n=40)",
        ),
    ],
)
def test_the_verdict_follows_the_paired_interval(tmp_path, low, high, expected):
    results = _results_module()
    # the comparison is with the prompt chosen on validation, even where another base system scores higher on test
    task = {
        "task": "text",
        "primary": "chrf",
        "data": {"examples": 40},
        "systems": [
            {"key": "base_zero_shot", "name": "base, zero-shot", "metrics": {"chrf": 0.35}},
            {
                "key": "base_best_prompt",
                "name": "base, best prompt",
                "metrics": {"chrf": 0.3},
                "prompt": {"name": "4 retrieved shots"},
            },
            {"key": "fine_tuned", "name": "fine-tuned", "metrics": {"chrf": 0.5}},
        ],
    }
    paired = {"against": "base_best_prompt", "examples": 40, "mean": 0.1, "low": low, "high": high}
    table = _table(results, tmp_path, task, paired=paired)
    assert results.best_prompt_key(task) == "base_best_prompt"
    assert f"| 35.0% | — | 30.0% (4 retrieved shots) | 50.0% | {expected} |" in table


def test_base_prompts_measured_without_the_run_fill_the_best_prompt_column(tmp_path):
    """`--prompt-only` keeps freshly measured base systems beside an old record's fine-tuned result: the table
    compares with the validation-chosen prompt and says that no per-example interval exists."""
    results = _results_module()
    task = {
        "task": "classification",
        "primary": "accuracy",
        "data": {"examples": 40},
        "systems": [
            {"key": "base_zero_shot", "name": "base, zero-shot", "metrics": {"accuracy": 0.2}},
            {"key": "fine_tuned", "name": "fine-tuned", "metrics": {"accuracy": 0.8}},
        ],
    }
    fresh = {
        "measured": "2026-12-06",
        "systems": [
            {"key": "base_zero_shot", "name": "base, zero-shot", "metrics": {"accuracy": 0.25}},
            {
                "key": "base_best_prompt",
                "name": "base, best prompt",
                "metrics": {"accuracy": 0.6},
                "prompt": {"name": "8 retrieved shots"},
            },
        ],
        "prompt_selection": {
            "examples": 10,
            "split": "v.jsonl",
            "metric": "accuracy",
            "chosen": "knn_8",
            "variants": [
                {
                    "key": "knn_8",
                    "name": "8 retrieved shots",
                    "value": 0.7,
                    "prompt_tokens_per_example": 400,
                    "seconds_per_example": 1.0,
                }
            ],
        },
    }
    paired = {"against": "base_zero_shot", "examples": 40, "mean": 0.6, "low": 0.4, "high": 0.8}
    table = _table(results, tmp_path, task, paired=paired, prompt_only=fresh)
    assert (
        "| 25.0% | — | 60.0% (8 retrieved shots) | 80.0% | **beats** prompting by +20.0 points; base prompts "
        "measured 2026-12-06 without the fine-tuned run"
    ) in table
    assert "CI +40.0" not in table  # the old interval was against another system
    assert "| 8 retrieved shots **(chosen)** | 70.0% | 400 | 1.000 |" in table
