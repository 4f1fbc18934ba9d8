"""`tunesmith eval`: task metrics of the fine-tuned model against the base model prompted zero- and few-shot.

The question it answers is "fine-tune or just prompt?", so every system is measured the same way on the same
test examples, with its cost (prompt tokens and seconds per example). The files it writes are the contract in
docs/eval-format.md (eval/task.json, eval/task_examples.jsonl).

This module runs one evaluation: `evaluate_run` reads the run and the test data, assembles the compared systems
(evaluation/systems.py), measures each (evaluation/measure.py), turns what they produced into metrics
(evaluation/aggregate.py) and writes the files. What the task is and which metrics it has: evaluation/tasks.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.atomic import atomic_write_text
from tunesmith.data.example import Example
from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluation.aggregate import FLIP_THRESHOLD, flipped, system_metrics
from tunesmith.evaluation.measure import SystemResult, measure
from tunesmith.evaluation.prompting import (
    AUTO_KNN_SHOTS,
    SELECT_LIMIT,
    PromptVariant,
    Selection,
    build_system,
    decided,
    instruction_for,
    labels_missing_from,
    select_prompt,
    validation_sample,
    variants,
)
from tunesmith.evaluation.shots import pick_shots
from tunesmith.evaluation.systems import System, input_text
from tunesmith.evaluation.tasks import METRICS, TaskPlan, max_new_tokens_for, plan_task
from tunesmith.progress import Progress
from tunesmith.run_dir import RunDir

VERSION = 1
SYSTEM_ORDER = ("base_zero_shot", "base_few_shot", "base_best_prompt", "fine_tuned")


def evaluate_run(
    run: RunDir | str | Path,
    *,
    data: str | Path | None = None,
    metric: str | None = None,
    by: str | None = None,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    answer_format: str | None = None,
    forgetting: bool = True,
    probe_limit: int | None = None,
    knn_shots: int | str | None = None,
    select: bool | None = None,
    select_limit: int | None = None,
    allow_missing_labels: bool = False,
    progress: Progress | None = None,
    log=print,
) -> dict:
    """Evaluate a finished run (see tunesmith.api.evaluate for the arguments); returns task.json's content, with
    the forgetting result under "forgetting" when asked."""
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    cfg = run.config
    run.require_model("evaluate")
    data_path = str(data) if data is not None else cfg.data.test
    if not data_path:
        raise ConfigError(
            f"{run.path}: no test data to evaluate on; pass --data test.jsonl (or set data.test in the recipe)"
        )
    if not Path(data_path).is_file():
        raise DataError(f"{data_path}: test data file not found; pass --data with an existing file")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: give a positive number of examples")
    shots = cfg.eval.shots if shots is None else shots
    if shots != "auto" and shots < 0:
        raise ConfigError(f"--shots {shots}: give 0 (no few-shot baseline) or a positive number")
    knn_shots = cfg.eval.knn_shots if knn_shots is None else knn_shots
    if knn_shots != "auto" and knn_shots < 0:
        raise ConfigError(f"--knn-shots {knn_shots}: give 0 (no retrieved-shots variant) or a positive number")
    select = cfg.eval.select if select is None else select
    select_limit = cfg.eval.select_limit if select_limit is None else select_limit
    if select_limit is not None and select_limit < 1:
        raise ConfigError(f"--select-limit {select_limit}: give a positive number of validation examples")
    allow_missing_labels = allow_missing_labels or cfg.eval.allow_missing_labels
    if answer_format is not None:
        from tunesmith.config import compile_format

        try:
            compile_format(answer_format)
        except ValueError as e:
            raise ConfigError(f"--format {answer_format!r}: {e}") from None

    from tunesmith import models
    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer
    from tunesmith.evaluation.generate import load_run_model

    test = read_examples(data_path, cfg.data.format if data is None else "auto")[:limit]
    if not test:
        raise DataError(f"{data_path}: no examples to evaluate")
    train_examples = []
    if cfg.data.train and Path(cfg.data.train).is_file():
        train_examples = read_examples(cfg.data.train, cfg.data.format)
    elif shots:
        log(f"note: the training data {cfg.data.train} is not there, so no few-shot baseline")
    plan = plan_task(train_examples, test, metric or cfg.eval.metric, by or cfg.eval.by)
    plan.format = answer_format if answer_format is not None else cfg.eval.format
    if plan.primary == "format_rate" and plan.format is None:
        raise ConfigError("--metric format_rate needs the format: pass --format REGEX or set eval.format in the recipe")
    log(f"eval: {plan.task} on {len(test)} examples of {data_path} (primary metric: {plan.primary})")

    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    tuned_model, tuned_tok, tuned_renderer = load_run_model(run)
    base_model, base_tok = models.load(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    base_model.eval()
    base = (base_model, base_tok, Renderer(base_tok, cfg.model.chat_template, cfg.data.system_prompt))
    pool, validation, split = _pool_and_validation(cfg, train_examples, log)
    max_length = cfg.data.max_length if isinstance(cfg.data.max_length, int) else None
    batch_size = batch_size or cfg.eval.batch_size
    max_new_tokens = max_new_tokens or cfg.eval.max_new_tokens
    progress = progress or Progress(None)
    with progress:
        compared = _compared_systems(
            cfg,
            plan,
            pool,
            validation,
            split,
            base,
            shots,
            knn_shots,
            select,
            select_limit,
            allow_missing_labels,
            batch_size,
            max_new_tokens,
            max_length,
            progress,
            log,
        )
        compared.append(
            Compared(
                "fine_tuned", "fine-tuned", System("fine_tuned", "fine-tuned", tuned_model, tuned_tok, tuned_renderer)
            )
        )
        result = run_task_eval(
            run.path,
            test,
            data_path,
            plan,
            compared,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            progress=progress,
            log=log,
        )
    if compared.selection is not None:
        result["prompt_selection"] = compared.selection.to_json()
        _write_task_json(run.path, result)
    log(f"wrote {run.eval_dir / 'task.json'} and {run.eval_dir / 'task_examples.jsonl'}")
    if forgetting:
        from tunesmith.evaluation.forgetting import forgetting_eval

        result["forgetting"] = forgetting_eval(
            run,
            base=(base_model, base_tok),
            tuned=(tuned_model, tuned_tok),
            limit=probe_limit if probe_limit is not None else limit,
            log=log,
        )
    return result


def example_ids(path: str, examples: list[Example]) -> list[str]:
    """Each example's `id` field where its JSONL row has one, else `line-N` (its line in the file) or `row-N`."""
    ids = []
    lines = None
    if str(path).endswith(".jsonl"):
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    for n, ex in enumerate(examples, 1):
        line = ex.source.rsplit(":", 1)[-1] if ":" in ex.source else ""
        row_id = None
        if lines is not None and line.isdigit() and int(line) <= len(lines):
            try:
                row = json.loads(lines[int(line) - 1])
                row_id = row.get("id") if isinstance(row, dict) else None
            except json.JSONDecodeError:
                pass
        ids.append(str(row_id) if row_id is not None else f"line-{line}" if line.isdigit() else f"row-{n}")
    return ids


