"""The forgetting probe and its measurement: probe files, per-answer scoring, verdict thresholds, and
forgetting_eval on tiny-model runs (zero when the tuned model is the base, positive after training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.errors import DataError
from tunesmith.evaluation import forgetting as fg
from tunesmith.evaluation.forgetting import (
    CATEGORIES,
    CHECKS,
    THRESHOLDS,
    forgetting_eval,
    load_probe,
    score_answer,
    verdict,
)

QUIET = lambda *a, **k: None  # noqa: E731


# ---- the probe files ------------------------------------------------------------------------------------


def test_builtin_probe_is_valid_and_sized_as_documented(tokenizer):
    probe = load_probe()
    assert probe.name == "tunesmith-general-v1"
    qs = probe.questions
    assert 290 <= len(qs) <= 320
    assert len({q["id"] for q in qs}) == len(qs)
    assert len({q["prompt"] for q in qs}) == len(qs)
    assert {q["category"] for q in qs} == set(CATEGORIES)
    assert {q["check"] for q in qs} <= set(CHECKS)
    assert all(q["reference"].strip() == q["reference"] and q["reference"] for q in qs)
    assert 30 <= len(probe.texts) <= 40
    words = [len(t["text"].split()) for t in probe.texts]
    assert min(words) >= 120 and max(words) <= 250
    tokens = sum(len(tokenizer(t["text"])["input_ids"]) for t in probe.texts)
    assert 5000 <= tokens <= 8000


def test_every_numeric_reference_is_recomputed_from_its_expression():
    numeric = [q for q in load_probe().questions if q["check"] == "number"]
    assert len(numeric) >= 80
    for q in numeric:
        value = eval(q["expression"], {"__builtins__": {}, "len": len, "max": max, "min": min})  # our own file
        assert abs(float(q["reference"]) - value) < 1e-9, q


def test_every_reference_scores_full_marks_against_itself():
    for q in load_probe().questions:
        assert score_answer(q, q["reference"]) == pytest.approx(1.0), q["id"]


def test_a_custom_probe_with_problems_lists_each_with_its_line(tmp_path):
    (tmp_path / "general_text.jsonl").write_text('{"text": "Some text."}\n{"text": ""}\n')
    (tmp_path / "questions.jsonl").write_text(
        '{"id": "a", "prompt": "p", "reference": "r", "check": "contains"}\n'
        '{"id": "a", "prompt": "p2", "reference": "x", "check": "number"}\n'
        "not json\n"
        '{"id": "c", "prompt": "p3", "reference": "r", "check": "regex"}\n'
    )
    with pytest.raises(DataError) as e:
        load_probe(tmp_path)
    text = str(e.value)
    assert f'{tmp_path / "general_text.jsonl"}:2: needs a non-empty "text"' in text
    assert f"{tmp_path / 'questions.jsonl'}:2: duplicate id 'a'" in text
    assert f"{tmp_path / 'questions.jsonl'}:2: a \"number\" check needs a numeric reference, not 'x'" in text
    assert f"{tmp_path / 'questions.jsonl'}:3: invalid JSON" in text
    assert f"{tmp_path / 'questions.jsonl'}:4: check 'regex' is not one of" in text
    with pytest.raises(DataError, match="probe directory not found"):
        load_probe(tmp_path / "nope")


# ---- scoring one answer ---------------------------------------------------------------------------------

CASES = [
    ({"check": "contains", "reference": "Paris"}, "The capital of France is Paris.", 1.0),
    ({"check": "contains", "reference": "Paris"}, "It is Lyon.", 0.0),
    ({"check": "contains", "reference": "ate"}, "I created it", 0.0),  # whole words only
    ({"check": "contains", "reference": "pound", "aliases": ["sterling"]}, "Pound sterling (GBP)", 1.0),
    ({"check": "contains", "reference": "APPLE", "case_sensitive": True}, "apple", 0.0),
    ({"check": "contains", "reference": "APPLE", "case_sensitive": True}, "APPLE", 1.0),
    ({"check": "exact", "reference": "blue"}, "Blue.", 1.0),
    ({"check": "exact", "reference": "blue"}, "The sky is blue.", 0.0),
    ({"check": "exact", "reference": "The cat sat on the mat."}, "\nthe cat sat on the mat\nmore", 1.0),
    ({"check": "starts", "reference": "no"}, "No, it is odd.", 1.0),
    ({"check": "starts", "reference": "no"}, "Not really", 0.0),
    ({"check": "number", "reference": "391", "prompt": "What is 17 times 23?"}, "17 times 23 is 391.", 1.0),
    ({"check": "number", "reference": "391", "prompt": "What is 17 times 23?"}, "It is 390", 0.0),
    ({"check": "number", "reference": "1000", "prompt": "What is 999 + 1?"}, "1,000", 1.0),
    ({"check": "number", "reference": "0.75", "prompt": "3 / 4?"}, "0.75", 1.0),
    (
        {"check": "number", "reference": "9", "prompt": "What is 81 divided by 9?"},
        "9",
        1.0,
    ),  # the answer is in the prompt
    ({"check": "number", "reference": "7", "prompt": "What is 15 - 8?"}, "seven", 0.0),
]


@pytest.mark.parametrize("question,answer,expected", CASES)
def test_score_answer(question, answer, expected):
    question = {"id": "x", "prompt": "", **question}
    assert score_answer(question, answer) == expected


def test_chrf_rewards_close_wording_more_than_unrelated_text():
    q = {"id": "w", "check": "chrf", "prompt": "", "reference": "The sun shines on the warm sand."}
    close = score_answer(q, "The sun is shining on warm sand.")
    far = score_answer(q, "Quantum chromodynamics.")
    assert 0.0 <= far < close < 1.0 and close > 0.5 and far < 0.2


# ---- verdict ----------------------------------------------------------------------------------------------

VERDICTS = [
    (0.0, 0.0, "low"),
    (0.099, -0.049, "low"),
    (0.10, 0.0, "moderate"),
    (0.0, -0.05, "moderate"),
    (0.29, -0.149, "moderate"),
    (0.30, 0.0, "high"),
    (0.0, -0.15, "high"),
    (-0.2, 0.1, "low"),  # better than base on both
]


@pytest.mark.parametrize("ppl,score,expected", VERDICTS)
def test_verdict_thresholds(ppl, score, expected):
    assert verdict(ppl, score) == expected


def test_thresholds_text_states_the_numbers():
    assert "10%" in fg.THRESHOLDS_TEXT and "30%" in fg.THRESHOLDS_TEXT
    assert "0.05" in fg.THRESHOLDS_TEXT and "0.15" in fg.THRESHOLDS_TEXT
    assert THRESHOLDS == {
        "perplexity_change": {"moderate": 0.10, "high": 0.30},
        "score_drop": {"moderate": 0.05, "high": 0.15},
    }


# ---- forgetting_eval on tiny runs --------------------------------------------------------------------------


def _write_chat(path: Path, n: int) -> Path:
    labels = ["billing", "shipping", "technical"]
    with open(path, "w") as fh:
        for i in range(n):
            msgs = [
                {"role": "user", "content": f"ticket {i}: my order number {i * 7} is late"},
                {"role": "assistant", "content": labels[i % 3]},
            ]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


def _train(tiny_model_dir, root: Path, method: str):
    import tunesmith

    data = _write_chat(root / "train.jsonl", 16)
    return tunesmith.train(
        None,
        quiet=True,
        log=QUIET,
        **{
            "model.name": str(tiny_model_dir),
            "data.train": str(data),
            "output": str(root / method),
            "method": method,
            "train.max_steps": 4,
            "train.batch_size": 4,
            "train.lr": 5e-2,
            "lora.r": 4,
            "train.seed": 1,
            "data.val_fraction": 0.0,
            "data.system_prompt": "Classify the ticket.",
            "train.threads": 2,
        },
    )


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    return _train(tiny_model_dir, tmp_path_factory.mktemp("fg"), "lora")


def test_base_against_itself_gives_zero_change_and_writes_the_contract(lora_run):
    from tunesmith import models

    model, tok = models.load(lora_run.config.model.name)
    lines = []
    result = forgetting_eval(lora_run, base=(model, tok), tuned=(model, tok), limit=12, log=lines.append)
    assert result["kl"]["mean_per_token"] == 0.0 and result["kl"]["tokens"] > 12 * 10
    assert result["perplexity"]["change"] == 0.0 and result["perplexity"]["base"] == result["perplexity"]["fine_tuned"]
    assert result["questions"]["change"] == 0.0
    assert result["verdict"] == "low"

    on_disk = json.loads((lora_run.path / "eval" / "forgetting.json").read_text())
    assert on_disk == result
    assert set(on_disk) >= {
        "version",
        "probe",
        "perplexity",
        "kl",
        "questions",
        "verdict",
        "thresholds",
        "explanation",
        "seconds",
    }
    assert on_disk["version"] == 1
    assert on_disk["probe"]["name"] == "tunesmith-general-v1" and on_disk["probe"]["questions"] == 12
    assert on_disk["probe"]["passages"] == 3 and on_disk["probe"]["text_tokens"] > 300
    q = on_disk["questions"]
    assert q["metric"] == "score" and 0.0 <= q["base"] <= 1.0
    assert sum(c["n"] for c in q["by_category"].values()) == 12
    assert set(q["by_category"]) <= set(CATEGORIES) and len(q["by_category"]) >= 4  # spread over the file
    examples = [json.loads(x) for x in (lora_run.path / "eval" / on_disk["examples_file"]).read_text().splitlines()]
    assert len(examples) == 12 and set(examples[0]["outputs"]) == {"base", "fine_tuned"}
    assert examples[0]["outputs"]["base"] == examples[0]["outputs"]["fine_tuned"]
    assert any("perplexity base" in line for line in lines) and any("answered 12/12" in line for line in lines)


def test_trained_lora_moves_away_from_base_and_zeroed_adapter_does_not(lora_run):
    import torch

    result = forgetting_eval(lora_run, limit=8, log=QUIET)  # base = the same model with its adapter disabled
    assert result["kl"]["mean_per_token"] > 1e-4
    assert result["perplexity"]["change"] != 0.0

    from tunesmith.evaluation.generate import load_run_model

    model, tok, _ = load_run_model(lora_run.path)  # a copy: the Run's cached model stays trained
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()  # B = 0: the adapter adds nothing, the model is the base model again
    zero = forgetting_eval(lora_run, tuned=(model, tok), limit=8, log=QUIET)
    assert zero["kl"]["mean_per_token"] == pytest.approx(0.0, abs=1e-7)
    assert zero["perplexity"]["change"] == pytest.approx(0.0, abs=1e-6)
    assert zero["questions"]["change"] == 0.0


def test_full_finetune_compares_against_a_fresh_base_copy(tiny_model_dir, tmp_path):
    run = _train(tiny_model_dir, tmp_path, "full")
    lines = []
    result = forgetting_eval(run, limit=8, log=lines.append)
    assert any("loading the base model" in line for line in lines)
    assert result["kl"]["mean_per_token"] > 1e-4


def test_custom_probe_and_bad_limit(lora_run, tmp_path):
    (tmp_path / "general_text.jsonl").write_text(
        json.dumps({"text": "A short passage about rivers and the sea. " * 5}) + "\n"
    )
    (tmp_path / "questions.jsonl").write_text(
        json.dumps(
            {"id": "q1", "category": "facts", "prompt": "Capital of France?", "reference": "Paris", "check": "contains"}
        )
        + "\n"
    )
    result = forgetting_eval(lora_run, limit=None, log=QUIET, probe=tmp_path)
    assert result["probe"]["name"] == f"custom:{tmp_path.name}" and result["probe"]["questions"] == 1
    with pytest.raises(DataError, match="limit must be a positive number"):
        forgetting_eval(lora_run, limit=0, log=QUIET)


def test_explanation_names_the_worst_category_when_forgetting_is_not_low():
    result = {
        "perplexity": {"change": 0.12},
        "questions": {
            "base": 0.5,
            "fine_tuned": 0.4,
            "change": -0.1,
            "by_category": {"facts": {"base": 0.5, "fine_tuned": 0.45}, "arithmetic": {"base": 0.5, "fine_tuned": 0.2}},
        },
        "verdict": "moderate",
    }
    text = fg.explain(result)
    assert text.startswith("Forgetting is moderate: perplexity on general text rose 12.0%")
    assert "worst in arithmetic" in text and "train.replay" in text
    assert "use LoRA instead" in fg.explain(result, "full") and "use LoRA" not in fg.explain(result, "lora")


def test_shared_prefix_kl_equals_scoring_each_sequence_whole(lora_run):
    import torch

    model, tok, _ = lora_run.load_model()
    base, tuned = fg._System(model, disable_adapter=True), fg._System(model)
    prefix = [1, 9, 42, 7, 300, 12, 5, 77, 8, 19]
    seqs = [prefix + [100 + i] * (i % 4 + 1) + [i + 3] for i in range(7)]
    got, n = fg.mean_kl(base, tuned, seqs, batch_size=3)
    total, count = 0.0, 0
    for s in seqs:  # one at a time, no padding, no cache
        ids = torch.tensor([s])
        p = torch.log_softmax(base.logits(ids, torch.ones_like(ids))[0, :-1], -1)
        q = torch.log_softmax(tuned.logits(ids, torch.ones_like(ids))[0, :-1], -1)
        total += (p.exp() * (p - q)).sum().item()
        count += len(s) - 1
    assert n == count
    assert got == pytest.approx(total / count, rel=1e-4)
    assert got > 0
