"""`tunesmith sweep`: Optuna over a recipe, with pruning, a budget, resume after SIGKILL, a Pareto front and a report.

Tiny models (tests/conftest.py) with 1 thread; a sweep of 4-5 trials takes a few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_train import write_chat_data  # noqa: E402

RECIPE = """\
name: tiny
model: {model}
data:
  train: train.jsonl
  validation: val.jsonl
  test: test.jsonl
  max_length: 64
method: lora
lora:
  r: 4
train:
  epochs: 2
  batch_size: 8
  lr: 5.0e-3
  threads: 1
eval:
  shots: 3
  select: false
sweep:
  trials: 5
  startup_trials: 2
  probe_limit: 8
{extra}"""


def write_recipe(folder: Path, model: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_chat_data(folder / "train.jsonl", 48)
    write_chat_data(folder / "val.jsonl", 12, seed=1)
    write_chat_data(folder / "test.jsonl", 12, seed=2)
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(model=model, extra=extra))
    return path


def summary(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text())


@pytest.fixture(scope="module")
def swept(tiny_model_dir, tmp_path_factory):
    """One finished val_loss sweep (median pruner), shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("sweep")
    recipe = write_recipe(root, tiny_model_dir)
    out = root / "out"
    assert main(["sweep", str(recipe), "--output", str(out), "--quiet"]) == 0
    return recipe, out


def test_a_sweep_prunes_and_writes_the_best_config_as_a_recipe(swept, tmp_path):
    recipe, out = swept
    s = summary(out)
    states = [t["state"] for t in s["trials"]]
    assert len(states) == 5 and states[0] == "complete"
    assert "pruned" in states  # the median pruner stopped at least one trial early
    pruned = [t for t in s["trials"] if t["state"] == "pruned"]
    for t in pruned:
        assert "worse than the median" in t["note"]
        assert t["steps"] < 24  # stopped before its planned steps, at a validation point with a checkpoint
        assert list((out / f"trial-{t['number']:03d}" / "checkpoints").iterdir())
        assert not (out / f"trial-{t['number']:03d}" / "model").exists()
    # every trial reports at the same fractions of an epoch (steps_per_epoch = 48 / batch): 2 per epoch
    base = s["trials"][0]
    assert list(base["intermediate"]) == ["1", "2", "3", "4"]
    assert s["trials"][0]["params"] == {} and all(t["params"] for t in s["trials"][1:])
    best = s["best"]
    complete = [t for t in s["trials"] if t["state"] == "complete"]
    assert best["value"] == min(t["values"][0] for t in complete)

    # best.yaml is the winner's fully resolved config: training it again gives the same validation loss
    written = yaml.safe_load((out / "best.yaml").read_text())
    assert "sweep" not in written and "output" not in written
    assert written["train"]["lr"] != "auto" and written["train"]["epochs"] != "auto"
    run = tmp_path / "again"
    assert main(["train", str(out / "best.yaml"), "--output", str(run), "--quiet"]) == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if r["kind"] == "eval"][-1]
    assert last["val_loss"] == pytest.approx(best["value"], rel=1e-6)


def test_the_winner_is_compared_on_the_test_split_once_and_the_report_shows_it(swept):
    recipe, out = swept
    s = summary(out)
    test = s["test"]
    assert test["metric"] == "accuracy" and test["examples"] == 12
    assert set(test["base"]) == {"base_zero_shot", "base_few_shot"}
    assert str(s["best"]["number"]) in test["runs"] and "0" in test["runs"]
    winner = s["best"]["number"]
    # the winner's eval files are those of `tunesmith eval` (against the prompted base model)
    assert (out / f"trial-{winner:03d}" / "eval" / "task.json").is_file()
    page = (out / "report.html").read_text()
    for section in ('id="test"', 'id="best"', 'id="progress"', 'id="params"', 'id="trials"'):
        assert section in page
    assert page.count('<img class="figure"') >= 3
    # `tunesmith report DIR` rewrites it from sweep.json and study.db
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()


