"""Task metrics: classification, structured (JSON) extraction, free text and language modelling.

Plain Python (sacrebleu for chrF), no torch, so every metric is unit-tested on hand-computed values.
Conventions:
- rates are in 0..1 (chrF too: sacrebleu's 0..100 score divided by 100);
- a metric over an empty set is 0.0, and a precision with no predictions is 0.0 (scikit-learn's convention);
- classification predictions may be None (a generation that names no label): wrong, and not in the confusion
  matrix, whose rows and columns are the labels in the given order.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from typing import Any, Sequence

# ---- classification ------------------------------------------------------------------------------------


def accuracy(references: Sequence[str], predictions: Sequence[str | None]) -> float:
    if not references:
        return 0.0
    return sum(p == r for r, p in zip(references, predictions)) / len(references)


def prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    """(precision, recall, F1) from counts; 0.0 where a denominator is 0."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def classification_report(references: Sequence[str], predictions: Sequence[str | None], labels: Sequence[str]) -> dict:
    """accuracy, macro_f1 (unweighted mean of the labels' F1), per_label {precision, recall, f1, support} and
    confusion (rows = reference label, columns = predicted label, in `labels` order)."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for r, p in zip(references, predictions):
        if r in index and p in index:
            confusion[index[r]][index[p]] += 1
    per_label = {}
    for label in labels:
        tp = sum(1 for r, p in zip(references, predictions) if r == label and p == label)
        fp = sum(1 for r, p in zip(references, predictions) if r != label and p == label)
        fn = sum(1 for r, p in zip(references, predictions) if r == label and p != label)
        precision, recall, f1 = prf(tp, fp, fn)
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    macro_f1 = sum(v["f1"] for v in per_label.values()) / len(labels) if labels else 0.0
    return {
        "accuracy": accuracy(references, predictions),
        "macro_f1": macro_f1,
        "per_label": per_label,
        "confusion": confusion,
    }


# ---- text normalisation, exact match, token F1 ------------------------------------------------------------

_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    """Case-folded, whitespace collapsed, trimmed (for exact match)."""
    return " ".join(text.casefold().split())


def tokens(text: str) -> list[str]:
    """Words for token F1 and ROUGE-L: case-folded, punctuation removed, split on whitespace."""
    return text.casefold().translate(_PUNCT).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of the bag of words of prediction and reference (1.0 when both are empty)."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred and not ref:
        return 1.0
    overlap = sum((Counter(pred) & Counter(ref)).values())
    return prf(overlap, len(pred) - overlap, len(ref) - overlap)[2]


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming, one row of memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over words: LCS / length of each side, combined as F1 (beta = 1)."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred and not ref:
        return 1.0
    lcs = lcs_length(pred, ref)
    return prf(lcs, len(pred) - lcs, len(ref) - lcs)[2]


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), in 0..1."""
    from sacrebleu.metrics import CHRF

    if not predictions:
        return 0.0
    return CHRF().corpus_score(list(predictions), [list(references)]).score / 100


