"""`tunesmith sweep`: Optuna searches a recipe's hyperparameters under a time budget.

How a sweep runs (DIR is its output folder):

1. Trial 0 is the recipe as written, the baseline every later trial is compared with; the default search space is
   centred on what it resolved (sweep/space.py). Every trial is an ordinary run directory, DIR/trial-NNN/.
2. Later trials are sampled by TPE (seeded by the sweep seed and the trial number, so a resumed sweep samples what
   an uninterrupted one would). Each validates at the same fractions of an epoch (`sweep.evals_per_epoch`) and
   reports its validation loss there; the pruner (median or Hyperband) stops a trial that is doing worse than the
   earlier trials did at the same point. A trial that diverges (non-finite loss) is recorded as failed.
3. The objective is measured when a trial finishes (sweep/objective.py): its validation loss, or the task metric
   on the validation split, or that and forgetting (a Pareto front).
4. The budget: a trial is not started when the time it is estimated to take (the seconds per training example of
   the trials so far, times the examples it would train on, plus the mean measuring time) exceeds what is left; a
   trial running when the budget ends stops at a step boundary and counts as pruned.
5. At the end the winner (or each trial of the Pareto front) is written as a recipe, with its fully resolved
   config, and evaluated once on the test split against the baseline trial and the prompted base model.

Optuna's study lives in DIR/study.db (SQLite). A sweep killed at any point (Ctrl-C, SIGKILL) resumes with the same
command: finished trials are kept, and the trial that was running continues from its last checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith.atomic import atomic_write_text
from tunesmith.config import Config, apply_overrides, load_config, parse_duration, validate_config
from tunesmith.errors import ConfigError, Interrupted, RunError, Stopped, TrainingError
from tunesmith.progress import duration
from tunesmith.sweep import objective as objectives
from tunesmith.sweep.space import Param, build_space, overrides, sampled, user_params
from tunesmith.training.checkpoint import kill_point
from tunesmith.training.loop import TrainHooks

STUDY = "study.db"
SUMMARY = "sweep.json"
BEST = "best.yaml"
LOG = "sweep.log"
BASELINE = 0  # trial 0: the recipe as written
BUDGET_REASON = "the sweep's time budget ran out"


@dataclass
class SweepSettings:
    """The sweep section with the command line's flags applied."""

    trials: int
    budget: float | None  # seconds
    objective: objectives.Objective
    pruner: str
    seed: int
    output: Path


@dataclass
class TrialOutcome:
    number: int
    state: str  # complete, pruned, failed, not started
    values: list[float] | None = None
    note: str = ""
    attrs: dict = field(default_factory=dict)


def run_sweep(
    recipe: str | Path | None,
    *,
    overrides_: list[tuple[str, Any]] | None = None,
    trials: int | None = None,
    budget: str | None = None,
    objective: str | None = None,
    pruner: str | None = None,
    output: str | Path | None = None,
    progress_factory: Callable[[], Any] | None = None,
    log=print,
) -> Path:
    """Run (or resume) a sweep; returns its folder. See the module docstring; the CLI is `tunesmith sweep`."""
    import optuna

    cfg = load_config(recipe, overrides_ or [])
    settings = _settings(cfg, trials, budget, objective, pruner, output)
    user_params(cfg)  # every problem of sweep.space now, before any training
    objectives.validation_examples(cfg)  # every objective is measured on validation data: refuse now if there is none
    out = settings.output
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        study = _study(cfg, settings)
        sweep = _Sweep(cfg, settings, study, progress_factory, log)
        sweep.run()
        sweep.finish()
    finally:
        lock.close()
    return out