@dataclass
class Compared:
    """One system of task.json: its key and name, the System measured, and (base systems) the prompt variant
    whose decision rule applies. Entries that share a System share its measurement."""

    key: str
    name: str
    system: System
    variant: PromptVariant | None = None
    labels_missing: list[str] = field(default_factory=list)


class ComparedList(list):
    selection: Selection | None = None


def _pool_and_validation(cfg, train: list[Example], log) -> tuple[list[Example], list[Example], str]:
    """(shot pool, validation examples, where they came from). The validation split is the run's data.validation,
    else the part of the training file training held out (data.val_fraction, same seed), else 10% of it held out
    here; shots are then drawn from the rest, so no validation example is ever its own shot."""
    from tunesmith.data.formats import read_examples
    from tunesmith.data.split import split_train_val

    if cfg.data.validation and Path(cfg.data.validation).is_file():
        return train, read_examples(cfg.data.validation, cfg.data.format), cfg.data.validation
    if len(train) < 20:
        return train, [], ""
    fraction = cfg.data.val_fraction if cfg.data.val_fraction > 0 else 0.1
    rest, held = split_train_val(train, fraction, cfg.train.seed)
    return rest, held, f"{fraction:.0%} of {cfg.data.train} held out (seed {cfg.train.seed})"


def _compared_systems(
    cfg,
    plan: TaskPlan,
    pool,
    validation,
    split,
    base,
    shots,
    knn_shots,
    select,
    select_limit,
    allow_missing_labels,
    batch_size,
    max_new_tokens,
    max_length,
    progress,
    log,
) -> ComparedList:
    """base zero-shot, base few-shot (every label covered) and the best prompt chosen on validation."""
    compared = ComparedList()
    if plan.task == "lm":  # raw text: the base model is measured as it is; there is nothing to prompt
        compared.append(Compared("base_zero_shot", "base", System("base_zero_shot", "base", *base)))
        return compared
    labels = plan.labels or []
    few_k = (max(3, len(labels)) if shots == "auto" else shots) if pool else 0
    knn_k = (AUTO_KNN_SHOTS if knn_shots == "auto" else knn_shots) if pool else 0
    if shots != "auto" and labels and 0 < few_k < len(labels) and not allow_missing_labels:
        pick_shots(pool, few_k, labels, cfg.train.seed)  # raises the ConfigError that says what to do
    instruction = instruction_for(plan, pool)
    seed = cfg.train.seed

    def system_for(variant: PromptVariant, key: str) -> System:
        return build_system(variant, key, *base, pool, plan, seed, instruction, allow_missing_labels)

    zero, few = PromptVariant(), PromptVariant("random", few_k)
    by_prompt = {zero.prompt: system_for(zero, "base_zero_shot")}
    compared.append(Compared("base_zero_shot", "base, zero-shot", by_prompt[zero.prompt]))
    if few_k:
        by_prompt[few.prompt] = system_for(few, "base_few_shot")
        missing = labels_missing_from(by_prompt[few.prompt], plan)
        if missing:
            log(f"note: the {few_k}-shot prompt shows no example of {', '.join(missing)} (fewer shots than labels)")
        compared.append(Compared("base_few_shot", f"base, {few_k}-shot", by_prompt[few.prompt], labels_missing=missing))
    if not select:
        return compared
    if not validation:
        log(
            "note: no validation examples to choose a prompt on (data.validation, or 20+ training examples): "
            "the fine-tuned model is compared with zero- and few-shot prompting only"
        )
        return compared
    limit = select_limit or SELECT_LIMIT[plan.task]
    sample = validation_sample(validation, limit, seed)
    tried = variants(plan, few_k, knn_k, instruction)
    log(f"eval: trying {len(tried)} prompt variants on {len(sample)} validation examples")
    compared.selection = select_prompt(
        sample,
        split,
        pool,
        plan,
        tried,
        base,
        seed=seed,
        instruction=instruction,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens or max_new_tokens_for(plan, base[1], sample),
        max_length=max_length,
        progress=progress,
        log=log,
        allow_missing_labels=allow_missing_labels,
    )
    chosen = compared.selection.chosen
    if chosen.prompt not in by_prompt:
        by_prompt[chosen.prompt] = system_for(chosen, "base_best_prompt")
    compared.append(Compared("base_best_prompt", "base, best prompt", by_prompt[chosen.prompt], chosen))
    return compared


