"""`tunesmith report`: the self-contained report.html, from fixture eval files written to docs/eval-format.md,
from a real tiny training run, and rendered in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import main
from tunesmith.evaluation.report_html import headline, paired_difference, write_report
from tunesmith.evaluation.report_inputs import read_inputs

LABELS = ["account", "billing", "other", "shipping", "technical"]
EVIL = '<script>alert("owned")</script> & <b>bold</b>'


# ------------------------------------------------------------------------------------------- fixtures


def _pick(rng: random.Random, reference: str, p_right: float, bias: str | None = None) -> str:
    if rng.random() < p_right:
        return reference
    return (
        bias if bias and bias != reference and rng.random() < 0.7 else rng.choice([x for x in LABELS if x != reference])
    )


def _classification_stats(refs: list[str], preds: list[str]) -> tuple[dict, dict, list[list[int]]]:
    idx = {label: i for i, label in enumerate(LABELS)}
    confusion = [[0] * len(LABELS) for _ in LABELS]
    for r, p in zip(refs, preds):
        confusion[idx[r]][idx[p]] += 1
    per_label, f1s = {}, []
    for label in LABELS:
        i = idx[label]
        tp = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        prec = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_label[label] = {"precision": prec, "recall": rec, "f1": f1, "support": support}
        f1s.append(f1)
    metrics = {"accuracy": sum(r == p for r, p in zip(refs, preds)) / len(refs), "macro_f1": sum(f1s) / len(f1s)}
    return metrics, per_label, confusion


def write_task_eval(
    run: Path, n: int = 60, p_right=(0.25, 0.45, 0.85), seed: int = 0, evil: bool = True, examples: bool = True
) -> dict:
    """eval/task.json + eval/task_examples.jsonl for a classification run, written to docs/eval-format.md and
    internally consistent (metrics, per-label, confusion and flipped lists all derive from the same outputs)."""
    rng = random.Random(seed)
    keys = ["base_zero_shot", "base_few_shot", "fine_tuned"]
    rows = []
    for i in range(n):
        ref = LABELS[i % len(LABELS)]
        text = f"ticket {i}: my order {rng.randint(100, 999)} has a problem"
        if evil and i == 3:
            text = EVIL
        outputs = {
            k: _pick(rng, ref, p, bias="billing" if k == "base_zero_shot" else None) for k, p in zip(keys, p_right)
        }
        rows.append(
            {
                "id": f"t-{i:03d}",
                "input": text,
                "reference": ref,
                "outputs": outputs,
                "scores": {k: float(outputs[k] == ref) for k in keys},
            }
        )
    if evil:  # make sure the hostile example is among the shown flipped examples, with hostile outputs too
        rows[3]["outputs"] = {"base_zero_shot": EVIL, "base_few_shot": "other", "fine_tuned": rows[3]["reference"]}
        rows[3]["scores"] = {
            "base_zero_shot": 0.0,
            "base_few_shot": float(rows[3]["reference"] == "other"),
            "fine_tuned": 1.0,
        }
    systems = []
    for key, name, shots, tokens, secs in (
        ("base_zero_shot", "base, zero-shot", 0, 83.2, 0.41),
        ("base_few_shot", "base, 3-shot", 3, 412.5, 0.93),
        ("fine_tuned", "fine-tuned", 0, 83.2, 0.40),
    ):
        preds = [r["outputs"][key] if r["outputs"][key] in LABELS else "other" for r in rows]
        metrics, per_label, confusion = _classification_stats([r["reference"] for r in rows], preds)
        metrics["invalid_rate"] = sum(r["outputs"][key] not in LABELS for r in rows) / n
        systems.append(
            {
                "key": key,
                "name": name,
                "shots": shots,
                "metrics": metrics,
                "per_label": per_label,
                "confusion": confusion,
                "prompt_tokens_per_example": tokens,
                "seconds_per_example": secs,
                "seconds": secs * n,
            }
        )
    flipped = {"improved": [], "regressed": []}
    for r in rows:
        before, after = r["scores"]["base_zero_shot"], r["scores"]["fine_tuned"]
        if before != after:
            flipped["improved" if after > before else "regressed"].append(
                {
                    "id": r["id"],
                    "input": r["input"],
                    "reference": r["reference"],
                    "base": r["outputs"]["base_zero_shot"],
                    "tuned": r["outputs"]["fine_tuned"],
                }
            )
    task = {
        "version": 1,
        "task": "classification",
        "flip_rule": "per-example accuracy >= 0.5 counts as a pass",
        "data": {"path": "data/x/test.jsonl", "sha256": "ab" * 32, "examples": n},
        "labels": LABELS,
        "primary": "accuracy",
        "metrics_info": {
            "accuracy": {"higher_is_better": True, "description": "share of examples whose label is right"},
            "macro_f1": {"higher_is_better": True, "description": "F1 averaged over labels"},
            "invalid_rate": {"higher_is_better": False, "description": "share of generations naming no label"},
        },
        "systems": systems,
        "examples_file": "task_examples.jsonl",
        "flipped": flipped,
    }
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "task.json").write_text(json.dumps(task, indent=2))
    if examples:
        (run / "eval" / "task_examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return task


def write_forgetting(run: Path, verdict: str = "low") -> dict:
    f = {
        "version": 1,
        "probe": {"name": "tunesmith-general-v1", "text_tokens": 5210, "questions": 300},
        "perplexity": {"base": 18.2, "fine_tuned": 19.0, "change": 19.0 / 18.2 - 1},
        "kl": {"mean_per_token": 0.031, "tokens": 9000},
        "questions": {
            "metric": "score",
            "base": 0.41,
            "fine_tuned": 0.39,
            "change": -0.02,
            "by_category": {
                "facts": {"base": 0.5, "fine_tuned": 0.47, "n": 80},
                "arithmetic": {"base": 0.3, "fine_tuned": 0.31, "n": 70},
                "writing": {"base": 0.42, "fine_tuned": 0.38, "n": 150},
            },
        },
        "verdict": verdict,
        "thresholds": "low: perplexity +<10% and score drop <3 pts; moderate: ...; high: ...",
        "explanation": "The model kept its general abilities.",
        "seconds": 95.0,
    }
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "forgetting.json").write_text(json.dumps(f, indent=2))
    return f


def make_run(root: Path, name: str = "tickets", steps: int = 40) -> Path:
    """A run directory with config.yaml, data.json and metrics.jsonl shaped like the training loop's."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "name": name,
        "output": str(run),
        "model": {"name": "smollm2-135m-instruct"},
        "method": "lora",
        "data": {"train": "data/x/train.jsonl", "system_prompt": "Classify the ticket. " + EVIL},
        "train": {"lr": 4e-4, "batch_size": 8, "seed": 42},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    data = {
        "template": "model",
        "kind": "chat",
        "train": {"examples": 500, "dropped": 0, "truncated": 0, "tokens": 38706, "label_tokens": 1210},
        "validation": {"examples": 100, "dropped": 0, "truncated": 0, "tokens": 7893, "label_tokens": 242},
        "files": {"train": {"path": "data/x/train.jsonl", "sha256": "3f" * 32}},
        "device": "cpu",
    }
    (run / "data.json").write_text(json.dumps(data, indent=2))
    lines = []
    for step in range(1, steps + 1):
        lr = 4e-4 * min(1.0, step / 3) * (0.5 + 0.5 * (1 - step / steps))
        lines.append(
            {
                "time": 1.0 + step,
                "kind": "train",
                "step": step,
                "epoch": step / steps,
                "loss": 3.0 / step**0.5,
                "lr": lr,
                "grad_norm": 1.0,
                "tokens": 600 * step,
                "label_tokens": 20,
                "tokens_per_s": 150.0 + step % 7,
                "step_time": 4.0,
            }
        )
        if step % 8 == 0:
            lines.append(
                {
                    "time": 1.5 + step,
                    "kind": "eval",
                    "step": step,
                    "val_loss": 1.2 / (step / 8),
                    "val_token_acc": 0.7 + step / 400,
                    "val_tokens": 242,
                }
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A run with every eval file, and its report written once (figures take a second or two to draw)."""
    run = make_run(tmp_path_factory.mktemp("full"))
    write_task_eval(run)
    write_forgetting(run)
    write_report(run)
    return run


@pytest.fixture(scope="module")
def full_page(full_run) -> str:
    return (full_run / "report.html").read_text()


def figures(page: str) -> list[str]:
    return re.findall(r'<img class="figure" src="([^"]+)"', page)


def section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, f"no section {sid}"
    return m.group(1)


def strip_time(page: str) -> str:
    return re.sub(r"<time>[^<]*</time>", "<time></time>", page)


# ------------------------------------------------------------------------------------------- content


def test_full_report_has_every_section_figure_and_number(full_run, full_page):
    task = json.loads((full_run / "eval" / "task.json").read_text())
    acc = {s["key"]: s["metrics"]["accuracy"] for s in task["systems"]}
    page = full_page

    # the headline answers the question with the numbers of the file
    headline = re.search(r'<div class="headline (\w+)">(.*?)</div>', page, re.S)
    assert headline.group(1) == "win", headline.group(2)
    assert (
        f"fine-tuned: {acc['fine_tuned'] * 100:.1f}% accuracy vs {acc['base_zero_shot'] * 100:.1f}% zero-shot, "
        f"{acc['base_few_shot'] * 100:.1f}% 3-shot" in headline.group(2)
    )
    assert "paired bootstrap over 60 test examples" in headline.group(2)
    assert "83 prompt tokens fine-tuned" in headline.group(2) and "412 prompt tokens 3-shot" in headline.group(2)
    assert "forgetting" in headline.group(2).lower() and "badge low" in headline.group(2)

    # metrics table: one row per system, deltas vs zero-shot coloured by direction
    metrics = section(page, "task")
    assert metrics.count('<th scope="row">') >= 3
    d_acc = (acc["fine_tuned"] - acc["base_zero_shot"]) * 100
    assert f'<span class="delta better">{d_acc:+.1f} pts</span>' in metrics
    assert '412.5<span class="delta worse">+329</span>' in metrics  # few-shot prompt tokens: lower is better
    assert "prompt tokens / example" in metrics and "seconds / example" in metrics
    assert "share of generations naming no label (lower is better)" in metrics

    # flipped: complete counts, capped tables
    flipped = section(page, "flipped")
    assert "per-example accuracy &gt;= 0.5 counts as a pass." in flipped
    n_imp, n_reg = len(task["flipped"]["improved"]), len(task["flipped"]["regressed"])
    assert n_imp > 20 and n_reg >= 1
    assert f"{n_imp} examples, the first 20 shown" in flipped
    assert flipped.count('<tr><td class="id">') == 20 + n_reg

    forgetting = section(page, "forgetting")
    assert 'class="badge low">forgetting low' in forgetting and "+4.4%" in forgetting and "0.031" in forgetting
    assert "-2.0 pts" in forgetting

    training = section(page, "training")
    assert "40 (1.00 epochs)" in training and "24,000" in training  # steps, tokens
    assert "best 0.240 at step 40" in training
    assert "<pre>" in section(page, "config") and "Data summary" in section(page, "config")

    # figures: primary bars, 3 confusion matrices, forgetting categories, loss, lr, throughput; all SVG inline
    uris = figures(page)
    assert len(uris) == 8
    for uri in uris:
        assert uri.startswith("data:image/svg+xml;base64,")
        svg = base64.b64decode(uri.split(",", 1)[1]).decode()
        assert "<svg" in svg and "</svg>" in svg
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_user_text_is_escaped(full_page):
    page = full_page
    assert page.count("<script>") == 1  # only the report's own script
    assert "alert(" not in page.split("<script>")[1] or "owned" not in page.split("<script>")[1]
    assert "&lt;script&gt;alert(&quot;owned&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "<b>bold</b>" not in page
    # in the flipped table (input and base answer) and in the config dump
    assert section(page, "flipped").count("&lt;script&gt;") >= 2
    assert "&lt;script&gt;" in section(page, "config")


def test_labels_with_markup_and_dollars_are_escaped_in_tables_and_figures(tmp_path):
    run = make_run(tmp_path)
    task = write_task_eval(run, evil=False)
    odd = ["<i>acct</i>", r"cost $\nope$", "other", "ship & co", "tech"]  # unescaped, matplotlib fails on $\nope$
    task["labels"] = odd
    for s in task["systems"]:
        s["per_label"] = {new: s["per_label"][old] for old, new in zip(LABELS, odd)}
    (run / "eval" / "task.json").write_text(json.dumps(task))
    page = write_report(run).read_text()
    assert "&lt;i&gt;acct&lt;/i&gt;" in page and "<i>acct</i>" not in page and "ship &amp; co" in page
    assert len(figures(page)) == 7  # bars, 3 confusion matrices (drawn despite the TeX-like label), 3 training


def test_systems_reused_from_an_earlier_measurement_are_named_as_such(tmp_path):
    run = make_run(tmp_path)
    task = write_task_eval(run, evil=False)
    assert "Reused from an identical earlier measurement" not in write_report(run).read_text()
    task["systems"][0]["reused"] = "2026-12-08T00:54:31+0000"
    (run / "eval" / "task.json").write_text(json.dumps(task))
    about = section(write_report(run).read_text(), "task")
    assert "Reused from an identical earlier measurement" in about and "2026-12-08T00:54:31+0000" in about


def test_report_is_deterministic_apart_from_the_timestamp(full_run, full_page, tmp_path):
    a = full_page
    b = write_report(full_run, out=tmp_path / "b.html").read_text()
    assert re.search(r"<time>\d{4}-\d\d-\d\dT[\d:]+\+00:00</time>", a)
    assert strip_time(a) == strip_time(b)


# ------------------------------------------------------------------------------------------- missing or bad input


def test_missing_eval_files_name_the_command(tmp_path):
    run = make_run(tmp_path)
    page = write_report(run).read_text()
    cmd = f"tunesmith eval {run}"
    assert "Not measured yet" in page
    for sid in ("task", "flipped", "forgetting"):
        assert f"<code>{cmd}</code> to fill this section" in section(page, sid)
    assert 'id="confusion"' not in page
    assert len(figures(page)) == 3  # training figures only


def test_only_forgetting_missing(tmp_path):
    run = make_run(tmp_path)
    write_task_eval(run)
    page = write_report(run).read_text()
    assert "No forgetting measurement" in section(page, "forgetting")
    assert "Forgetting: not measured yet" in page
    assert "No per-example" not in page and len(figures(page)) == 7


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "eval/task.json is not valid JSON"),
        ('{"version": 2, "systems": []}', "eval/task.json has format version 2; this tunesmith reads version 1"),
        ('{"version": 1, "task": "text", "primary": "exact_match"}', "does not follow docs/eval-format.md: no systems"),
        (
            '{"version": 1, "task": "classification", "primary": "accuracy", "labels": ["a", "b"], "systems": '
            '[{"key": "fine_tuned", "metrics": {"accuracy": 1.0}, "confusion": [[1, 0]]}]}',
            "fine_tuned: confusion is not 2x2",
        ),
    ],
)
def test_unusable_task_file_is_reported_not_fatal(tmp_path, content, message):
    run = make_run(tmp_path)
    (run / "eval").mkdir()
    (run / "eval" / "task.json").write_text(content)
    write_forgetting(run, verdict="moderate")
    page = write_report(run).read_text()
    assert message in section(page, "task")
    assert 'class="badge moderate">forgetting moderate' in section(page, "forgetting")


def test_bad_examples_file_and_truncated_metrics_line(tmp_path):
    run = make_run(tmp_path)
    write_task_eval(run)
    with open(run / "eval" / "task_examples.jsonl", "a") as fh:
        fh.write("{broken\n")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 41, "lo')  # a run killed mid-line
    page = write_report(run).read_text()
    assert "eval/task_examples.jsonl:61: invalid JSON" in page
    assert "metrics.jsonl: skipped unreadable line(s) 46" in page
    assert 'class="headline untested"' in page and "not tested against noise" in page


def test_not_a_run_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the headline


def _headline_class(tmp_path, p_right, n=200, examples=True) -> tuple[str, str]:
    run = make_run(tmp_path)
    write_task_eval(run, n=n, p_right=p_right, evil=False, examples=examples)
    page = headline(read_inputs(run))
    m = re.search(r'<div class="headline (\w+)"><h2>(.*?)</h2>', page)
    return m.group(1), m.group(2)


@pytest.mark.parametrize(
    "p_right, expected, words",
    [
        ((0.2, 0.4, 0.9), "win", "Fine-tune:"),
        ((0.2, 0.9, 0.3), "lose", "Just prompt: the base model prompted 3-shot beats"),
        ((0.2, 0.6, 0.6), "tie", "No clear winner"),
    ],
)
def test_headline_claims_only_what_the_paired_interval_supports(tmp_path, p_right, expected, words):
    verdict, title = _headline_class(tmp_path, p_right)
    assert verdict == expected and words in title


def test_lower_is_better_lm_task_without_few_shot(tmp_path):
    """Raw-text runs: perplexity is the primary metric and lower is better; no few-shot, no labels, nulls allowed."""
    run = make_run(tmp_path)
    rng = random.Random(0)
    rows = [
        {
            "id": f"p-{i}",
            "input": f"passage {i}",
            "reference": "",
            "outputs": {"base_zero_shot": "", "fine_tuned": ""},
            "scores": {"base_zero_shot": 20 + rng.random(), "fine_tuned": 15 + rng.random()},
        }
        for i in range(30)
    ]
    task = {
        "version": 1,
        "task": "lm",
        "data": {"path": "d.txt", "sha256": None, "examples": 30},
        "primary": "perplexity",
        "metrics_info": {
            "perplexity": {"higher_is_better": False, "description": "exp(loss)"},
            "loss": {"higher_is_better": False, "description": "nats per token"},
        },
        "systems": [
            {
                "key": "base_zero_shot",
                "name": "base",
                "shots": 0,
                "metrics": {"perplexity": 20.5, "loss": 3.02},
                "prompt_tokens_per_example": None,
                "seconds_per_example": 0.2,
                "seconds": 6.0,
            },
            {
                "key": "fine_tuned",
                "name": "fine-tuned",
                "shots": 0,
                "metrics": {"perplexity": 15.5, "loss": 2.74},
                "prompt_tokens_per_example": None,
                "seconds_per_example": 0.2,
                "seconds": 6.0,
            },
        ],
        "examples_file": "task_examples.jsonl",
        "flipped": {"improved": [], "regressed": []},
        "flip_rule": "perplexity has no pass mark; no examples listed",
    }
    (run / "eval").mkdir()
    (run / "eval" / "task.json").write_text(json.dumps(task))
    (run / "eval" / "task_examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(run).read_text()
    assert 'class="headline win"' in page and "fine-tuned: 15.5 perplexity vs 20.5 zero-shot" in page
    metrics = section(page, "task")
    assert (
        '15.5<span class="delta better">-5.00</span>' in metrics
        and '<span class="delta better">-0.28</span>' in metrics
    )
    assert 'id="confusion"' not in page and "perplexity has no pass mark" in section(page, "flipped")


def test_headline_without_per_example_scores_says_untested(tmp_path):
    verdict, title = _headline_class(tmp_path, (0.2, 0.4, 0.9), examples=False)
    assert verdict == "untested" and "scores higher than the best prompt (3-shot)" in title


def test_paired_difference_interval():
    mean, lo, hi = paired_difference([0.0] * 50 + [1.0] * 50, [1.0] * 100)
    assert mean == pytest.approx(0.5) and 0.38 < lo < 0.5 < hi < 0.62
    assert paired_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------- api, cli, real run


def test_api_and_cli_write_the_report_atomically(tmp_path, capsys, monkeypatch):
    import webbrowser

    import tunesmith

    opened = []
    monkeypatch.setattr(webbrowser, "open", opened.append)
    run = make_run(tmp_path)
    path = tunesmith.report(run, open_browser=True)
    assert opened == [(run / "report.html").resolve().as_uri()]
    assert path == run / "report.html" and path.read_text().startswith("<!DOCTYPE html>")
    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert f"report: {out}" in capsys.readouterr().out
    assert out.is_file() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    assert main(["report", str(run), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["report", str(run), "--out", str(run / "config.yaml" / "r.html")]) == 2  # parent is a file
    assert "cannot write the report" in capsys.readouterr().err


def test_report_does_not_import_torch(full_run):
    code = "import sys, tunesmith; tunesmith.report(sys.argv[1]); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code, str(full_run)], check=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A real run: the tiny model trained 6 steps on toy ticket data, with a test split for `tunesmith eval`."""
    import tunesmith
    from test_train import write_chat_data

    root = tmp_path_factory.mktemp("tiny-run")
    train, val, test = (
        write_chat_data(root / "train.jsonl", 24),
        write_chat_data(root / "val.jsonl", 6, seed=1),
        write_chat_data(root / "test.jsonl", 6, seed=2),
    )
    return tunesmith.train(
        {
            "model": {"name": str(tiny_model_dir)},
            "data": {"train": str(train), "validation": str(val), "test": str(test)},
            "output": str(root / "run"),
            "train": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "seed": 1},
        },
        quiet=True,
        log=lambda *a: None,
    )


