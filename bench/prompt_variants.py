"""What each prompting variant of the base model scores and costs, on a recipe's validation split.

`tunesmith eval` tries these variants on the validation split and compares the fine-tuned model with the best one
(evaluation/prompting.py). This script runs the same selection without a fine-tuned run, and prints the table:
validation score, prompt tokens and seconds per example of every variant (zero-shot, format instruction, random
shots covering every label, retrieved nearest-neighbour shots; for label scoring each with and without contextual
calibration and length normalisation). With --test it also measures the chosen variant and the plain zero-shot on
the test split.

    .venv/bin/python bench/prompt_variants.py recipes/ticket-triage-lora.yaml --limit 100 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--limit", type=int, default=None, help="validation examples (default: eval's own limit)")
    parser.add_argument("--test", type=int, default=0, help="also measure the chosen variant on N test examples")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()

    import torch

    from tunesmith import models
    from tunesmith.config import load_config
    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer
    from tunesmith.evaluation import prompting, task_eval
    from tunesmith.evaluation.aggregate import system_metrics
    from tunesmith.evaluation.measure import measure
    from tunesmith.evaluation.tasks import max_new_tokens_for, plan_task
    from tunesmith.progress import Progress

    torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, [])
    train = read_examples(cfg.data.train, cfg.data.format)
    test = read_examples(cfg.data.test, cfg.data.format)
    plan = plan_task(train, test, cfg.eval.metric, cfg.eval.by)
    plan.format = cfg.eval.format
    model, tokenizer = models.load(cfg.model.name, dtype="float32", device="cpu")
    model.eval()
    base = (model, tokenizer, Renderer(tokenizer, cfg.model.chat_template, cfg.data.system_prompt))
    pool, validation, split = task_eval._pool_and_validation(cfg, train, print)
    labels = plan.labels or []
    few_k = max(3, len(labels)) if cfg.eval.shots == "auto" else cfg.eval.shots
    knn_k = prompting.AUTO_KNN_SHOTS if cfg.eval.knn_shots == "auto" else cfg.eval.knn_shots
    instruction = prompting.instruction_for(plan, pool)
    sample = prompting.validation_sample(validation, args.limit or prompting.SELECT_LIMIT[plan.task], cfg.train.seed)
    tried = prompting.variants(plan, few_k, knn_k, instruction)
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
        else "?"
    )
    print(
        f"{args.recipe}: {plan.task}, primary {plan.primary}; {len(sample)} validation examples ({split}); "
        f"{len(tried)} variants; {args.threads} threads on {cpu}; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    t0 = time.perf_counter()
    selection = prompting.select_prompt(
        sample,
        split,
        pool,
        plan,
        tried,
        base,
        seed=cfg.train.seed,
        instruction=instruction,
        batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens or max_new_tokens_for(plan, tokenizer, sample),
        max_length=None,
        progress=Progress(None),
    )
    print(f"selection took {time.perf_counter() - t0:.0f} s\n")
    print(f"| variant | {plan.primary} (validation) | prompt tokens / example | seconds / example |")
    print("|---|---|---|---|")
    for row in selection.rows:
        mark = " **(chosen)**" if row["key"] == selection.chosen.key else ""
        print(
            f"| {row['name']}{mark} | {row['value']:.4f} | {row['prompt_tokens_per_example']:.0f} | "
            f"{row['seconds_per_example']:.3f} |"
        )
    out = {"recipe": args.recipe, "cpu": cpu, "threads": args.threads, "selection": selection.to_json()}
    if args.test:
        test = test[: args.test]
        for variant, key in ((prompting.PromptVariant(), "zero_shot"), (selection.chosen, "chosen")):
            system = prompting.build_system(variant, key, *base, pool, plan, cfg.train.seed, instruction)
            res = measure(
                system,
                test,
                plan,
                batch_size=cfg.eval.batch_size,
                max_new_tokens=cfg.eval.max_new_tokens or max_new_tokens_for(plan, tokenizer, test),
                max_length=None,
                progress=Progress(None),
                calibrate=variant.calibrated,
            )
            metrics, _, _ = system_metrics(plan, test, prompting.decided(res, variant, plan))
            out[f"test_{key}"] = {"variant": variant.name, "metrics": metrics}
            print(f"test ({len(test)}): {variant.name}: {plan.primary} {metrics.get(plan.primary):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