def run_task_eval(
    run_dir: Path,
    test: list[Example],
    data_path: str,
    plan: TaskPlan,
    compared: list[Compared],
    *,
    batch_size: int,
    max_new_tokens: int | None,
    max_length: int | None,
    progress: Progress,
    log=print,
) -> dict:
    """Measure every system, write eval/task.json and eval/task_examples.jsonl, return task.json's content."""
    ids = example_ids(data_path, test)
    max_new = max_new_tokens or max_new_tokens_for(plan, compared[-1].system.tokenizer, test)
    measured: dict[int, SystemResult] = {}
    entries, per_example = [], {}
    for c in compared:
        if id(c.system) not in measured:
            calibrate = any(o.variant is not None and o.variant.calibrated for o in compared if o.system is c.system)
            measured[id(c.system)] = measure(
                c.system,
                test,
                plan,
                batch_size=batch_size,
                max_new_tokens=max_new,
                max_length=max_length,
                progress=progress,
                calibrate=calibrate,
            )
        res = measured[id(c.system)]
        if c.variant is not None:
            res = decided(res, c.variant, plan)
        metrics, scores, extra = system_metrics(plan, test, res)
        calibrated = c.variant is not None and c.variant.calibrated
        by_mode = {k: v for k, v in res.seconds.items() if k != "calibration" or calibrated}
        seconds = sum(by_mode.values())
        entry = {
            "key": c.key,
            "name": c.name,
            "shots": c.system.n_shots,
            "metrics": metrics,
            **extra,
            "prompt_tokens_per_example": res.prompt_tokens,
            "seconds_per_example": seconds / len(test),
            "seconds": seconds,
            "seconds_by_mode": by_mode,
        }
        if c.key != "fine_tuned":
            entry["prompt"] = (c.variant or _variant_of(c.system)).describe()
        if c.labels_missing:
            entry["labels_missing"] = c.labels_missing
        entries.append(entry)
        per_example[c.key] = (res, scores)
        log(
            f"  {c.name}: {plan.primary} {_fmt(plan.primary, metrics.get(plan.primary))}  "
            f"({res.prompt_tokens:.0f} prompt tokens, {seconds / len(test):.3f} s per example)"
        )

    records = []
    for i, ex in enumerate(test):
        rec = {
            "id": ids[i],
            "input": input_text(ex),
            "reference": (ex.answer() or "") if ex.kind != "text" else "",
            "outputs": {k: r.outputs[i] for k, (r, _) in per_example.items()},
            "scores": {k: s[i] for k, (_, s) in per_example.items()},
        }
        generated = {
            k: r.generated[i]
            for k, (r, _) in per_example.items()
            if r.generated is not None and r.predictions is not None
        }
        if generated:
            rec["generated"] = generated
        records.append(rec)
    data_file = Path(data_path)
    result = {
        "version": VERSION,
        "task": plan.task,
        "data": {
            "path": str(data_path),
            "sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(),
            "examples": len(test),
        },
        **({"labels": plan.labels} if plan.task == "classification" else {}),
        "primary": plan.primary,
        "metrics_info": {
            name: {"higher_is_better": METRICS[name][1], "description": METRICS[name][2]}
            for name in dict.fromkeys(k for e in entries for k in e["metrics"])
        },
        "systems": sorted(entries, key=lambda e: SYSTEM_ORDER.index(e["key"])),
        "examples_file": "task_examples.jsonl",
        "flipped": flipped(test, records, plan.primary),
        "flip_rule": (
            f"per-example {plan.primary} >= {FLIP_THRESHOLD} counts as a pass; listed: passes gained or "
            "lost from base zero-shot to fine-tuned"
        )
        if METRICS[plan.primary][1]
        else f"{plan.primary} has no pass mark; no examples listed",
        "max_new_tokens": max_new,
        "by": list(plan.by),
    }
    atomic_write_text(
        Path(run_dir) / "eval" / "task_examples.jsonl",
        "".join(json.dumps(_finite(r), ensure_ascii=False) + "\n" for r in records),
    )
    _write_task_json(run_dir, result)
    return result


def _write_task_json(run_dir: Path, result: dict) -> None:
    atomic_write_text(
        Path(run_dir) / "eval" / "task.json",
        json.dumps(_finite({k: v for k, v in result.items() if k != "forgetting"}), indent=2, ensure_ascii=False),
    )


def _variant_of(system: System) -> PromptVariant:
    if system.retriever is not None:
        return PromptVariant("knn", system.retriever.k, system.instruction is not None)
    return PromptVariant("random" if system.shots else "none", len(system.shots), system.instruction is not None)


def _finite(obj):
    """JSON has no inf/nan: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt(name: str, value) -> str:
    if value is None:
        return "-"
    if name in ("loss", "perplexity"):
        return f"{value:.3f}"
    return f"{value:.1%}"
