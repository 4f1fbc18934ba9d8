"""What an evaluation measures: the task (from the data), its metrics and its primary metric.

Tasks: classification (label scoring and/or greedy generation), extraction (JSON answers), text (free text) and
lm (raw text: loss and perplexity only). `plan_task` detects the task from the data; `metric=` overrides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunesmith.data.example import Example
from tunesmith.errors import ConfigError, DataError

TASKS = ("classification", "extraction", "text", "lm", "preference")
PRIMARY = {
    "classification": "accuracy",
    "extraction": "field_f1",
    "text": "chrf",
    "lm": "perplexity",
    "preference": "preference_accuracy",
}
MAX_LABELS = 50
LABEL_COVERAGE = 0.8  # share of test answers that must be training labels for a classification eval

# name -> (task, higher_is_better, description)
METRICS: dict[str, tuple[str, bool, str]] = {
    "accuracy": ("classification", True, "share of examples whose label is right (label scoring)"),
    "macro_f1": ("classification", True, "mean over labels of F1 (label scoring)"),
    "accuracy_generated": ("classification", True, "share of greedy generations that name the right label"),
    "macro_f1_generated": ("classification", True, "mean over labels of F1 of the generated labels"),
    "invalid_rate": ("classification", False, "share of greedy generations that name no valid label"),
    "parse_rate": ("extraction", True, "share of outputs that are a JSON object"),
    "schema_match_rate": ("extraction", True, "share of outputs with the references' keys and value types"),
    "exact_match": ("text", True, "share of outputs equal to the reference (case and spacing ignored)"),
    "field_precision": ("extraction", True, "share of output (key, value) pairs that are in the reference"),
    "field_recall": ("extraction", True, "share of reference (key, value) pairs found in the output"),
    "field_f1": ("extraction", True, "F1 of (key, value) pairs, nested keys dotted, micro-averaged"),
    "token_f1": ("text", True, "word-overlap F1 between output and reference (mean per example)"),
    "chrf": ("text", True, "chrF character n-gram F-score (sacrebleu), 0..1"),
    "rouge_l": ("text", True, "ROUGE-L: longest common word subsequence F1 (mean per example)"),
    "loss": ("text", False, "mean negative log-likelihood per reference token (nats)"),
    "format_rate": ("text", True, "share of generated answers that match eval.format (a regular expression) in full"),
    "perplexity": ("lm", False, "exp(loss): perplexity of the reference tokens"),
    # preference pairs (evaluation/preference_eval.py)
    "preference_accuracy": (
        "preference",
        True,
        "share of pairs ranked chosen above rejected (base: log-likelihood; fine-tuned: its objective's reward)",
    ),
    "logp_margin": ("preference", True, "mean log p(chosen) - log p(rejected), nats"),
    "reward_margin": ("preference", True, "mean margin of the training objective's reward (fine-tuned only)"),
    "refusal_rate_harmful": ("preference", True, "share of harmful prompts the system refuses (generated answers)"),
    "over_refusal_rate_harmless": ("preference", False, "share of harmless prompts the system refuses (generated)"),
    "refusal_accuracy": (
        "preference",
        True,
        "share of prompts handled as their category asks: refuse harmful, answer harmless (generated answers)",
    ),
}
TASK_METRICS = {
    "classification": ["accuracy", "macro_f1", "accuracy_generated", "macro_f1_generated", "invalid_rate"],
    "extraction": [
        "field_f1",
        "field_precision",
        "field_recall",
        "parse_rate",
        "schema_match_rate",
        "exact_match",
        "loss",
        "perplexity",
    ],
    "text": ["chrf", "rouge_l", "token_f1", "exact_match", "format_rate", "loss", "perplexity"],
    "lm": ["perplexity", "loss"],
    "preference": [
        "preference_accuracy",
        "logp_margin",
        "reward_margin",
        "refusal_rate_harmful",
        "over_refusal_rate_harmless",
        "refusal_accuracy",
    ],
}


@dataclass
class TaskPlan:
    task: str
    primary: str
    labels: list[str] | None = None
    by: tuple[str, ...] = ()  # classification: ("score",), ("generate",) or both
    format: str | None = None  # eval.format: generated answers are also checked against this regular expression


def plan_task(train: list[Example], test: list[Example], metric: str | None, by: str | None) -> TaskPlan:
    """Task from the data: labels -> classification; every reference a JSON object -> extraction; raw text ->
    lm; else free text. `metric` (a task name or a metric name) overrides."""
    from tunesmith.data.validate import is_classification
    from tunesmith.evaluation.metrics import parse_json_object

    task = primary = None
    if metric is not None:
        if metric in TASKS:
            task = metric
        elif metric in METRICS:
            task, primary = METRICS[metric][0], metric
            if metric in ("exact_match", "loss") and references_are_json(test):
                task = "extraction"
            if metric == "perplexity" and test and test[0].kind != "text":
                task = "text"
        else:
            raise ConfigError(
                f"--metric {metric!r} is not known; use a task ({', '.join(TASKS)}) or a metric ({', '.join(METRICS)})"
            )
    kinds = {ex.kind for ex in test}
    if "preference" in kinds:
        raise DataError(
            "the test data holds preference pairs (prompt/chosen/rejected); evaluate on chat, "
            "prompt/completion or text rows"
        )
    if task == "preference":
        raise DataError(
            f"--metric {metric}: preference metrics are measured on preference pairs; this test data is {sorted(kinds)}"
        )
    if kinds == {"text"} or task == "lm":
        if kinds != {"text"}:
            raise DataError(f"--metric {metric}: the lm task measures raw text rows; this test data is {sorted(kinds)}")
        return TaskPlan("lm", primary if primary in TASK_METRICS["lm"] else "perplexity")
    if "text" in kinds:
        raise DataError("the test data mixes raw text rows with prompt/answer rows; use one kind per file")

    labels = None
    if task in (None, "classification"):
        # the training labels, if the test answers are (mostly) among them; else labels of the test data itself
        labels = is_classification(train)
        refs = [(ex.answer() or "").strip() for ex in test]
        if labels and sum(r in labels for r in refs) < LABEL_COVERAGE * len(refs):
            labels = None
        labels = labels or is_classification(test)
        if task == "classification" and not labels:
            answers = sorted({(ex.answer() or "").strip() for ex in [*train, *test]} - {""})
            if len(answers) > MAX_LABELS:
                raise DataError(
                    f"--metric {metric}: the answers take {len(answers)} different values; classification "
                    f"needs at most {MAX_LABELS} labels"
                )
            labels = answers
        if labels:
            task = "classification"
    if task is None:
        task = "extraction" if references_are_json(test) else "text"
    if task == "extraction" and not references_are_json(test):
        bad = [ex.source for ex in test if parse_json_object(ex.answer() or "") is None][:3]
        raise DataError(
            f"--metric {metric}: extraction needs every reference answer to be a JSON object; "
            f"these are not: {', '.join(bad)}"
        )
    modes = {"score": ("score",), "generate": ("generate",), "both": ("score", "generate"), None: ("score", "generate")}
    if by not in modes:
        raise ConfigError(f"--by {by!r}: use score, generate or both")
    plan_by = modes[by] if task == "classification" else ()
    if primary is None or primary not in TASK_METRICS[task]:
        primary = PRIMARY[task]
    if task == "classification" and plan_by == ("generate",) and primary in ("accuracy", "macro_f1"):
        primary += "_generated"
    if (
        task == "classification"
        and plan_by == ("score",)
        and primary in ("accuracy_generated", "macro_f1_generated", "invalid_rate")
    ):
        raise ConfigError(f"--metric {primary} needs generation; use --by generate or --by both")
    return TaskPlan(task, primary, labels, plan_by)


def references_are_json(test: list[Example]) -> bool:
    from tunesmith.evaluation.metrics import parse_json_object

    return bool(test) and all(parse_json_object(ex.answer() or "") is not None for ex in test)


def max_new_tokens_for(plan: TaskPlan, tokenizer, test: list[Example], cap: int = 512) -> int:
    """Room for the longest reference and a margin: 1.5x its tokens + 16 (labels: + 8), at most `cap`."""
    if plan.task == "classification":
        return max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in plan.labels) + 8
    longest = max(len(tokenizer(ex.answer() or "", add_special_tokens=False)["input_ids"]) for ex in test)
    return min(cap, math.ceil(1.5 * longest) + 16)