def _settings(cfg: Config, trials, budget, objective, pruner, output) -> SweepSettings:
    s = cfg.sweep
    budget_text = budget if budget is not None else s.budget
    try:
        seconds = parse_duration(budget_text) if budget_text is not None else None
    except ValueError as e:
        raise ConfigError(f"--budget: {e}") from None
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials {trials}: give a positive number of trials")
    if pruner is not None and pruner not in ("median", "hyperband", "none"):
        raise ConfigError(f"--pruner {pruner!r}: use median, hyperband or none")
    preference = cfg.train.objective != "sft"
    obj = objectives.parse_objective(objective or s.objective, cfg, preference)
    out = Path(output) if output else Path("sweeps") / (cfg.name or "sweep")
    return SweepSettings(
        trials=trials or s.trials,
        budget=seconds,
        objective=obj,
        pruner=pruner or s.pruner,
        seed=s.seed if s.seed is not None else cfg.train.seed,
        output=out,
    )


def _lock(out: Path):
    fh = open(out / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise RunError(
            f"{out}: another `tunesmith sweep` is running in this folder; wait for it or use --output"
        ) from None
    return fh


def _fingerprint(cfg: Config, settings: SweepSettings) -> dict:
    """What must not change when a sweep resumes: the recipe (data, model, method...), objective, pruner, seed."""
    raw = cfg.model_dump(mode="json", by_alias=True)
    sweep = raw.pop("sweep")
    for key in ("trials", "budget", "objective", "pruner", "seed"):
        sweep.pop(key, None)
    raw.pop("output", None)
    return {
        "recipe": raw,
        "sweep": sweep,
        "objective": list(settings.objective.names),
        "pruner": settings.pruner,
        "seed": settings.seed,
    }


def _study(cfg: Config, settings: SweepSettings):
    import optuna

    storage = f"sqlite:///{(settings.output / STUDY).resolve()}"
    directions = settings.objective.directions
    study = optuna.create_study(study_name="sweep", storage=storage, directions=directions, load_if_exists=True)
    fingerprint = _fingerprint(cfg, settings)
    saved = study.user_attrs.get("fingerprint")
    if saved is None:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("elapsed", 0.0)
    elif saved != fingerprint:
        changed = sorted(k for k in fingerprint if fingerprint[k] != saved.get(k))
        raise ConfigError(
            f"{settings.output}: holds a sweep of another {' and '.join(changed)}; resume it with the same recipe and "
            "flags (only --trials and --budget may change), or give another --output"
        )
    return study


class _Sweep:
    def __init__(self, cfg: Config, settings: SweepSettings, study, progress_factory, log):
        self.cfg, self.s, self.study = cfg, settings, study
        self.obj = settings.objective
        self.progress_factory = progress_factory
        self.echo = log
        self.out = settings.output
        self.log_file = open(self.out / LOG, "a", encoding="utf-8")
        self.forgetting_cache: dict = {}
        self.started = time.monotonic()
        self.spent_before = float(study.user_attrs.get("elapsed", 0.0))
        self.space: list[Param] | None = None
        if "space" in study.user_attrs:
            self.space = [Param.from_json(p) for p in study.user_attrs["space"]]
        self.n_train = None

    # -- time ------------------------------------------------------------------------------------------------

    def spent(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    def left(self) -> float | None:
        return None if self.s.budget is None else self.s.budget - self.spent()

    def save_elapsed(self) -> None:
        self.study.set_user_attr("elapsed", round(self.spent(), 1))

    # -- the loop --------------------------------------------------------------------------------------------

    def finished(self) -> list:
        from optuna.trial import TrialState

        done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return [t for t in self.study.get_trials(deepcopy=False) if t.state in done and not t.user_attrs.get("skipped")]

    def run(self) -> None:
        from optuna.trial import Trial, TrialState

        self.say(
            f"sweep {self.out}: {self.s.trials} trials, objective {self.obj.describe()}, pruner "
            f"{self.s.pruner if not self.obj.multi else 'none (multi-objective)'}"
            + (f", budget {duration(self.s.budget)} ({duration(max(self.left(), 0))} left)" if self.s.budget else "")
        )
        stale = [t for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        for frozen in stale:  # a killed sweep's running trial: continue it, same number, same folder
            self.say(f"trial {frozen.number}: resuming (the sweep stopped while it ran)")
            self.run_trial(Trial(self.study, frozen._trial_id))
        while len(self.finished()) < self.s.trials:
            if self.left() is not None and self.left() <= 0:
                self.say("the time budget is spent")
                break
            if self.space is None and self.study.trials:
                break  # the baseline did not finish: nothing to centre the space on
            self.study.sampler = self.sampler(len(self.study.trials))
            self.study.pruner = self.pruner()
            trial = self.study.ask()
            if trial.number > BASELINE and not self.fits(trial):
                break
            self.run_trial(trial)
        self.save_elapsed()

    def sampler(self, number: int):
        import optuna

        return optuna.samplers.TPESampler(
            seed=self.s.seed * 100_003 + number,
            n_startup_trials=max(1, self.cfg.sweep.startup_trials),
            multivariate=True,
        )

    def pruner(self):
        import optuna

        if self.obj.multi or self.s.pruner == "none":
            return optuna.pruners.NopPruner()
        startup = max(1, self.cfg.sweep.startup_trials)
        if self.s.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)
        epochs = next((p.high for p in self.space or [] if p.key == "train.epochs"), None) or 3
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=int(epochs * self.cfg.sweep.evals_per_epoch), reduction_factor=3
        )

    # -- one trial -------------------------------------------------------------------------------------------

    def trial_dir(self, number: int) -> Path:
        return self.out / f"trial-{number:03d}"

    def trial_config(self, trial) -> tuple[Config, dict]:
        values = {} if trial.number == BASELINE else {p.key: p.suggest(trial) for p in self.space}
        raw = self.cfg.model_dump(mode="json", by_alias=True)
        raw.pop("sweep")
        raw = apply_overrides(raw, list(overrides(values, self.cfg).items()))
        raw["output"] = str(self.trial_dir(trial.number))
        raw["name"] = f"{self.cfg.name or 'sweep'}-trial-{trial.number:03d}"
        try:
            return validate_config(raw, source=f"trial {trial.number}"), values
        except ConfigError as e:  # a combination the config refuses (never for the default space)
            raise ConfigError(
                f"trial {trial.number}: the sampled values {values} make an invalid config", e.problems
            ) from None

    def fits(self, trial) -> bool:
        """Whether the trial is expected to end within the budget; if not it is recorded as not started."""
        left = self.left()
        if left is None:
            return True
        cfg, _ = self.trial_config(trial)
        estimate = self.estimate(cfg)
        if estimate is None or estimate <= left:
            return True
        trial.set_user_attr("skipped", f"estimated {duration(estimate)}, {duration(left)} of the budget left")
        from optuna.trial import TrialState

        self.study.tell(trial, state=TrialState.FAIL)
        self.say(
            f"trial {trial.number}: not started: it would take about {duration(estimate)} and "
            f"{duration(left)} of the budget is left"
        )
        return False

    def estimate(self, cfg: Config) -> float | None:
        done = [t for t in self.finished() if t.user_attrs.get("examples_seen")]
        if not done:
            return None
        rate = sum(t.user_attrs["train_seconds"] for t in done) / sum(t.user_attrs["examples_seen"] for t in done)
        measuring = sum(t.user_attrs.get("measure_seconds", 0.0) for t in done) / len(done)
        return rate * self.planned_examples(cfg) + measuring

    def planned_examples(self, cfg: Config) -> float:
        """Training examples the trial would go through (replay included): what its time scales with."""
        from tunesmith.training.mitigations import replay_count

        base = json.loads((self.trial_dir(BASELINE) / "data.json").read_text())
        n, plan = base["train"]["examples"], base["plan"]
        batch = cfg.train.batch_size if isinstance(cfg.train.batch_size, int) else plan["batch_size"]
        if cfg.train.max_steps:
            return cfg.train.max_steps * batch
        epochs = cfg.train.epochs if isinstance(cfg.train.epochs, int) else plan["epochs"]
        return epochs * (n + (replay_count(n, cfg.train.replay) if cfg.train.replay else 0))

    def run_trial(self, trial) -> TrialOutcome:
        from optuna.trial import TrialState

        from tunesmith import api

        number = trial.number
        cfg, values = self.trial_config(trial)
        run_dir = self.trial_dir(number)
        shown = ", ".join(f"{k} {sampled(p, values[k])}" for p in self.space or [] for k in [p.key] if k in values)
        self.say(
            f"trial {number} ({len(self.finished()) + 1} of {self.s.trials}): "
            + (shown or "the recipe with its flags, untouched (baseline)")
            + self.best_so_far()
            + (f" | {duration(max(self.left(), 0))} left" if self.left() is not None else "")
        )
        hooks = _TrialHooks(self, trial)
        progress = self.progress_factory() if self.progress_factory else None
        t0 = time.monotonic()
        outcome = TrialOutcome(number, "complete")
        try:
            kwargs = {"log": self.file_log(number), "progress": progress, "hooks": hooks}  # validation lines too
            if (run_dir / "model").is_dir():
                pass  # trained before the sweep stopped; only the measuring was lost
            elif (run_dir / "config.yaml").is_file():
                api.train(resume=run_dir, **kwargs)
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                api.train(cfg, **kwargs)
        except Stopped as e:
            outcome = TrialOutcome(number, "pruned", note=e.reason)
        except TrainingError as e:
            outcome = TrialOutcome(number, "failed", note=str(e))
        except Interrupted:
            self.save_elapsed()
            raise Interrupted(
                f"sweep interrupted in trial {number}; its checkpoint is saved.\n"
                f"Resume with the same command (it continues trial {number}): tunesmith sweep ... --output {self.out}"
            ) from None
        train_seconds = time.monotonic() - t0
        steps, batch = self.steps_done(run_dir)
        trial.set_user_attr("train_seconds", round(train_seconds + trial.user_attrs.get("train_seconds", 0.0), 1))
        trial.set_user_attr("examples_seen", steps * batch)
        trial.set_user_attr("steps", steps)
        trial.set_user_attr("run_dir", run_dir.name)
        if values:
            trial.set_user_attr("values", {k: v for k, v in values.items()})
        if outcome.state == "complete":
            try:
                outcome.values, outcome.attrs = self.measure(number, run_dir)
            except TrainingError as e:
                outcome = TrialOutcome(number, "failed", note=str(e))
        for k, v in outcome.attrs.items():
            trial.set_user_attr(k, v)
        if outcome.note:
            trial.set_user_attr("note", outcome.note)
        state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}
        if number == BASELINE and self.space is None and outcome.state == "complete":
            self.define_space(run_dir)
        self.study.tell(trial, outcome.values if outcome.state == "complete" else None, state=state[outcome.state])
        self.save_elapsed()
        self.write_summary()
        took = duration(time.monotonic() - t0)
        if outcome.state == "complete":
            got = ", ".join(f"{n} {v:.4g}" for n, v in zip(self.obj.names, outcome.values))
            self.say(f"trial {number}: {got} ({took})")
        else:
            self.say(f"trial {number}: {outcome.state}: {outcome.note} ({took})")
        return outcome

    def define_space(self, baseline_dir: Path) -> None:
        from tunesmith.run_dir import RunDir

        resolved = RunDir.open(baseline_dir).config
        data = json.loads((baseline_dir / "data.json").read_text())
        n_train = data["train"]["examples"]
        self.space = build_space(self.cfg, resolved, n_train, self.obj.forgetting)
        if not self.space:
            raise ConfigError(
                f"{self.cfg.where('sweep')}the search space is empty: sweep.default_space is false and sweep.space "
                "names no key"
            )
        self.study.set_user_attr("space", [p.to_json() for p in self.space])
        self.say("search space: " + "; ".join(p.describe() for p in self.space))

    def steps_done(self, run_dir: Path) -> tuple[int, int]:
        from tunesmith.run_dir import RunDir

        try:
            run = RunDir.open(run_dir)
            steps = max((r["step"] for r in run.metrics if r.get("kind") == "train"), default=0)
            return steps, run.config.train.batch_size if isinstance(run.config.train.batch_size, int) else 1
        except (RunError, ValueError, OSError):
            return 0, 0

    def measure(self, number: int, run_dir: Path) -> tuple[list[float], dict]:
        """The objective's values for a finished trial, and what to record with them."""
        from tunesmith.run_dir import RunDir

        t0 = time.monotonic()
        attrs: dict = {}
        evals = [r for r in RunDir.open(run_dir).metrics if r.get("kind") == "eval"]
        if evals:
            attrs["val_loss"] = evals[-1]["val_loss"]
        values = []
        for name in self.obj.names:
            if name in objectives.VAL_RECORD:
                if not evals or name not in evals[-1]:
                    raise TrainingError(f"trial {number} logged no {name}: it needs validation data")
                values.append(float(evals[-1][name]))
            elif name == objectives.FORGETTING:
                f = objectives.measure_forgetting(run_dir, self.cfg.sweep.probe_limit, self.forgetting_cache)
                attrs["forgetting"] = f
                values.append(f["value"])
            else:
                t = objectives.measure_task(run_dir, name, self.cfg.sweep.eval_limit)
                attrs["validation"] = t
                values.append(t["value"])
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise TrainingError(f"trial {number}: the objective is {bad[0]}")
        attrs["measure_seconds"] = round(time.monotonic() - t0, 1)
        return values, attrs

    def best_so_far(self) -> str:
        from optuna.trial import TrialState

        done = [t for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        if not done:
            return ""
        if self.obj.multi:
            return f" | Pareto front: {len(self.study.best_trials)} of {len(done)} trials"
        best = self.study.best_trial
        return f" | best so far {self.obj.names[0]} {best.values[0]:.4g} (trial {best.number})"

    # -- output ----------------------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        self.echo(text)
        self.file_log("sweep")(text)

    def file_log(self, who) -> Callable[[str], None]:
        prefix = f"[trial {who}] " if isinstance(who, int) else ""

        def write(text: str) -> None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            for line in str(text).splitlines() or [""]:
                self.log_file.write(f"{stamp} {prefix}{line}\n")
            self.log_file.flush()

        return write

    def write_summary(self) -> dict:
        summary = summarize(self.study, self.s, self.cfg, self.spent())
        old = _read_json(self.out / SUMMARY)
        if old.get("test") and old["test"].get("trials") == summary.get("test_trials"):
            summary["test"] = old["test"]
        atomic_write_text(self.out / SUMMARY, json.dumps(summary, indent=2))
        return summary

    def finish(self) -> None:
        """Write the winning recipe(s), evaluate them once on the test split, write the report."""
        from tunesmith.sweep.report import write_sweep_report

        summary = self.write_summary()
        chosen = summary.get("test_trials") or []
        if not chosen:
            self.say("no trial finished: nothing to write as the best recipe")
            return
        for number in chosen:
            self.write_recipe(number, summary)
        best = summary["best"] if not self.obj.multi else summary["front"]
        if isinstance(best, dict):
            self.say(f"best: trial {best['number']} -> {self.out / BEST}")
        else:
            self.say(
                f"Pareto front: trials {', '.join(map(str, best))}; the most accurate, trial {chosen[0]} -> "
                f"{self.out / BEST}" + (f", the others -> {self.out / 'pareto'}/" if len(best) > 1 else "")
            )
        test = summary.get("test")
        if not self.obj_has_test():
            self.say(f"preference pairs: evaluate the winner with `tunesmith eval {self.trial_dir(chosen[0])}`")
        elif not (self.cfg.data.test and Path(self.cfg.data.test).is_file()):
            self.say("no data.test: the winner was not evaluated on held-out data")
        elif test is None:
            test = self.evaluate_on_test(chosen, summary)
            summary["test"] = test
            atomic_write_text(self.out / SUMMARY, json.dumps(summary, indent=2))
        path = write_sweep_report(self.out)
        self.say(f"report: {path}")

    def obj_has_test(self) -> bool:
        return self.cfg.train.objective == "sft"

    def write_recipe(self, number: int, summary: dict) -> None:
        from tunesmith.run_dir import RunDir

        resolved = RunDir.open(self.trial_dir(number)).config
        raw = resolved.model_dump(mode="json", by_alias=True)
        raw.pop("sweep", None)
        raw.pop("output", None)
        raw["name"] = f"{self.cfg.name or 'sweep'}-best" if number == summary.get("test_trials", [None])[0] else None
        raw["name"] = raw["name"] or f"{self.cfg.name or 'sweep'}-trial-{number:03d}"
        target = self.out / BEST if raw["name"].endswith("-best") else self.out / "pareto" / f"trial-{number:03d}.yaml"
        for key in ("train", "validation", "test"):
            value = raw["data"].get(key)
            if value:
                raw["data"][key] = os.path.relpath(Path(value).resolve(), target.parent.resolve())
        entry = next(t for t in summary["trials"] if t["number"] == number)
        got = ", ".join(f"{n} {v:.4g}" for n, v in zip(self.obj.names, entry["values"]))
        import yaml

        head = (
            f"# tunesmith sweep {self.out}: trial {number} of {len(summary['trials'])} ({got} on the validation "
            "split).\n# Every value resolved (no auto left); data paths relative to this file.\n"
            f"# Train it: tunesmith train {target}\n"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, head + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))

    def evaluate_on_test(self, chosen: list[int], summary: dict) -> dict:
        """The chosen trial(s) and the baseline on the test split, once: the first chosen one as `tunesmith eval`
        does (against the prompted base model), the others (and the baseline) as fine-tuned models only."""
        from tunesmith import api

        probe = self.cfg.sweep.probe_limit
        self.say(f"test split: evaluating trial {chosen[0]} against the prompted base model (tunesmith eval)")
        full = api.evaluate(
            self.trial_dir(chosen[0]), forgetting=True, probe_limit=probe, log=self.file_log(chosen[0]), quiet=True
        )
        primary = full["primary"]
        systems = {s["key"]: s["metrics"].get(primary) for s in full["systems"]}
        rows = {
            str(chosen[0]): {
                "metric": primary,
                "value": systems.get("fine_tuned"),
                "forgetting": full["forgetting"]["verdict"],
                "forgetting_severity": _severity(full["forgetting"]),
            }
        }
        for number in dict.fromkeys([*chosen[1:], BASELINE]):
            if str(number) in rows or not (self.trial_dir(number) / "model").is_dir():
                continue
            self.say(f"test split: trial {number} (fine-tuned model only)")
            t = objectives.measure_task(self.trial_dir(number), primary, None, split="test")
            f = objectives.measure_forgetting(self.trial_dir(number), probe, self.forgetting_cache)
            rows[str(number)] = {
                "metric": primary,
                "value": t["value"],
                "forgetting": f["verdict"],
                "forgetting_severity": f["value"],
            }
        out = {
            "trials": chosen,
            "metric": primary,
            "examples": full["data"]["examples"],
            "base": {k: v for k, v in systems.items() if k != "fine_tuned"},
            "runs": rows,
        }
        for number, row in rows.items():
            self.say(f"  trial {number}: test {primary} {row['value']:.4g}, forgetting {row['forgetting']}")
        for key, value in out["base"].items():
            if value is not None:
                self.say(f"  {key}: test {primary} {value:.4g}")
        return out