def test_report_of_a_real_tiny_training_run(tiny_run, tmp_path, tiny_model_dir):
    import tunesmith

    records = tiny_run.metrics
    page = tunesmith.report(tiny_run.path, out=tmp_path / "report.html").read_text()
    training = section(page, "training")
    assert f"{records[0]['loss']:.3f} at the first step" in training
    assert "6 (" in training and "validation loss" in training
    last_train = [r for r in records if r["kind"] == "train"][-1]
    assert f"tokens trained on</th><td>{last_train['tokens']:,}<" in training  # the loop's running total
    assert len(figures(page)) == 3
    assert "lora" in page and str(tiny_model_dir) in page


def test_report_reads_what_tunesmith_eval_writes(tiny_run, tmp_path):
    """The contract end to end: the eval files of a real `tunesmith.evaluate` (not fixtures) fill the report."""
    import tunesmith
    from tunesmith import api

    run = shutil.copytree(tiny_run.path, tmp_path / "run")
    api.evaluate(run, shots=1, allow_missing_labels=True, forgetting=False, quiet=True, log=lambda *a: None)
    task = json.loads((run / "eval" / "task.json").read_text())
    page = tunesmith.report(run).read_text()
    assert "could not" not in page and "does not follow" not in page
    acc = {s["key"]: s["metrics"]["accuracy"] for s in task["systems"]}
    assert (
        f"fine-tuned: {acc['fine_tuned'] * 100:.1f}% accuracy vs {acc['base_zero_shot'] * 100:.1f}% zero-shot" in page
    )
    assert "paired bootstrap over 6 test examples" in page
    assert (
        len(figures(page)) == 8
    )  # bars, 4 confusion matrices (with the best prompt), 3 training figures; no forgetting
    assert "No forgetting measurement" in section(page, "forgetting")


