"""One fine-tuning job as an ordinary tunesmith run, in its own process: `python -m tunesmith.jobs.runner JOB_DIR`.

The worker starts it (so a crash of training cannot take the server down) and reads what it says:
- stdout: one JSON object per line, `{"level": "info"|"warn", "message": ...}`, which become the job's events;
- JOB_DIR/run/: the run directory (metrics.jsonl, checkpoints/, model/, eval/, report.html);
- JOB_DIR/outcome.json on success, JOB_DIR/error.json on failure (written atomically).

JOB_DIR/spec.json (written by the worker) holds the config overrides, the learning-rate multiplier and the
validation file. A JOB_DIR/run that already has a config.yaml is resumed from its last checkpoint (the server was
killed mid-job); one whose model/ is there already only repeats the evaluation steps that are missing.

Exit codes: 0 succeeded, 130 interrupted (SIGINT/SIGTERM: stopped at a step boundary with a checkpoint),
2 a user error (the message is in error.json), 1 a bug.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tunesmith.atomic import atomic_write_text
from tunesmith.errors import Interrupted, TunesmithError


def emit(message: str, level: str = "info") -> None:
    for line in str(message).splitlines() or [""]:
        if line.strip():
            lvl = "warn" if line.lower().startswith(("warning", "note:")) else level
            print(json.dumps({"level": lvl, "message": line.rstrip()}), flush=True)


def overrides(spec: dict) -> dict:
    """The run's config overrides: the job's, with `train.lr` = the auto learning rate x the job's multiplier."""
    from tunesmith.config import load_config
    from tunesmith.training.auto import LR_BY_METHOD, LR_SCALE_BY_OBJECTIVE

    values = dict(spec["overrides"])
    multiplier = spec.get("lr_multiplier")
    if multiplier is not None:
        cfg = load_config(None, list(values.items()))
        if cfg.train.lr == "auto":
            auto = LR_BY_METHOD[cfg.method] * LR_SCALE_BY_OBJECTIVE[cfg.train.objective]
            values["train.lr"] = auto * float(multiplier)
            emit(f"learning rate {values['train.lr']:g} (auto {auto:g} x learning_rate_multiplier {multiplier:g})")
        else:
            values["train.lr"] = float(cfg.train.lr) * float(multiplier)
    return values


def run(job_dir: Path) -> dict:
    import tunesmith

    spec = json.loads((job_dir / "spec.json").read_text(encoding="utf-8"))
    run_dir = job_dir / "run"
    if (run_dir / "model").is_dir():
        emit("training finished before the server stopped; going on with the evaluation")
    elif (run_dir / "config.yaml").is_file():
        tunesmith.train(resume=run_dir, log=emit)
    else:
        tunesmith.train(None, log=emit, **overrides(spec), output=str(run_dir))
    outcome = {"run_dir": str(run_dir)}
    if spec.get("validation"):
        task = run_dir / "eval" / "task.json"
        if not task.is_file():
            emit("evaluating the fine-tuned model against the prompted base model on the validation file")
            tunesmith.evaluate(run_dir, data=spec["validation"], forgetting=False, quiet=True, log=emit)
        outcome["eval"] = str(task)
        outcome["verdict"] = verdict(json.loads(task.read_text(encoding="utf-8")))
        emit(outcome["verdict"])
    if not (run_dir / "report.html").is_file():
        tunesmith.report(run_dir)
    return outcome


def verdict(task: dict) -> str:
    """One line: the fine-tuned model vs the best prompted base system on the task's primary metric."""
    metric = task["primary"]
    higher = task.get("metrics_info", {}).get(metric, {}).get("higher_is_better", True) is not False
    systems = {s["key"]: s for s in task["systems"] if isinstance(s["metrics"].get(metric), (int, float))}
    tuned = systems.pop("fine_tuned", None)
    if tuned is None or not systems:
        return f"eval: not enough systems measured {metric} to compare the fine-tuned model with prompting"
    best = systems.get("base_best_prompt") or (max if higher else min)(
        systems.values(), key=lambda s: s["metrics"][metric]
    )
    a, b = tuned["metrics"][metric], best["metrics"][metric]
    better = a > b if higher else a < b
    word = "beats" if better else ("ties with" if a == b else "loses to")
    return f"eval verdict: the fine-tuned model {word} the prompted base model ({best.get('name', best['key'])}): {metric} {a:.4g} vs {b:.4g}"


def main(argv: list[str]) -> int:
    job_dir = Path(argv[0])
    try:
        outcome = run(job_dir)
    except Interrupted as e:
        emit(str(e).splitlines()[0])
        return 130
    except KeyboardInterrupt:
        return 130
    except TunesmithError as e:
        atomic_write_text(job_dir / "error.json", json.dumps({"message": str(e), "kind": type(e).__name__}))
        return 2
    except Exception as e:  # a bug of ours: the job fails with the message, the traceback goes to stderr.log
        import traceback

        traceback.print_exc()
        atomic_write_text(job_dir / "error.json", json.dumps({"message": f"internal error: {type(e).__name__}: {e}"}))
        return 1
    atomic_write_text(job_dir / "outcome.json", json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