class _TrialHooks(TrainHooks):
    """Validate at the sweep's grid, report to Optuna, prune, stop at the end of the budget."""

    def __init__(self, sweep: _Sweep, trial):
        self.sweep, self.trial = sweep, trial
        self.per_epoch = sweep.cfg.sweep.evals_per_epoch

    def eval_steps(self, plan) -> set[int]:
        spe = plan.steps_per_epoch
        steps = {max(1, round(k * spe / self.per_epoch)) for k in range(1, self.per_epoch * plan.epochs + 1)}
        return {s for s in steps if s <= plan.total_steps}

    def grid_point(self, step: int, plan) -> int:
        return max(1, math.ceil(step * self.per_epoch / plan.steps_per_epoch - 1e-9))

    def on_eval(self, step: int, plan, result: dict) -> str | None:
        sweep = self.sweep
        sweep.save_elapsed()
        if sweep.obj.multi:
            return None
        name = sweep.obj.names[0]
        value = result.get(name, result["val_loss"]) if name in objectives.VAL_RECORD else result["val_loss"]
        if name not in objectives.VAL_RECORD and sweep.obj.maximize[0]:
            value = -value  # the study maximizes its metric: report the validation loss so that higher is better
        point = self.grid_point(step, plan)
        frozen = next(t for t in sweep.study.get_trials(deepcopy=False) if t.number == self.trial.number)
        if point not in frozen.intermediate_values:  # a resumed trial does not report a point twice
            self.trial.report(value, point)
        if sweep.s.pruner != "none" and self.trial.should_prune():
            epoch = step / plan.steps_per_epoch
            return f"validation loss {result['val_loss']:.4f} at epoch {epoch:.2f} is worse than " + (
                "the median of earlier trials there" if sweep.s.pruner == "median" else "its Hyperband bracket allows"
            )
        return None

    def stop_reason(self, step: int, plan) -> str | None:
        kill_point(f"sweep-trial-{self.trial.number}-step-{step}")  # tests: a sweep killed inside a trial
        left = self.sweep.left()
        return BUDGET_REASON if left is not None and left <= 0 else None


