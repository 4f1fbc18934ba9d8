"""The prompting baseline `tunesmith eval` compares with: shots that cover the labels, retrieved shots drawn from
the training pool only, contextual calibration as defined, and the best variant chosen on validation, never test."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

import tunesmith
from tunesmith.config import validate_config
from tunesmith.data.example import Example, Message
from tunesmith.data.formats import read_examples
from tunesmith.evaluation import prompting, task_eval
from tunesmith.evaluation.measure import SystemResult
from tunesmith.evaluation.prompting import PromptVariant, ShotSource, variants
from tunesmith.evaluation.shots import ShotRetriever
from tunesmith.evaluation.systems import System
from tunesmith.evaluation.tasks import TaskPlan

LABELS = ["billing", "shipping", "technical"]
WORDS = {
    "billing": ["invoice", "refund", "charge"],
    "shipping": ["parcel", "courier", "tracking"],
    "technical": ["crash", "error", "freeze"],
}


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "system", "content": "Classify the ticket."},
                {"role": "user", "content": f"ticket {seed}-{i}: " + " ".join(rng.sample(WORDS[lab], 2))},
                {"role": "assistant", "content": lab},
            ]
        }
        for i, lab in ((i, LABELS[i % 3]) for i in range(n))
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ex(user: str, answer: str, source: str = "t.jsonl:1") -> Example:
    return Example(
        kind="chat",
        messages=[Message("system", "Classify."), Message("user", user), Message("assistant", answer)],
        source=source,
    )


def _tiny_run(tiny_model_dir, tmp_path, train: Path, test: Path, **overrides):
    """One LoRA step on the tiny model: a finished run an evaluation can load."""
    return tunesmith.train(
        None,
        quiet=True,
        log=lambda *_: None,
        **{
            "model.name": str(tiny_model_dir),
            "data.train": str(train),
            "data.test": str(test),
            "output": str(tmp_path / "run"),
            "train.max_steps": 1,
            "train.batch_size": 4,
            "data.max_length": 64,
            "lora.r": 2,
            "train.threads": 1,
            **overrides,
        },
    )


class _Renderer:
    system_prompt = None
    raw_prompts = False


# ---- calibration and decision rules ------------------------------------------------------------------------------


def test_calibrated_decision_divides_by_the_content_free_probabilities():
    """Hand-computed: p = (0.7, 0.3), content-free p = (0.8, 0.2) -> (0.7/0.8, 0.3/0.2) / 2.375 = (0.368, 0.632):
    calibration flips the prediction from the first label to the second."""
    res = SystemResult(
        predictions=["a"],
        outputs=["a"],
        label_scores=[[(math.log(0.7), 1), (math.log(0.3), 1)]],
        content_free=[[[math.log(0.8), math.log(0.2)]]],
    )
    assert res.decided(["a", "b"]).predictions == ["a"]
    calibrated = res.decided(["a", "b"], calibrated=True)
    assert calibrated.predictions == ["b"] and calibrated.outputs == ["b"]
    from tunesmith.evaluation.calibration import calibrate

    assert calibrate([math.log(0.7), math.log(0.3)], [0.8, 0.2]) == pytest.approx([0.875 / 2.375, 1.5 / 2.375])


def test_length_normalised_decision_uses_the_mean_log_probability_per_token():
    # label a: 2 tokens, total log p -1.0 (mean -0.5); label b: 1 token, log p -0.8: the sum prefers b (-0.8 > -1.0),
    # the mean per token prefers a (-0.5 > -0.8)
    res = SystemResult(predictions=["b"], outputs=["b"], label_scores=[[(-1.0, 2), (-0.8, 1)]])
    assert res.decided(["a", "b"]).predictions == ["b"]
    assert res.decided(["a", "b"], length_norm=True).predictions == ["a"]


def test_variants_cover_every_rule_cheapest_first():
    plan = TaskPlan("classification", "accuracy", LABELS, ("score", "generate"))
    tried = variants(plan, 3, 8, "Answer with one label.")
    assert len(tried) == 16 and tried[0] == PromptVariant()
    assert [v.prompt for v in tried[::4]] == [
        ("none", 0, False),
        ("none", 0, True),
        ("random", 3, False),
        ("knn", 8, False),
    ]
    text = TaskPlan("text", "chrf")
    assert [v.key for v in variants(text, 3, 4, None)] == ["zero_shot", "random_3", "knn_4"]


# ---- systems: instructions, content-free inputs, retrieved shots --------------------------------------------------


def test_content_free_input_keeps_the_system_prompt_and_the_shots():
    train = [_ex(f"parcel {i} courier", "shipping", f"train.jsonl:{i}") for i in range(4)]
    train += [_ex(f"refund {i} invoice", "billing", f"train.jsonl:{i + 4}") for i in range(4)]
    system = System("k", "k", None, None, _Renderer(), retriever=ShotRetriever(train, 2), instruction="Say a label.")
    query = _ex("where is my parcel courier", "shipping", "test.jsonl:1")
    shots = system.shots_for(query)
    assert all(s.answer() == "shipping" for s in shots)
    free = system.content_free(query, "N/A")
    msgs = system.messages(free, shots)
    assert msgs[0] == Message("system", "Classify.\n\nSay a label.")
    assert [m.content for m in msgs[1:-1]] == [m for s in shots for m in (s.messages[1].content, s.answer())]
    assert msgs[-1] == Message("user", "N/A")


def test_validation_and_shot_pool_never_overlap_and_knn_draws_from_the_pool(tmp_path):
    train = read_examples(str(_write(tmp_path / "train.jsonl", _rows(60, 0))))
    test = read_examples(str(_write(tmp_path / "test.jsonl", _rows(12, 1))))
    cfg = validate_config({"data": {"train": str(tmp_path / "train.jsonl"), "val_fraction": 0.2}})
    source = ShotSource.of(cfg, train)
    pool, validation, split = source.pool, source.validation, source.split
    assert validation and "held out" in split
    assert not {e.source for e in pool} & {e.source for e in validation}
    assert len(pool) + len(validation) == len(train)
    retriever = ShotRetriever(pool, 4)
    sources = {e.source for e in pool}
    for shots in retriever.shots_for_many(validation + test):
        assert len(shots) == 4 and {s.source for s in shots} <= sources
    assert retriever.shots_for_many(test) == retriever.shots_for_many(test)  # deterministic


# ---- the best prompt is chosen on validation, never on test --------------------------------------------------------


def _fake_measure(system, examples, plan, **kwargs):
    """Few-shot prompts answer every VALIDATION example right and every TEST example wrong; every other prompt does
    the opposite. So the validation-best (few-shot) is the test-worst."""
    is_test = examples[0].source.startswith(str(_fake_measure.test_file))
    few_shot = bool(system.shots) and system.retriever is None
    right = few_shot != is_test
    scores, preds = [], []
    for ex in examples:
        ref = ex.answer()
        pred = ref if right else next(label for label in plan.labels if label != ref)
        preds.append(pred)
        scores.append([(-1.0 if label == pred else -5.0, 1) for label in plan.labels])
    content_free = [[[-2.0] * len(plan.labels)] for _ in examples] if kwargs.get("calibrate") else None
    return SystemResult(
        outputs=preds,
        predictions=preds,
        label_scores=scores,
        content_free=content_free,
        generated=list(preds) if "generate" in plan.by else None,
        prompt_tokens=10.0,
        seconds={"score": 0.01},
    )


def test_best_prompt_is_chosen_on_validation_even_where_test_says_otherwise(tiny_model_dir, tmp_path, monkeypatch):
    train = _write(tmp_path / "train.jsonl", _rows(30, 0))
    val = _write(tmp_path / "val.jsonl", _rows(9, 2))
    test = _write(tmp_path / "test.jsonl", _rows(9, 1))
    run = _tiny_run(tiny_model_dir, tmp_path, train, test, **{"data.validation": str(val)})
    _fake_measure.test_file = test
    monkeypatch.setattr(prompting, "measure", _fake_measure)
    monkeypatch.setattr(task_eval, "measure", _fake_measure)
    result = tunesmith.evaluate(
        run, by="score", shots=3, knn_shots=2, forgetting=False, quiet=True, log=lambda *_: None
    )
    systems = {s["key"]: s for s in result["systems"]}
    selection = result["prompt_selection"]
    assert Path(selection["split"]).resolve() == val.resolve() and selection["examples"] == 9
    assert selection["chosen"] == "random_3"  # the first variant that is right on every validation example
    assert systems["base_best_prompt"]["prompt"]["key"] == "random_3"
    # on the test split the chosen prompt is the worst: the comparison reports it anyway
    assert systems["base_best_prompt"]["metrics"]["accuracy"] == 0.0
    assert systems["base_zero_shot"]["metrics"]["accuracy"] == 1.0
    page = tunesmith.report(run).read_text()
    assert "never on the test split" in page and "3-shot (chosen)" in page


def test_fewer_shots_than_labels_needs_asking(tiny_model_dir, tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows(30, 0))
    test = _write(tmp_path / "test.jsonl", _rows(6, 1))
    run = _tiny_run(tiny_model_dir, tmp_path, train, test, **{"data.val_fraction": 0.0})
    with pytest.raises(tunesmith.errors.ConfigError, match="--shots 2 cannot show every one of the 3 labels"):
        tunesmith.evaluate(run, shots=2, forgetting=False, quiet=True, log=lambda *_: None)
    lines = []
    result = tunesmith.evaluate(
        run,
        by="score",
        shots=2,
        allow_missing_labels=True,
        select=False,
        forgetting=False,
        quiet=True,
        log=lines.append,
    )
    few = next(s for s in result["systems"] if s["key"] == "base_few_shot")
    assert few["shots"] == 2 and len(few["labels_missing"]) == 1
    assert any("shows no example of" in line for line in lines)
    auto = tunesmith.evaluate(run, by="score", select=False, forgetting=False, quiet=True, log=lambda *_: None)
    few = next(s for s in auto["systems"] if s["key"] == "base_few_shot")
    assert few["shots"] == 3 and "labels_missing" not in few  # auto: at least one shot per label


def test_content_free_scores_equal_scoring_the_content_free_prompt_whole(tiny_model_dir, tmp_path):
    """What calibration divides by: the labels' log-probabilities after "N/A", "" and "[MASK]" in the system's own
    prompt, equal to scoring those prompts directly. The test inputs all start with the same words, so their shared
    prefix cache reaches into the input and must not be reused for the content-free prompts."""
    from tunesmith import models
    from tunesmith.data.templates import Renderer
    from tunesmith.evaluation.classify import full_sequence_logprobs
    from tunesmith.evaluation.measure import CONTENT_FREE, measure
    from tunesmith.evaluation.shots import pick_shots
    from tunesmith.progress import Progress

    train = read_examples(str(_write(tmp_path / "train.jsonl", _rows(12, 0))))
    test = read_examples(str(_write(tmp_path / "test.jsonl", _rows(5, 1))))  # every input starts "ticket 1-"
    model, tok = models.load(str(tiny_model_dir))
    model.eval()
    system = System("few", "few", model, tok, Renderer(tok), shots=pick_shots(train, 3, LABELS, 0))
    plan = TaskPlan("classification", "accuracy", LABELS, ("score",))
    res = measure(
        system, test, plan, batch_size=2, max_new_tokens=4, max_length=None, progress=Progress(None), calibrate=True
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for ex, got in zip(test, res.content_free):
        assert len(got) == len(CONTENT_FREE)
        for text, logprobs in zip(CONTENT_FREE, got):
            free = system.content_free(ex, text)
            prompt = system.prompt(free)
            assert prompt != system.prompt(ex) and ex.messages[1].content not in tok.decode(prompt)  # input replaced
            conts = [system.pair(free, label)[1] for label in LABELS]
            expected = [lp for lp, _ in full_sequence_logprobs(model, prompt, conts, pad=pad)]
            assert logprobs == pytest.approx(expected, abs=2e-4)
    # and calibration is applied with exactly these numbers
    from tunesmith.evaluation.calibration import content_free_prior, predict

    calibrated = res.decided(LABELS, calibrated=True).predictions
    for row, free, pred in zip(res.label_scores, res.content_free, calibrated):
        assert pred == LABELS[predict([lp for lp, _ in row], prior=content_free_prior(free))]


@pytest.mark.parametrize("batch_size", [None, 2])
def test_retrieved_shots_are_scored_calibrated_and_generated_in_one_forward(tiny_model_dir, tmp_path, batch_size):
    """With retrieved shots, label scoring, the content-free input (a branch of the example's row that shares its
    shots) and generation (decoded from the scoring forward's cache) give what each gives measured alone: the
    full-sequence log-likelihoods, and greedy_batch's answers."""
    from tunesmith import models
    from tunesmith.data.templates import Renderer
    from tunesmith.evaluation.classify import full_sequence_logprobs
    from tunesmith.evaluation.generate import greedy_batch
    from tunesmith.evaluation.measure import CONTENT_FREE_PER_EXAMPLE, measure
    from tunesmith.progress import Progress

    train = read_examples(str(_write(tmp_path / "train.jsonl", _rows(12, 0))))
    test = read_examples(str(_write(tmp_path / "test.jsonl", _rows(5, 1))))
    model, tok = models.load(str(tiny_model_dir))
    model.eval()
    system = System("knn", "knn", model, tok, Renderer(tok), retriever=ShotRetriever(train, 3))
    plan = TaskPlan("classification", "accuracy", LABELS, ("score", "generate"))
    res = measure(
        system,
        test,
        plan,
        batch_size=batch_size,
        max_new_tokens=5,
        max_length=None,
        progress=Progress(None),
        calibrate=True,
    )
    assert set(res.seconds) == {"score", "generate", "calibration"} and all(v > 0 for v in res.seconds.values())
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    kwargs = dict(stop_ids=system.renderer.stop_token_ids, stop_strings=system.renderer.stop_strings)
    for ex, scores, free_scores, generated in zip(test, res.label_scores, res.content_free, res.generated):
        prompt = system.prompt(ex)
        conts = [system.pair(ex, label)[1] for label in LABELS]
        expected = [lp for lp, _ in full_sequence_logprobs(model, prompt, conts, pad=pad)]
        assert [lp for lp, _ in scores] == pytest.approx(expected, abs=2e-4)
        assert len(free_scores) == len(CONTENT_FREE_PER_EXAMPLE)
        free = system.content_free(ex, CONTENT_FREE_PER_EXAMPLE[0])
        free_prompt = system.prompt(free, system.shots_for(ex))
        assert free_prompt[:20] == prompt[:20] and free_prompt != prompt  # same shots, input replaced
        free_conts = [system.pair(free, label, system.shots_for(ex))[1] for label in LABELS]
        expected = [lp for lp, _ in full_sequence_logprobs(model, free_prompt, free_conts, pad=pad)]
        assert free_scores[0] == pytest.approx(expected, abs=2e-4)
        assert generated == greedy_batch(model, tok, [prompt], max_new_tokens=5, **kwargs)[0].strip()


def test_evaluate_prompts_measures_the_baseline_without_a_run(tiny_model_dir, tmp_path):
    """The prompted systems of a config alone (what `make results --prompt-only` records for runs that are gone; only
    the config is used, no model of the run) equal what `tunesmith eval` reports for the same config's base
    systems."""
    from tunesmith.evaluation.task_eval import evaluate_prompts

    train = _write(tmp_path / "train.jsonl", _rows(30, 0))
    test = _write(tmp_path / "test.jsonl", _rows(6, 1))
    run = _tiny_run(tiny_model_dir, tmp_path, train, test, **{"train.seed": 3})
    alone = evaluate_prompts(run.config, by="score", knn_shots=2, select_limit=3, log=lambda *_: None)
    assert [s["key"] for s in alone["systems"]] == ["base_zero_shot", "base_few_shot", "base_best_prompt"]
    assert alone["prompt_selection"]["examples"] == 3
    full = tunesmith.evaluate(
        run, by="score", knn_shots=2, select_limit=3, forgetting=False, quiet=True, log=lambda *_: None
    )
    for a, b in zip(alone["systems"], full["systems"]):
        assert a["key"] == b["key"] and a["prompt"] == b["prompt"] and a["metrics"] == b["metrics"]
