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
from pathlib import Path

from tunesmith.atomic import atomic_write_text
from tunesmith.data.example import Example
from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluation import memo
from tunesmith.evaluation.aggregate import FLIP_THRESHOLD, flipped, system_metrics
from tunesmith.evaluation.measure import SystemResult, measure
from tunesmith.evaluation.prompting import (
    Compared,
    MeasureSettings,
    PromptOptions,
    Selection,
    ShotSource,
    base_systems,
    decided,
)
from tunesmith.evaluation.shots import input_text
from tunesmith.evaluation.systems import System
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
    limit: int | None = None,
    batch_size: int | str | None = None,
    max_new_tokens: int | None = None,
    answer_format: str | None = None,
    forgetting: bool = True,
    probe_limit: int | None = None,
    dtype: str | None = None,
    progress: Progress | None = None,
    log=print,
    **prompt_flags,
) -> dict:
    """Evaluate a finished run (see tunesmith.api.evaluate for the arguments; `prompt_flags` are PromptOptions'
    fields); returns task.json's content, with the forgetting result under "forgetting" when asked. Both models are
    loaded in `dtype` (default: the run's model.dtype; auto: bf16 where the device computes it natively)."""
    from tunesmith import methods, models
    from tunesmith.data.templates import Renderer
    from tunesmith.evaluation.generate import load_run_model

    run = run if isinstance(run, RunDir) else RunDir.open(run)
    cfg = run.config
    run.require_model("evaluate")
    options = PromptOptions.resolve(cfg, **prompt_flags)
    pairs = _pair_inputs(cfg, run, data, limit, log)  # preference pairs: evaluation/preference_eval.py
    if pairs is None:
        test, data_path, train, plan = _task_inputs(cfg, run.path, data, limit, metric, by, answer_format, log)
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    dtype = dtype or cfg.model.dtype
    tuned_model, tuned_tok, tuned_renderer = load_run_model(run, dtype=dtype)
    # the base model is its own copy (below), so the tuned one never needs its adapter disabled: fold it in
    tuned_model = methods.merged_for_inference(tuned_model)
    base_model, base_tok = models.load(cfg.model.name, dtype=dtype, device=cfg.model.device)
    base_model.eval()
    log(f"models in {str(base_model.dtype).removeprefix('torch.')} on {base_model.device}")
    base = (base_model, base_tok, Renderer(base_tok, cfg.model.chat_template, cfg.data.system_prompt))
    settings = MeasureSettings.of(cfg, batch_size, max_new_tokens)
    tuned = System("fine_tuned", "fine-tuned", tuned_model, tuned_tok, tuned_renderer)
    if pairs is not None:
        from tunesmith.evaluation.preference_eval import evaluate_pairs

        test, data_path, train = pairs
        with progress or Progress(None) as bars:
            result = evaluate_pairs(
                run,
                cfg,
                test,
                data_path,
                train,
                base,
                (tuned_model, tuned_tok, tuned_renderer),
                max_new_tokens=settings.max_new_tokens,
                shots=None if options.shots == "auto" else options.shots,
                progress=bars,
                log=log,
                dtype=str(base_model.dtype),
            )
    else:
        with progress or Progress(None) as bars:
            prompted = base_systems(cfg, plan, base, ShotSource.of(cfg, train), options, settings, bars, log)
            compared = [*prompted.compared, Compared("fine_tuned", "fine-tuned", tuned)]
            result = run_task_eval(
                run.path,
                test,
                data_path,
                plan,
                compared,
                settings,
                bars,
                prompted.selection,
                log,
                str(base_model.dtype),
            )
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


def _pair_inputs(cfg, run: RunDir, data, limit, log):
    """(test pairs, their file, training pairs) when the test data holds preference pairs, else None."""
    from tunesmith.data.formats import read_examples
    from tunesmith.evaluation.preference_eval import check_pairs, is_preference_data

    data_path = str(data) if data is not None else cfg.data.test
    if not data_path or not Path(data_path).is_file():
        return None  # _task_inputs says what is missing
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: give a positive number of examples")
    test = read_examples(data_path, cfg.data.format if data is None else "auto")[:limit]
    if not is_preference_data(test):
        if run.objective != "sft" and test:
            raise DataError(
                f"{data_path}: the run was trained with train.objective {run.objective} on preference pairs, and this "
                f"test data holds {test[0].kind} examples; evaluate it on held-out pairs (prompt/chosen/rejected)"
            )
        return None
    check_pairs(test, data_path)
    train = []
    if cfg.data.train and Path(cfg.data.train).is_file():
        train = read_examples(cfg.data.train, cfg.data.format)
    else:
        log(f"note: the training data {cfg.data.train} is not there, so no few-shot baseline")
    log(f"eval: preference on {len(test)} pairs of {data_path} (primary metric: preference_accuracy)")
    return test, data_path, train