def summarize(study, settings: SweepSettings, cfg: Config, elapsed: float) -> dict:
    """sweep.json: every trial with its values, state and params; the best trial or the Pareto front."""
    from optuna.trial import TrialState

    obj = settings.objective
    trials = []
    for t in study.get_trials(deepcopy=False):
        state = {
            TrialState.COMPLETE: "complete",
            TrialState.PRUNED: "pruned",
            TrialState.FAIL: "not started" if t.user_attrs.get("skipped") else "failed",
            TrialState.RUNNING: "running",
            TrialState.WAITING: "waiting",
        }[t.state]
        trials.append(
            {
                "number": t.number,
                "state": state,
                "values": list(t.values) if t.values else None,
                "params": t.user_attrs.get("values", {}),
                "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "started": t.datetime_start.isoformat() if t.datetime_start else None,
                "finished": t.datetime_complete.isoformat() if t.datetime_complete else None,
                **{k: v for k, v in t.user_attrs.items() if k != "values"},
            }
        )
    complete = [t for t in trials if t["state"] == "complete"]
    summary = {
        "version": 1,
        "objective": {"names": list(obj.names), "directions": obj.directions},
        "pruner": "none (multi-objective)" if obj.multi else settings.pruner,
        "seed": settings.seed,
        "budget_seconds": settings.budget,
        "elapsed_seconds": round(elapsed, 1),
        "trials_asked": settings.trials,
        "evals_per_epoch": cfg.sweep.evals_per_epoch,
        "space": study.user_attrs.get("space", []),
        "recipe": {"name": cfg.name, "method": cfg.method, "model": cfg.model.name, "test": cfg.data.test},
        "trials": trials,
    }
    if complete:
        if obj.multi:
            front = sorted((t.number for t in study.best_trials), key=lambda n: n)
            first = max(
                (t for t in complete if t["number"] in front),
                key=lambda t: t["values"][0] if obj.maximize[0] else -t["values"][0],
            )
            summary["front"] = front
            summary["test_trials"] = [first["number"]] + [n for n in front if n != first["number"]]
        else:
            best = study.best_trial
            summary["best"] = {"number": best.number, "value": best.values[0]}
            summary["test_trials"] = [best.number]
    return summary


def _severity(forgetting: dict) -> float:
    from tunesmith.evaluation.forgetting import THRESHOLDS

    ppl = forgetting["perplexity"]["change"] / THRESHOLDS["perplexity_change"]["high"]
    drop = -forgetting["questions"]["change"] / THRESHOLDS["score_drop"]["high"]
    return round(max(ppl, drop), 4)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
