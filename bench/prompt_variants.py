"""What each prompting variant of the base model scores and costs, on a recipe's validation split.

`tunesmith eval` tries these variants on the validation split and compares the fine-tuned model with the best one
(evaluation/prompting.py). This script runs the same selection without a fine-tuned run, and prints the table:
validation score, prompt tokens and seconds per example of every variant (zero-shot, format instruction, random
shots covering every label, retrieved nearest-neighbour shots; for label scoring each with and without contextual
calibration and length normalisation); then the zero-shot, few-shot and chosen prompts on the test split
(tunesmith.evaluation.task_eval.evaluate_prompts: the same code `tunesmith eval` runs, minus the fine-tuned model).

    .venv/bin/python bench/prompt_variants.py recipes/ticket-triage-lora.yaml --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# a benchmark times measuring: never reuse a stored measurement (tunesmith/evaluation/memo.py)
os.environ["TUNESMITH_EVAL_CACHE"] = "0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--select-limit", type=int, default=None, help="validation examples (default: eval's own)")
    parser.add_argument("--test", type=int, default=None, help="test examples (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args()

    import torch

    from tunesmith.config import load_config
    from tunesmith.evaluation.task_eval import evaluate_prompts

    torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, [])
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    print(f"{args.recipe}: {args.threads} threads on {cpu}; load average {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    result = evaluate_prompts(cfg, limit=args.test, select_limit=args.select_limit)
    print(f"took {time.perf_counter() - t0:.0f} s\n")
    sel, primary = result.get("prompt_selection"), result["primary"]
    if sel:
        print(f"validation: {sel['examples']} examples ({sel['split']})\n")
        print(f"| variant | {primary} (validation) | prompt tokens / example | seconds / example |")
        print("|---|---|---|---|")
        for row in sel["variants"]:
            mark = " **(chosen)**" if row["key"] == sel["chosen"] else ""
            value = "-" if row["value"] is None else f"{row['value']:.4f}"
            print(
                f"| {row['name']}{mark} | {value} | {row['prompt_tokens_per_example']:.0f} | "
                f"{row['seconds_per_example']:.3f} |"
            )
    print(f"\ntest: {result['data']['examples']} examples of {result['data']['path']}")
    for s in result["systems"]:
        print(
            f"  {s['name']} ({s['prompt']['name']}): {primary} {s['metrics'].get(primary)}, "
            f"{s['prompt_tokens_per_example']:.0f} prompt tokens, {s['seconds_per_example']:.3f} s/example"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"recipe": args.recipe, "cpu": cpu, "threads": args.threads, **result}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