def sentence_chrf(prediction: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(prediction, [reference]).score / 100


# ---- language modelling -------------------------------------------------------------------------------------


def format_matches(predictions: Sequence[str], pattern: str) -> list[float]:
    """1.0 for each prediction that matches `pattern` in full (surrounding whitespace ignored), else 0.0."""
    from tunesmith.config import compile_format

    regex = compile_format(pattern)
    return [float(regex.fullmatch(p.strip()) is not None) for p in predictions]


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token); inf without tokens."""
    return math.exp(total_nll / n_tokens) if n_tokens else math.inf


# ---- structured extraction (JSON answers) --------------------------------------------------------------------

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)


def parse_json_object(text: str) -> dict | None:
    """The JSON object a text is, or None. Surrounding whitespace and one Markdown code fence are allowed
    (models often wrap JSON in ```json ... ```); anything else around the object makes it invalid."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    """Nested objects flattened with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}. Arrays stay leaves.
    An empty nested object is a leaf ({} under its key)."""
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def infer_schema(references: Sequence[dict]) -> dict:
    """The schema the reference objects share: {"required": keys in every reference, "types": {key: set of
    JSON type names seen}} over flattened keys. A key seen only in some references is optional."""
    flats = [flatten(r) for r in references]
    types: dict[str, set[str]] = {}
    for flat in flats:
        for key, value in flat.items():
            types.setdefault(key, set()).add(json_type(value))
    required = set.intersection(*(set(f) for f in flats)) if flats else set()
    return {"required": required, "types": types}


def matches_schema(obj: dict | None, schema: dict) -> bool:
    """True if the object has every required key, no unknown key, and each value of a type the references use."""
    if obj is None:
        return False
    flat = flatten(obj)
    if not schema["required"] <= set(flat):
        return False
    return all(key in schema["types"] and json_type(v) in schema["types"][key] for key, v in flat.items())


def normalize_value(value: Any) -> Any:
    """Comparable form of a JSON value: strings normalised as in exact match, numbers as floats, arrays and
    objects as canonical JSON of their normalised items."""
    if isinstance(value, str):
        return normalize(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return json.dumps([normalize_value(v) for v in value], sort_keys=True)
    return json.dumps({k: normalize_value(v) for k, v in value.items()}, sort_keys=True)


def field_pairs(obj: dict | None) -> set[tuple[str, Any]]:
    if obj is None:
        return set()
    return {(key, normalize_value(v)) for key, v in flatten(obj).items()}


def field_counts(prediction: dict | None, reference: dict) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) over (dotted key, normalised value) pairs."""
    pred, ref = field_pairs(prediction), field_pairs(reference)
    tp = len(pred & ref)
    return tp, len(pred) - tp, len(ref) - tp


def extraction_report(predictions: Sequence[str], references: Sequence[dict]) -> tuple[dict, list[float]]:
    """Corpus metrics of JSON outputs against reference objects, and each example's field F1.

    parse_rate: outputs that are a JSON object; schema_match_rate: outputs that match the references' schema
    (see infer_schema); exact_match: the output object equals the reference (normalised values);
    field_precision/recall/f1: micro-averaged over (key, value) pairs of all examples."""
    schema = infer_schema(references)
    parsed = [parse_json_object(p) for p in predictions]
    tp = fp = fn = 0
    per_example = []
    exact = 0
    for obj, ref in zip(parsed, references):
        t, f_p, f_n = field_counts(obj, ref)
        tp, fp, fn = tp + t, fp + f_p, fn + f_n
        per_example.append(prf(t, f_p, f_n)[2] if (t + f_p + f_n) else 1.0)
        exact += obj is not None and field_pairs(obj) == field_pairs(ref)
    n = len(references) or 1
    precision, recall, f1 = prf(tp, fp, fn)
    metrics = {
        "parse_rate": sum(o is not None for o in parsed) / n,
        "schema_match_rate": sum(matches_schema(o, schema) for o in parsed) / n,
        "exact_match": exact / n,
        "field_precision": precision,
        "field_recall": recall,
        "field_f1": f1,
    }
    return metrics, per_example


def text_report(predictions: Sequence[str], references: Sequence[str]) -> tuple[dict, dict[str, list[float]]]:
    """exact_match, token_f1, rouge_l (means of per-example values) and corpus chrf; plus per-example values."""
    per = {
        "exact_match": [exact_match(p, r) for p, r in zip(predictions, references)],
        "token_f1": [token_f1(p, r) for p, r in zip(predictions, references)],
        "rouge_l": [rouge_l(p, r) for p, r in zip(predictions, references)],
        "chrf": [sentence_chrf(p, r) for p, r in zip(predictions, references)],
    }
    n = len(references) or 1
    metrics = {k: sum(v) / n for k, v in per.items() if k != "chrf"}
    metrics["chrf"] = chrf(predictions, references)
    return metrics, per
