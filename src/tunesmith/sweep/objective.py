"""What a sweep optimises, and how a finished trial is measured for it.

- `val_loss` (the default): the validation loss of the trained model (the last validation of the run, which is
  the model that run writes), and any other figure of the run's validation records (val_token_acc; for preference
  pairs val_reward_accuracy, val_reward_margin). Costs nothing beyond training.
- `task` or a metric name: the held-out task's metric as `tunesmith eval` measures the fine-tuned model, on the
  validation split (`sweep.eval_limit` examples), never on the test split: the test split is used once, for the
  winner.
- `forgetting` (only with a task objective, `task,forgetting`): the general-ability probe as `tunesmith eval`
  measures it, on `sweep.probe_limit` of its questions, as one number: the verdict's severity,
  max(perplexity rise / 0.30, question-score drop / 0.15). The verdict's thresholds map onto it exactly: 1.0 and
  above is "high", 0.33 and above "moderate" (the two signals' moderate thresholds, 10% and 0.05, are both a third
  of their high ones), below that "low".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import Config
from tunesmith.errors import ConfigError

VAL_RECORD = {  # figures of the training loop's validation records -> higher is better
    "val_loss": False,
    "val_token_acc": True,
    "val_reward_accuracy": True,
    "val_reward_margin": True,
}
FORGETTING = "forgetting"


@dataclass(frozen=True)
class Objective:
    """names: what each value is ("val_loss", "accuracy", "forgetting"); maximize: per value."""

    names: tuple[str, ...]
    maximize: tuple[bool, ...]
    task: bool  # a finished trial is evaluated on the validation split
    forgetting: bool

    @property
    def directions(self) -> list[str]:
        return ["maximize" if m else "minimize" for m in self.maximize]

    @property
    def multi(self) -> bool:
        return len(self.names) > 1

    def describe(self) -> str:
        return ", ".join(f"{n} ({'higher' if m else 'lower'} is better)" for n, m in zip(self.names, self.maximize))


def parse_objective(text: str, cfg: Config, preference: bool) -> Objective:
    """`val_loss`, `task`, a metric name, or `task,forgetting` / `METRIC,forgetting` -> an Objective. For `task`
    the metric is the one `tunesmith eval` would choose from the validation data."""
    from tunesmith.evaluation.tasks import METRICS

    parts = [p.strip() for p in text.split(",") if p.strip()]
    where = cfg.where("sweep", "objective")
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[1] != FORGETTING) or parts[0] == FORGETTING:
        raise ConfigError(
            f"{where}sweep.objective {text!r}: give val_loss, task, a metric name, or task,forgetting "
            "(a task metric and forgetting, searched together)"
        )
    first, forgetting = parts[0], len(parts) == 2
    if first in VAL_RECORD:
        if forgetting:
            raise ConfigError(
                f"{where}sweep.objective {text!r}: forgetting is searched against the task metric; write task,forgetting"
            )
        if preference != first.startswith("val_reward") and first != "val_loss":
            kind = "preference pairs" if preference else "SFT data"
            raise ConfigError(f"{where}sweep.objective {first}: not measured on {kind}; use val_loss")
        return Objective((first,), (VAL_RECORD[first],), task=False, forgetting=False)
    if preference:
        raise ConfigError(
            f"{where}sweep.objective {text!r}: preference runs are swept on val_loss or val_reward_accuracy "
            "(the held-out pairs ranked right by the trained model's reward)"
        )
    if first == "task":
        first = task_metric(cfg)
    elif first not in METRICS:
        raise ConfigError(
            f"{where}sweep.objective {first!r} is not known; use val_loss, task, or one of: {', '.join(METRICS)}"
        )
    names, maximize = (first,), (bool(METRICS[first][1]),)
    if forgetting:
        names, maximize = names + (FORGETTING,), maximize + (False,)
    return Objective(names, maximize, task=True, forgetting=forgetting)


def task_metric(cfg: Config, metric: str | None = None) -> str:
    """The headline metric `tunesmith eval` picks for this recipe's data (or `metric`'s, when given)."""
    from tunesmith.evaluation.tasks import plan_task

    train, validation = validation_examples(cfg)
    return plan_task(train, validation, metric or cfg.eval.metric, cfg.eval.by).primary


def validation_examples(cfg: Config) -> tuple[list, list]:
    """(training examples, validation examples) as training splits them: data.validation, or the same seeded share
    of data.train that training holds out (data.val_fraction)."""
    from tunesmith.data.formats import read_examples
    from tunesmith.data.split import split_train_val

    if not cfg.data.train:
        raise ConfigError("no training data: set data.train in the recipe or pass --data FILE")
    train = read_examples(cfg.data.train, cfg.data.format)
    if cfg.data.validation:
        return train, read_examples(cfg.data.validation, cfg.data.format)
    if cfg.data.val_fraction > 0 and len(train) >= 10:
        return split_train_val(train, cfg.data.val_fraction, cfg.train.seed)
    raise ConfigError(
        "a sweep compares trials on validation data: set data.validation, or data.val_fraction above 0 with at "
        "least 10 training examples"
    )


def measure_task(run_dir: Path, metric: str, limit: int | None, split: str = "validation") -> dict:
    """The fine-tuned model of a finished trial on the validation (or test) split, as `tunesmith eval` measures
    it, without the prompted base models: returns {"metric", "value", "metrics", "examples", "seconds"}."""
    import time

    from tunesmith.evaluation.aggregate import system_metrics
    from tunesmith.evaluation.generate import load_run_model
    from tunesmith.evaluation.measure import measure
    from tunesmith.evaluation.prompting import MeasureSettings
    from tunesmith.evaluation.systems import System
    from tunesmith.evaluation.tasks import max_new_tokens_for, plan_task
    from tunesmith.progress import Progress
    from tunesmith.run_dir import RunDir

    t0 = time.perf_counter()
    run = RunDir.open(run_dir)
    cfg = run.config
    train, examples = validation_examples(cfg)
    if split == "test":
        from tunesmith.data.formats import read_examples

        examples = read_examples(cfg.data.test, cfg.data.format)
    examples = examples[:limit] if limit else examples
    plan = plan_task(train, examples, metric, cfg.eval.by)
    plan.format = cfg.eval.format
    model, tokenizer, renderer = load_run_model(run)
    system = System("fine_tuned", "fine-tuned", model, tokenizer, renderer)
    settings = MeasureSettings.of(cfg)
    max_new = settings.max_new_tokens or max_new_tokens_for(plan, tokenizer, examples)
    result = measure(
        system,
        examples,
        plan,
        batch_size=settings.batch_size,
        max_new_tokens=max_new,
        max_length=settings.max_length,
        progress=Progress(None),
    )
    metrics, _, _ = system_metrics(plan, examples, result)
    value = metrics.get(metric)
    if value is None:
        raise ConfigError(f"sweep.objective {metric}: the validation data gives no {metric} (got {sorted(metrics)})")
    return {
        "metric": metric,
        "value": float(value),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "examples": len(examples),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def measure_forgetting(run_dir: Path, probe_limit: int, cache: dict, log=print) -> dict:
    """The probe on a bounded slice, as `tunesmith eval` measures it (writes the trial's eval/forgetting.json):
    returns {"value": severity, "verdict", "perplexity_change", "score_change", "kl"}."""
    from tunesmith.evaluation.forgetting import THRESHOLDS, forgetting_eval

    result = forgetting_eval(run_dir, limit=probe_limit, log=lambda *_: None, base_cache=cache)
    ppl = result["perplexity"]["change"]
    drop = -result["questions"]["change"]
    severity = max(ppl / THRESHOLDS["perplexity_change"]["high"], drop / THRESHOLDS["score_drop"]["high"])
    return {
        "value": round(severity, 4),
        "verdict": result["verdict"],
        "perplexity_change": ppl,
        "score_change": result["questions"]["change"],
        "kl": result["kl"]["mean_per_token"],
        "seconds": result["seconds"],
    }