# ------------------------------------------------------------------------------------------- headless Chromium


def find_chromium() -> str | None:
    for name in (
        os.environ.get("TUNESMITH_CHROMIUM"),
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        reason = (
            "no chromium binary on PATH (install Debian's `chromium` package: `make test` does it when it "
            "runs as root or with passwordless sudo; or set TUNESMITH_CHROMIUM)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {reason}")
        pytest.skip(reason)
    return path


def _chromium(binary: str, tmp: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [
        binary,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=5000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_headless_chromium(chromium, full_run, tmp_path):
    from PIL import Image

    page = full_run / "report.html"
    dom = _chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # the page's own script ran after load and found every figure decoded (naturalWidth > 0)
    assert 'data-figures="8/8"' in html, re.findall(r'data-figures="[^"]*"', html)
    for sid in ("task", "confusion", "flipped", "forgetting", "training", "config"):
        assert f'<section id="{sid}">' in html
    assert "alert(" not in re.sub(r"<script>.*?</script>", "", html, flags=re.S).replace("&lt;script&gt;alert", "")

    shot = tmp_path / "shot.png"
    res = _chromium(
        chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars", page.as_uri()
    )
    assert shot.is_file(), res.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2400)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, tables and plots, not a blank page
    blue = sum(n for n, (r, g, b) in colours if b > 150 and r < 120)  # the figures' blues (#2f6db5, confusion cells)
    assert blue > 2000


# under CI the chromium fixture fails, which pytest counts as an error: `make test` fails either way
@pytest.mark.parametrize("ci, outcome", [("true", "1 error"), ("", "1 skipped")])
def test_without_chromium_the_browser_test_skips_but_fails_in_ci(tmp_path, ci, outcome):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TUNESMITH_CHROMIUM")}
    env.update(PATH=str(tmp_path), CI=ci)  # an empty PATH: no browser to be found
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rfs",
            f"{__file__}::test_report_renders_in_headless_chromium",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert outcome in res.stdout, res.stdout[-3000:]
    assert "no chromium binary on PATH" in res.stdout
