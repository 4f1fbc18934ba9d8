"""Base model (prompted with the same system prompt) vs fine-tuned model on a run's held-out classification data.

Each model is measured two ways: label scoring (the most likely label, see classify.py) and free generation
(the answer parsed as a label; answers that name no label count as wrong and are reported as invalid).
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def classification_comparison(run, limit: int | None = None, batch_size: int = 8) -> dict:
    from tunesmith import models
    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer
    from tunesmith.data.validate import is_classification
    from tunesmith.errors import ConfigError, DataError
    from tunesmith.atomic import atomic_write_text

    cfg = run.config
    if not cfg.data.test:
        raise ConfigError(f"{run.path}: no test data (data.test) to evaluate on")
    train = read_examples(cfg.data.train, cfg.data.format)
    labels = is_classification(train)
    if not labels:
        raise DataError(f"{cfg.data.train}: answers are not a small set of labels; this comparison is for classification")
    test = read_examples(cfg.data.test, cfg.data.format)[:limit]
    references = [ex.answer() for ex in test]

    rows = {}
    tuned_model, tokenizer, tuned_renderer = run.load_model()
    base_model, base_tok = models.load(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    base_renderer = Renderer(base_tok, cfg.model.chat_template, cfg.data.system_prompt)
    for name, model, tok, renderer in (
        ("base (prompted)", base_model, base_tok, base_renderer),
        ("fine-tuned", tuned_model, tokenizer, tuned_renderer),
    ):
        rows[name] = _measure(model, tok, renderer, test, labels, references, batch_size)
        print(f"  {name}: accuracy {rows[name]['accuracy_scored']:.1%} (label scoring), "
              f"{rows[name]['accuracy_generated']:.1%} (generation)")

    result = {"labels": labels, "n_test": len(test), "models": rows}
    out = Path(run.path) / "eval" / "classification.json"
    atomic_write_text(out, json.dumps(result, indent=2))
    result["table"] = _table(rows, len(test))
    return result


def _measure(model, tokenizer, renderer, test, labels, references, batch_size) -> dict:
    from tunesmith.evaluation.classify import parse_label, score_labels
    from tunesmith.evaluation.generate import generate_batch

    t0 = time.perf_counter()
    scored = score_labels(model, tokenizer, renderer, test, labels, batch_size=batch_size)
    t_scored = time.perf_counter() - t0
    t0 = time.perf_counter()
    longest = max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels)
    generated = generate_batch(
        model, tokenizer, renderer, [ex.prompt_messages() for ex in test],
        max_new_tokens=longest + 8, batch_size=batch_size,
    )
    t_gen = time.perf_counter() - t0
    parsed = [parse_label(g, labels) for g in generated]
    n = len(test)
    return {
        "accuracy_scored": sum(s.prediction == r for s, r in zip(scored, references)) / n,
        "accuracy_generated": sum(p == r for p, r in zip(parsed, references)) / n,
        "invalid_generations": sum(p is None for p in parsed) / n,
        "seconds_scored": round(t_scored, 2),
        "seconds_generated": round(t_gen, 2),
        "predictions_scored": [s.prediction for s in scored],
        "generations": generated,
    }


def _table(rows: dict, n: int) -> str:
    lines = [
        f"held-out test examples: {n}",
        f"{'model':<18} {'accuracy (label scoring)':>26} {'accuracy (generation)':>22} {'invalid answers':>16}",
    ]
    for name, r in rows.items():
        lines.append(
            f"{name:<18} {r['accuracy_scored']:>26.1%} {r['accuracy_generated']:>22.1%} {r['invalid_generations']:>16.1%}"
        )
    return "\n".join(lines)
