"""From what each system produced to metrics: per-system metrics, per-example scores, flipped examples."""

from __future__ import annotations

import math

from tunesmith.data.example import Example
from tunesmith.evaluation.measure import SystemResult
from tunesmith.evaluation.tasks import METRICS, TaskPlan

FLIP_THRESHOLD = 0.5  # a per-example score in 0..1 "passes" at or above this (0/1 scores: right or wrong)


def system_metrics(plan: TaskPlan, test: list[Example], res: SystemResult) -> tuple[dict, list[float], dict]:
    """(metrics, per-example primary score, extra fields: per_label and confusion for classification)."""
    from tunesmith.evaluation import metrics as M

    refs = [(ex.answer() or "").strip() for ex in test]
    out: dict[str, float] = {}
    extra: dict = {}
    per: dict[str, list[float]] = {}
    if plan.task == "classification":
        from tunesmith.evaluation.classify import parse_label

        report = None
        if res.predictions is not None:
            report = M.classification_report(refs, res.predictions, plan.labels)
            out.update(accuracy=report["accuracy"], macro_f1=report["macro_f1"])
            per["accuracy"] = per["macro_f1"] = [float(p == r) for p, r in zip(res.predictions, refs)]
        if res.generated is not None:
            parsed = [parse_label(g, plan.labels) for g in res.generated]
            gen = M.classification_report(refs, parsed, plan.labels)
            out.update(
                accuracy_generated=gen["accuracy"],
                macro_f1_generated=gen["macro_f1"],
                invalid_rate=sum(p is None for p in parsed) / len(parsed),
            )
            per["accuracy_generated"] = per["macro_f1_generated"] = [float(p == r) for p, r in zip(parsed, refs)]
            per["invalid_rate"] = [float(p is None) for p in parsed]
            report = report or gen
        extra = {"per_label": report["per_label"], "confusion": report["confusion"]}
    elif plan.task == "extraction":
        references = [M.parse_json_object(r) for r in refs]
        out, per_f1 = M.extraction_report(res.generated, references)
        per = {k: per_f1 for k in out}
        per["exact_match"] = [
            float(M.parse_json_object(g) is not None and M.field_pairs(M.parse_json_object(g)) == M.field_pairs(r))
            for g, r in zip(res.generated, references)
        ]
    elif plan.task == "text":
        out, per = M.text_report(res.generated, refs)
    if plan.format is not None and res.generated is not None:
        per["format_rate"] = M.format_matches(res.generated, plan.format)
        out["format_rate"] = sum(per["format_rate"]) / max(len(per["format_rate"]), 1)
    if res.nll is not None:
        total, count = sum(n for n, _ in res.nll), sum(c for _, c in res.nll)
        out["loss"] = total / count if count else math.nan
        out["perplexity"] = M.perplexity(total, count)
        per["loss"] = [n / c if c else 0.0 for n, c in res.nll]
        per["perplexity"] = [math.exp(n / c) if c else math.inf for n, c in res.nll]
    return out, per.get(plan.primary, []), extra


def flipped(test, records, primary: str) -> dict:
    """Examples whose outcome changed between base zero-shot and fine-tuned: 0/1 scores flip between right and
    wrong, scores in 0..1 cross FLIP_THRESHOLD. Lower-is-better metrics (loss, perplexity) have no pass mark:
    nothing is listed for them."""
    out = {"improved": [], "regressed": []}
    if not METRICS[primary][1]:
        return out
    for rec in records:
        scores = rec["scores"]
        if "base_zero_shot" not in scores or "fine_tuned" not in scores:
            continue
        before, after = scores["base_zero_shot"] >= FLIP_THRESHOLD, scores["fine_tuned"] >= FLIP_THRESHOLD
        if before != after:
            item = {
                "id": rec["id"],
                "input": rec["input"],
                "reference": rec["reference"],
                "base": rec["outputs"].get("base_zero_shot", ""),
                "tuned": rec["outputs"].get("fine_tuned", ""),
            }
            out["improved" if after else "regressed"].append(item)
    return out