def _sweep_cmd(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tunesmith", "sweep", str(recipe), "--output", str(out), "--quiet", "--trials", "4"]


@pytest.mark.long  # ~60 s: four trials, a kill and a resume, each its own process
def test_a_killed_sweep_resumes_without_repeating_finished_trials(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir, "  pruner: none\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    straight = tmp_path / "straight"
    subprocess.run(_sweep_cmd(recipe, straight), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    run = subprocess.run(
        _sweep_cmd(recipe, killed), env={**env, "TUNESMITH_TEST_KILL_AT": "sweep-trial-2-step-7"}, capture_output=True
    )
    assert run.returncode == -9
    s = summary(killed)
    assert [t["state"] for t in s["trials"]] == ["complete", "complete"]  # trial 2 was running
    done = {n: (killed / f"trial-{n:03d}" / "model" / "adapter_model.safetensors").stat().st_mtime_ns for n in (0, 1)}

    resumed = subprocess.run(_sweep_cmd(recipe, killed), env=env, capture_output=True, text=True, check=True)
    assert "trial 2: resuming" in resumed.stdout
    assert "trial 0 (1 of" not in resumed.stdout and "trial 1 (2 of" not in resumed.stdout
    for n, mtime in done.items():  # finished trials were not trained again
        assert (killed / f"trial-{n:03d}" / "model" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    a, b = summary(straight), summary(killed)
    assert [t["number"] for t in b["trials"]] == [0, 1, 2, 3]
    for x, y in zip(a["trials"], b["trials"]):  # the same sampled values and the same results
        assert x["params"] == y["params"]
        assert x["values"] == pytest.approx(y["values"], rel=1e-6)
    assert yaml.safe_load((killed / "best.yaml").read_text()) == yaml.safe_load((straight / "best.yaml").read_text())


def test_a_resumed_sweep_refuses_another_recipe(swept, tmp_path):
    recipe, out = swept
    code = main(["sweep", str(recipe), "--output", str(out), "--quiet", "--lora.dropout", "0.2"])
    assert code == 2


def test_task_and_forgetting_give_a_pareto_front(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    code = main(
        ["sweep", str(recipe), "--output", str(out), "--quiet", "--trials", "3", "--objective", "task,forgetting"]
    )
    assert code == 0
    s = summary(out)
    assert s["objective"] == {"names": ["accuracy", "forgetting"], "directions": ["maximize", "minimize"]}
    assert s["pruner"].startswith("none")
    assert any(p["key"] == "train.replay" for p in s["space"])  # replay is searched when forgetting is an objective
    front = s["front"]
    assert front and set(front) <= {t["number"] for t in s["trials"] if t["state"] == "complete"}
    for t in s["trials"]:
        assert set(t["forgetting"]) >= {"value", "verdict", "perplexity_change", "score_change"}
        assert t["validation"]["examples"] == 12
        assert (out / f"trial-{t['number']:03d}" / "eval" / "forgetting.json").is_file()
    # no front trial is dominated by another trial
    done = [t for t in s["trials"] if t["state"] == "complete"]
    for n in front:
        a = next(t for t in done if t["number"] == n)["values"]
        assert not any(b[0] >= a[0] and b[1] <= a[1] and b != a for b in (t["values"] for t in done))
    assert (out / "best.yaml").is_file()
    assert all((out / "pareto" / f"trial-{n:03d}.yaml").is_file() for n in front if n != s["test_trials"][0])
    assert 'id="front"' in (out / "report.html").read_text()


def test_a_budget_stops_the_sweep(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    assert main(["sweep", str(recipe), "--output", str(out), "--quiet", "--trials", "200", "--budget", "12s"]) == 0
    s = summary(out)
    assert len(s["trials"]) < 200
    last = s["trials"][-1]
    # it ended because of the budget: a trial was not started, or the running one stopped at a step boundary
    assert (
        last["state"] == "not started"
        or last.get("note") == "the sweep's time budget ran out"
        or (s["elapsed_seconds"] >= 12)
    )
    assert s["elapsed_seconds"] < 12 + 15  # at most one trial's worth beyond the budget


BAD = [
    (
        "  space:\n    train.lrr: {low: 1.0e-4, high: 1.0e-3}\n",
        "recipe.yaml:24: sweep.space.train.lrr: not a searchable",
    ),
    ("  space:\n    lora.r: {low: 0, high: 8}\n", "recipe.yaml:24: sweep.space.lora.r: 0 is not a valid lora.r"),
    ("  space:\n    train.lr: {low: 1.0e-3, high: 1.0e-4}\n", "recipe.yaml:24: sweep.space.train.lr: Value error, low"),
    ("  space:\n    train.lr: {low: 0.0, high: 1.0e-3, log: true}\n", "log scale needs low > 0"),
    ("  space:\n    train.lr: {choices: []}\n", "sweep.space.train.lr.choices"),
    ("  budget: 2 hours\n", "recipe.yaml:23: sweep.budget: Value error, '2 hours' is not a duration"),
    ("  objective: accuracy,speed\n", "recipe.yaml:23: sweep.objective 'accuracy,speed'"),
    ("  objective: bleu\n", "sweep.objective 'bleu' is not known"),
    ("  pruner: asha\n", "recipe.yaml:23: sweep.pruner"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_sweep_sections_fail_with_file_and_line(tiny_model_dir, tmp_path, capsys, extra, message):
    recipe = write_recipe(tmp_path, tiny_model_dir, extra)
    assert main(["sweep", str(recipe), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err.replace(str(tmp_path) + "/", "")
    assert not (tmp_path / "out" / "trial-000").exists()  # refused before any training


def test_every_problem_of_a_sweep_space_is_reported_at_once(tiny_model_dir, tmp_path, capsys):
    extra = "  space:\n    train.lrr: {low: 1.0e-4, high: 1.0e-3}\n    lora.r: {low: 0, high: 8}\n"
    recipe = write_recipe(tmp_path, tiny_model_dir, extra)
    assert main(["sweep", str(recipe), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "2 problems in sweep.space" in err and "recipe.yaml:24" in err and "recipe.yaml:25" in err


def test_budget_flag_without_a_unit_is_a_usage_error(tiny_model_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    assert main(["sweep", str(recipe), "--budget", "30", "--quiet"]) == 2
    assert "'30' is not a duration" in capsys.readouterr().err


def test_a_user_space_narrows_and_drops_default_keys(tiny_model_dir, tmp_path):
    extra = (
        "  trials: 2\n  space:\n    lora.r: {choices: [2, 4]}\n    lora.dropout: null\n    train.warmup: null\n"
        "    lora.alpha_ratio: {choices: [1, 2]}\n"
    )
    recipe = write_recipe(tmp_path, tiny_model_dir, extra)
    out = tmp_path / "out"
    assert main(["sweep", str(recipe), "--output", str(out), "--quiet"]) == 0
    s = summary(out)
    keys = [p["key"] for p in s["space"]]
    assert "lora.dropout" not in keys and "train.warmup" not in keys
    assert {"train.lr", "lora.r", "lora.alpha_ratio"} <= set(keys)
    params = s["trials"][1]["params"]
    assert params["lora.r"] in (2, 4) and params["lora.alpha_ratio"] in (1, 2)
    cfg = yaml.safe_load((out / "trial-001" / "config.yaml").read_text())
    assert cfg["lora"]["alpha"] == params["lora.alpha_ratio"] * params["lora.r"]


def test_a_recorded_sweep_renders_in_the_results_page(swept, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    import sweep_results

    _, out = swept
    record = sweep_results.make_record(out, "tunesmith sweep recipe.yaml", "tiny model")
    (tmp_path / "tiny.json").write_text(json.dumps(record))
    text = "\n".join(sweep_results.section(tmp_path))
    s = summary(out)
    assert f"{len(s['trials'])} trials" in text and "tiny model" in text
    assert f"| {s['best']['number']} **best** | complete |" in text
    assert (
        "Test split (12 examples, accuracy)" in text
        and "trial 0 (baseline: the recipe with the command's flags)" in text
    )