def _task_inputs(cfg, run_path: Path, data, limit, metric, by, answer_format, log):
    """(test examples, their file, training examples, TaskPlan), with a clear error for each bad input."""
    from tunesmith.data.formats import read_examples

    data_path = str(data) if data is not None else cfg.data.test
    if not data_path:
        raise ConfigError(
            f"{run_path}: no test data to evaluate on; pass --data test.jsonl (or set data.test in the recipe)"
        )
    if not Path(data_path).is_file():
        raise DataError(f"{data_path}: test data file not found; pass --data with an existing file")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: give a positive number of examples")
    if answer_format is not None:
        from tunesmith.config import compile_format

        try:
            compile_format(answer_format)
        except ValueError as e:
            raise ConfigError(f"--format {answer_format!r}: {e}") from None
    test = read_examples(data_path, cfg.data.format if data is None else "auto")[:limit]
    if not test:
        raise DataError(f"{data_path}: no examples to evaluate")
    train = []
    if cfg.data.train and Path(cfg.data.train).is_file():
        train = read_examples(cfg.data.train, cfg.data.format)
    else:
        log(f"note: the training data {cfg.data.train} is not there, so no few-shot baseline and no prompt selection")
    plan = plan_task(train, test, metric or cfg.eval.metric, by or cfg.eval.by)
    plan.format = answer_format if answer_format is not None else cfg.eval.format
    if plan.primary == "format_rate" and plan.format is None:
        raise ConfigError("--metric format_rate needs the format: pass --format REGEX or set eval.format in the recipe")
    log(f"eval: {plan.task} on {len(test)} examples of {data_path} (primary metric: {plan.primary})")
    return test, data_path, train, plan


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


def measure_compared(
    test: list[Example],
    plan: TaskPlan,
    compared: list[Compared],
    settings: MeasureSettings,
    max_new_tokens: int,
    progress: Progress,
    log=print,
) -> tuple[list[dict], dict[str, tuple[SystemResult, list[float]]]]:
    """Each compared system's task.json entry, and per key its result and per-example primary scores. Systems shared
    by several entries (a best prompt that is the zero-shot prompt with another decision rule) are measured once."""
    measured: dict[int, SystemResult] = {}
    entries, per_example = [], {}
    for c in compared:
        if id(c.system) not in measured:
            calibrate = any(o.variant is not None and o.variant.calibrated for o in compared if o.system is c.system)
            measured[id(c.system)] = measure(
                c.system,
                test,
                plan,
                batch_size=settings.batch_size,
                max_new_tokens=max_new_tokens,
                max_length=settings.max_length,
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
        if res.reused:
            entry["reused"] = res.reused
        if c.variant is not None:
            entry["prompt"] = c.variant.describe()
        if c.labels_missing:
            entry["labels_missing"] = c.labels_missing
        entries.append(entry)
        per_example[c.key] = (res, scores)
        log(
            f"  {c.name}: {plan.primary} {_fmt(plan.primary, metrics.get(plan.primary))}  "
            f"({res.prompt_tokens:.0f} prompt tokens, {seconds / len(test):.3f} s per example"
            + (f"; {memo.reused_note([res.reused])})" if res.reused else ")")
        )
    return entries, per_example


def evaluate_prompts(
    cfg,
    *,
    limit: int | None = None,
    metric: str | None = None,
    by: str | None = None,
    progress: Progress | None = None,
    log=print,
    **prompt_flags,
) -> dict:
    """The prompted base systems alone on a config's test split, no fine-tuned run needed: what prompting scores on
    a task before anything is trained (bench/prompt_variants.py, `make results` for runs that are gone). Returns
    {"task", "primary", "data", "systems", "prompt_selection"} in task.json's shapes."""
    from tunesmith import models
    from tunesmith.data.templates import Renderer

    options = PromptOptions.resolve(cfg, **prompt_flags)
    test, data_path, train, plan = _task_inputs(cfg, Path("."), None, limit, metric, by, None, log)
    model, tokenizer = models.load(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    model.eval()
    base = (model, tokenizer, Renderer(tokenizer, cfg.model.chat_template, cfg.data.system_prompt))
    settings = MeasureSettings.of(cfg)
    with progress or Progress(None) as bars:
        prompted = base_systems(cfg, plan, base, ShotSource.of(cfg, train), options, settings, bars, log)
        max_new = settings.max_new_tokens or max_new_tokens_for(plan, tokenizer, test)
        entries, _ = measure_compared(test, plan, prompted.compared, settings, max_new, bars, log)
    return {
        "task": plan.task,
        "primary": plan.primary,
        "data": {"path": data_path, "examples": len(test)},
        "systems": entries,
        **({"prompt_selection": prompted.selection.to_json()} if prompted.selection else {}),
    }


def run_task_eval(
    run_dir: Path,
    test: list[Example],
    data_path: str,
    plan: TaskPlan,
    compared: list[Compared],
    settings: MeasureSettings,
    progress: Progress,
    selection: Selection | None = None,
    log=print,
    dtype: str | None = None,
) -> dict:
    """Measure every system, write eval/task.json and eval/task_examples.jsonl, return task.json's content."""
    ids = example_ids(data_path, test)
    max_new = settings.max_new_tokens or max_new_tokens_for(plan, compared[-1].system.tokenizer, test)
    entries, per_example = measure_compared(test, plan, compared, settings, max_new, progress, log)
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
        **({"dtype": dtype.removeprefix("torch.")} if dtype else {}),
        "by": list(plan.by),
        **({"prompt_selection": selection.to_json()} if selection is not None else {}),
    }
    atomic_write_text(
        Path(run_dir) / "eval" / "task_examples.jsonl",
        "".join(json.dumps(_finite(r), ensure_ascii=False) + "\n" for r in records),
    )
    atomic_write_text(Path(run_dir) / "eval" / "task.json", json.dumps(_finite(result), indent=2, ensure_ascii=False))
    return result


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
