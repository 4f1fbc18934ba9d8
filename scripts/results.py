"""Regenerate docs/results.md: every shipped recipe trained on the real model, then `tunesmith eval` on its test split.

    python scripts/results.py                      # all recipes (make results)
    python scripts/results.py --recipes ticket-triage-lora,review-sentiment-lora --limit 100

For each recipe: train it as shipped (runs/results/<recipe>), evaluate base zero-shot, base few-shot and the
fine-tuned model on the recipe's test split, measure forgetting, and write one table row per recipe. A run that
already finished with the same recipe is reused (and an evaluation done with the same settings), so an interrupted
`make results` continues where it stopped; --retrain starts over. Every number in the table is read from the run's
files (metrics.jsonl, eval/task.json, eval/forgetting.json); nothing is typed in by hand.

What the table needs from a finished run is kept in docs/results/<recipe>.json (the run's evaluation files, its
train time and speed, the date and commit it was measured at), so the table covers every recipe measured so far
even where the run directory is gone (runs/ is not in git) and `--recipes` only chooses what to train now: the
other rows come from their records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

from tunesmith.errors import Interrupted, TunesmithError

# a record of measurements (eval_seconds included): every evaluation measures (tunesmith/evaluation/memo.py)
os.environ["TUNESMITH_EVAL_CACHE"] = "0"

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="", help="comma-separated recipe names (file stems); default: all")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N test examples only")
    parser.add_argument(
        "--shots",
        type=int,
        default=None,
        help="examples in the few-shot prompt of the base model (default: the recipe's eval.shots)",
    )
    parser.add_argument(
        "--probe-limit",
        type=int,
        default=100,
        help="forgetting probe questions to ask (the whole probe, 305, takes ~15 min per run)",
    )
    parser.add_argument("--runs", default="runs/results", help="where the runs go")
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument(
        "--records",
        default="docs/results",
        help="where each measured recipe's record (the table's source) is kept, one JSON per recipe",
    )
    parser.add_argument("--retrain", action="store_true", help="train again even when a finished run exists")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    parser.add_argument(
        "--prompt-only",
        action="store_true",
        help="measure only the prompted base systems (zero-shot, few-shot, the best prompt chosen on validation) on "
        "the test examples of each recipe's record, and keep them in the record beside its fine-tuned result: for "
        "records whose run directory is gone (no per-example interval then)",
    )
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a paragraph printed under the table's header (how and when the runs were made)",
    )
    args = parser.parse_args(argv)

    recipes = sorted((ROOT / "recipes").rglob("*.yaml"))
    if args.recipes:
        wanted = {r.strip() for r in args.recipes.split(",") if r.strip()}
        unknown = wanted - {r.stem for r in recipes}
        if unknown:
            print(
                f"error: unknown recipe(s): {', '.join(sorted(unknown))}; known: {', '.join(r.stem for r in recipes)}",
                file=sys.stderr,
            )
            return 2
        order = [r.strip() for r in args.recipes.split(",") if r.strip()]
        recipes = sorted((r for r in recipes if r.stem in wanted), key=lambda r: order.index(r.stem))

    records = ROOT / args.records
    for i, recipe in enumerate(recipes, 1):
        run_dir = ROOT / args.runs / recipe.stem
        print(f"\n=== [{i}/{len(recipes)}] {recipe.stem}", flush=True)
        if args.prompt_only:
            record = load_record(recipe.stem, records)
            if record is None:
                print(f"  no record of {recipe.stem} yet: train and evaluate it first (without --prompt-only)")
                continue
            record["prompt_only"] = measure_prompts(recipe, record)
            save_record(record, records)
            continue
        if not args.table_only:
            produce(recipe, run_dir, args)
        row = collect(recipe, run_dir)
        if row is not None:
            save_record(row, records)
    # the table: every shipped recipe, from its record (the runs above just refreshed theirs)
    rows = [
        load_record(recipe.stem, records) or {"recipe": recipe.stem, "missing": True}
        for recipe in sorted((ROOT / "recipes").rglob("*.yaml"))
    ]
    write_table(rows, ROOT / args.out, args)
    print(f"\nwrote {args.out} ({len(rows)} recipe(s))")
    return 0


def _recipe_hash(recipe: Path) -> str:
    """Hash of what training reads: the recipe without its `eval:` section, so an evaluation setting (e.g. a new
    eval.format) re-evaluates a finished run instead of training it again."""
    import yaml

    recipe_dict = yaml.safe_load(recipe.read_text()) or {}
    recipe_dict.pop("eval", None)
    return hashlib.sha256(json.dumps(recipe_dict, sort_keys=True).encode()).hexdigest()[:16]


def _recipe_eval(recipe: Path) -> dict:
    import yaml

    return (yaml.safe_load(recipe.read_text()) or {}).get("eval") or {}


def produce(recipe: Path, run_dir: Path, args) -> None:
    """Train (unless a finished run of this exact recipe exists) and evaluate (unless done with these settings)."""
    import shutil

    import tunesmith
    from tunesmith.cli.display import RichProgress

    stamp = run_dir / "results-run.json"
    done = json.loads(stamp.read_text()) if stamp.is_file() else {}
    commit = _commit()  # the code this process runs (HEAD may move while it trains)
    sha = _recipe_hash(recipe)
    same = done.get("recipe_sha") == sha and not args.retrain
    if not (same and (run_dir / "model").is_dir()):
        t0 = time.time()
        resuming = same and (run_dir / "checkpoints").is_dir()
        earlier = done.get("train_seconds_interrupted", 0.0) if resuming else 0.0  # attempts stopped by Ctrl-C
        try:
            if resuming:
                print(f"resuming the interrupted run {run_dir}")
                tunesmith.train(resume=run_dir, progress=RichProgress())
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                run_dir.mkdir(parents=True)
                stamp.write_text(json.dumps({"recipe_sha": sha, "commit": commit}))
                tunesmith.train(recipe, output=str(run_dir), progress=RichProgress())
        except (TunesmithError, KeyboardInterrupt):
            so_far = {
                "recipe_sha": sha,
                "commit": commit,
                "train_seconds_interrupted": round(earlier + time.time() - t0, 1),
            }
            stamp.write_text(json.dumps(so_far, indent=2))
            raise
        done = {"recipe_sha": sha, "commit": commit, "train_seconds": round(earlier + time.time() - t0, 1)}
        stamp.write_text(json.dumps(done, indent=2))
    # the run's config.yaml keeps the eval section it was trained with; the recipe's current one is what counts
    answer_format = _recipe_eval(recipe).get("format")
    settings = {"limit": args.limit, "shots": args.shots, "probe_limit": args.probe_limit}
    if answer_format is not None:
        settings["format"] = answer_format
    if done.get("eval_settings") != settings or not (run_dir / "eval" / "task.json").is_file():
        t0 = time.time()
        tunesmith.evaluate(
            tunesmith.load(run_dir),
            limit=args.limit,
            shots=args.shots,
            forgetting=True,
            probe_limit=args.probe_limit,
            answer_format=answer_format,
        )
        done |= {"eval_settings": settings, "eval_seconds": round(time.time() - t0, 1), "eval_commit": commit}
        stamp.write_text(json.dumps(done, indent=2))


def collect(recipe: Path, run_dir: Path) -> dict | None:
    task_file = run_dir / "eval" / "task.json"
    if not task_file.is_file():
        print(f"  (no evaluation in {run_dir}; skipped in the table)")
        return None
    task = json.loads(task_file.read_text())
    forgetting_file = run_dir / "eval" / "forgetting.json"
    forgetting = json.loads(forgetting_file.read_text()) if forgetting_file.is_file() else None
    stamp = json.loads((run_dir / "results-run.json").read_text()) if (run_dir / "results-run.json").is_file() else {}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = [r for r in records if r.get("kind") == "train"]
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = json.loads((run_dir / "data.json").read_text())
    return {
        "recipe": recipe.stem,
        "method": cfg.get("method"),
        "task": task,
        "forgetting": forgetting,
        "train_examples": data.get("train", {}).get("examples"),
        "steps": train_records[-1]["step"] if train_records else None,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_records) if train_records else None,
        "train_seconds": stamp.get("train_seconds"),
        "eval_settings": stamp.get("eval_settings"),
        "device": data.get("device"),
        "paired": paired_against_best_prompt(
            task, run_dir / "eval" / (task.get("examples_file") or "task_examples.jsonl")
        ),
        "measured": date.fromtimestamp(task_file.stat().st_mtime).isoformat(),
        "commit": stamp.get("eval_commit") or stamp.get("commit"),
    }


def paired_against_best_prompt(task: dict, examples_file: Path) -> dict | None:
    """Fine-tuned minus the best prompted system, per test example (the primary metric's per-example score), with
    its 95% paired-bootstrap interval: what tells a real gain from noise on a few dozen examples. None when the
    evaluation kept no per-example scores (e.g. perplexity)."""
    from tunesmith.evaluation.report_html import paired_difference, paired_scores
    from tunesmith.jsonl import read_objects

    best = best_prompt_key(task)
    if best is None or not examples_file.is_file():
        return None
    rows, _ = read_objects(examples_file)
    prompt_scores, tuned_scores = paired_scores([row for _, row in rows], best, "fine_tuned")
    if len(prompt_scores) < 2:
        return None
    mean, lo, hi = paired_difference(prompt_scores, tuned_scores)
    return {"against": best, "examples": len(prompt_scores), "mean": mean, "low": lo, "high": hi}


def measure_prompts(recipe: Path, record: dict) -> dict:
    """The prompted base systems of `recipe` on the same test examples as its record (evaluate_prompts: the code
    `tunesmith eval` runs, minus the fine-tuned model), with the date and commit."""
    import tunesmith
    from tunesmith.cli.display import RichProgress
    from tunesmith.evaluation.task_eval import evaluate_prompts

    settings = record.get("eval_settings") or {}
    t0 = time.time()
    cfg = tunesmith.load_config(recipe)
    result = evaluate_prompts(cfg, limit=settings.get("limit"), progress=RichProgress())
    if result["data"]["examples"] != record["task"]["data"]["examples"]:
        raise SystemExit(
            f"{recipe.stem}: measured {result['data']['examples']} test examples, the record has "
            f"{record['task']['data']['examples']}"
        )
    return {**result, "seconds": round(time.time() - t0, 1), "measured": date.today().isoformat(), "commit": _commit()}


def best_prompt_key(task: dict) -> str | None:
    """The prompted system fine-tuning is compared with: the prompt chosen on the validation split
    (base_best_prompt); for records made before prompt selection existed, the best base system on the test split
    (which flatters prompting, and is marked so in the table)."""
    primary = task["primary"]
    prompted = {
        s["key"]: s["metrics"].get(primary)
        for s in task["systems"]
        if s["key"] != "fine_tuned" and s["metrics"].get(primary) is not None
    }
    if "base_best_prompt" in prompted:
        return "base_best_prompt"
    if not prompted:
        return None
    higher = task.get("metrics_info", {}).get(primary, {}).get("higher_is_better", True)
    return (max if higher else min)(prompted, key=prompted.get)


def save_record(row: dict, records: Path) -> Path:
    """Write the row's record (atomically): the table can be rebuilt from it once the run directory is gone."""
    from tunesmith.atomic import atomic_write_text

    path = records / f"{row['recipe']}.json"
    atomic_write_text(path, json.dumps(row, indent=1, sort_keys=True) + "\n")
    return path


def load_record(name: str, records: Path) -> dict | None:
    path = records / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _fmt(metric: str, value) -> str:
    if value is None:
        return "—"
    if metric in {"perplexity", "loss"} or abs(value) > 1.0:
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{100 * value:.1f}%"


def _refusal_summary(systems: dict) -> str:
    """Preference rows with refusal metrics: how base zero-shot and the fine-tuned model answer (generated)."""
    base = systems.get("base_zero_shot", {}).get("metrics", {})
    tuned = systems.get("fine_tuned", {}).get("metrics", {})
    parts = [
        f"{label} {100 * base[k]:.1f}% → {100 * tuned[k]:.1f}%"
        for k, label in (
            ("refusal_rate_harmful", "refuses harmful"),
            ("over_refusal_rate_harmless", "refuses harmless"),
            ("refusal_accuracy", "refusal accuracy"),
        )
        if base.get(k) is not None and tuned.get(k) is not None
    ]
    return f"; generated answers, base zero-shot → fine-tuned: {', '.join(parts)}" if parts else ""


def write_table(rows: list[dict], out: Path, args) -> None:
    lines = [
        "# Results: fine-tuned vs prompted base model, per bundled task",
        "",
        f"Regenerated by `make results` (scripts/results.py) on {date.today().isoformat()}, "
        f"{platform.machine()} with {_cores()} CPU cores, fp32. Every number comes from a run directory "
        f"(`eval/task.json`, `eval/forgetting.json`, `metrics.jsonl`), kept per recipe in {args.records}/<recipe>.json "
        f"with the date and commit it was measured at; see docs/eval-format.md.",
        "",
        "Base zero-shot: the base model with the dataset's system prompt. Base few-shot: the same plus "
        "k random training examples as prior turns (every label covered; k listed per recipe below). Best prompt: "
        "the strongest of the prompting variants (zero-shot, a format instruction, random shots, retrieved "
        "nearest-neighbour shots, each with and without calibrated / length-normalised label scoring) chosen on "
        "the validation split, never on the test split (evaluation/prompting.py); its variant is named. "
        "Deltas are fine-tuned minus that best prompt. Where the evaluation kept per-example scores, the "
        "verdict carries the 95% paired-bootstrap interval of the per-example difference (fine-tuned minus that "
        "prompt, in points of the per-example score) and says **tie** when the interval holds zero. Rows measured "
        "before prompt selection existed compare with the better of zero-/few-shot on the test split and say so.",
        "",
        *[line for note in args.note for line in (note, "")],
        "| recipe | task (test n) | metric | base zero-shot | base few-shot | base best prompt (chosen on validation) "
        "| fine-tuned | fine-tuning vs best prompt | forgetting (ppl change, KL, questions Δ) | train time, tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    missing = [row["recipe"] for row in rows if row.get("missing")]
    rows = [row for row in rows if not row.get("missing")]
    for row in rows:
        task = row["task"]
        primary = task["primary"]
        info = task.get("metrics_info", {}).get(primary, {})
        higher = info.get("higher_is_better", True)
        systems = {s["key"]: s for s in task["systems"]}
        paired = row.get("paired")
        fresh = row.get("prompt_only") if "base_best_prompt" not in systems else None
        if fresh:  # base systems measured again, without the run: they replace the record's old ones
            systems = {**systems, **{s["key"]: s for s in fresh["systems"]}}
            task = {**task, "systems": list(systems.values())}
            paired = None
        value = {
            k: systems[k]["metrics"].get(primary) if k in systems else None
            for k in ("base_zero_shot", "base_few_shot", "base_best_prompt", "fine_tuned")
        }
        best_key = best_prompt_key(task)
        verdict = "—"
        if best_key is not None and value["fine_tuned"] is not None:
            best = systems[best_key]["metrics"][primary]
            gain = value["fine_tuned"] - best
            better = gain > 0 if higher else gain < 0
            size = (
                f"{100 * gain:+.1f} points"
                if abs(best) <= 1 and primary not in {"perplexity", "loss"}
                else f"{gain:+.3g} {primary}"
            )
            if paired and paired["low"] <= 0 <= paired["high"]:
                verdict = f"**tie** with prompting: {size}, not significant"
            elif paired and better != (paired["low"] > 0 if higher else paired["high"] < 0):
                verdict = f"**unclear**: {size} on the whole set, the other way per example"
            else:
                against = "the base model" if task["task"] == "lm" else "prompting"  # raw text: no prompt to try
                verdict = (f"**beats** {against} by " if better else f"does **not** beat {against}: ") + size
            if paired:
                verdict += (
                    f" (per-example 95% CI {100 * paired['low']:+.1f} to {100 * paired['high']:+.1f}, "
                    f"n={paired['examples']})"
                )
            if task["task"] == "preference":
                verdict += (
                    "; against the better of base zero-/few-shot on the test pairs (no prompt selection for pairs)"
                )
                verdict += _refusal_summary(systems)
            elif best_key != "base_best_prompt" and task["task"] != "lm":
                verdict += "; no validation-chosen prompt in this record (measured before prompt selection)"
            if fresh:
                verdict += (
                    f"; base prompts measured {fresh['measured']} without the fine-tuned run (whose per-example "
                    "scores were not kept): no per-example interval"
                )
        chosen = systems.get("base_best_prompt", {}).get("prompt", {}).get("name")
        best_cell = f"{_fmt(primary, value['base_best_prompt'])} ({chosen})" if chosen else "not measured"
        if task["task"] == "lm":
            best_cell = "— (raw text)"
        elif task["task"] == "preference":
            best_cell = "— (pairs: zero-/few-shot only)"
        f = row["forgetting"]
        forgot = (
            "not measured"
            if not f
            else (
                f"{f['verdict']}: {100 * f['perplexity']['change']:+.1f}%, {f['kl']['mean_per_token']:.3f}, "
                f"{100 * f['questions']['change']:+.1f} pts"
            )
        )
        minutes = f"{row['train_seconds'] / 60:.1f} min" if row.get("train_seconds") else "—"
        speed = f"{row['tokens_per_s']:.0f}" if row.get("tokens_per_s") else "—"
        lines.append(
            f"| {row['recipe']} ({row['method']}) | {task['task']} ({task['data']['examples']}) | {primary} | "
            f"{_fmt(primary, value['base_zero_shot'])} | {_fmt(primary, value['base_few_shot'])} | {best_cell} | "
            f"{_fmt(primary, value['fine_tuned'])} | {verdict} | {forgot} | {minutes}, {speed} |"
        )
    if missing:
        lines += [
            "",
            f"Not measured yet (no record in {args.records}/): {', '.join(missing)}. "
            f'`make results RESULTS_ARGS="--recipes {",".join(missing)}"` trains and evaluates them.',
        ]
    if str(Path(__file__).resolve().parent) not in sys.path:  # imported from elsewhere (tests): find its sibling
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sweep_results import section  # scripts/sweep_results.py: the recorded `tunesmith sweep` runs

    sweeps = section(ROOT / args.records / "sweeps")
    lines += ["", *sweeps] if sweeps else []
    lines += ["", "## All metrics", ""]
    for row in rows:
        task = row["task"]
        lines += [f"### {row['recipe']}", ""]
        fresh = row.get("prompt_only") if not any(s["key"] == "base_best_prompt" for s in task["systems"]) else None
        shown = list(task["systems"])
        if fresh:
            shown += [
                {**s, "name": f"{s['name']} (measured {fresh['measured']}, without the run)"} for s in fresh["systems"]
            ]
        names = sorted({m for s in shown for m in s["metrics"]})
        lines.append("| system | " + " | ".join(names) + " | prompt tokens/example | seconds/example |")
        lines.append("|---|" + "---|" * (len(names) + 2))
        for s in shown:
            cells = [_fmt(m, s["metrics"].get(m)) for m in names]
            lines.append(
                f"| {s['name']} | "
                + " | ".join(cells)
                + f" | {s.get('prompt_tokens_per_example', 0):.0f} | {s.get('seconds_per_example', 0):.3f} |"
            )
        sel = task.get("prompt_selection") or (fresh or {}).get("prompt_selection")
        if sel:
            lines += [
                "",
                f"Prompt variants tried on {sel['examples']} validation examples ({sel['split']}):",
                "",
                f"| variant | {sel['metric']} (validation) | prompt tokens/example | seconds/example |",
                "|---|---|---|---|",
            ]
            for v in sel["variants"]:
                mark = " **(chosen)**" if v["key"] == sel["chosen"] else ""
                lines.append(
                    f"| {v['name']}{mark} | {_fmt(sel['metric'], v['value'])} | "
                    f"{v['prompt_tokens_per_example']:.0f} | {v['seconds_per_example']:.3f} |"
                )
        settings = row.get("eval_settings") or {}
        shots = next((s.get("shots") for s in shown if s["key"] == "base_few_shot"), 0)
        f = row["forgetting"] or {}
        probe = f.get("probe", {}).get("questions") or settings.get("probe_limit")
        lines += [
            "",
            f"Training examples {row['train_examples']}, {row['steps']} steps on {row['device']}; "
            f"evaluated on {task['data']['examples']} test examples"
            f"{' (the first ' + str(settings['limit']) + ')' if settings.get('limit') else ' (all)'}, "
            f"few-shot k = {shots}; forgetting probe: {probe or 'not run'} questions. "
            f"Measured {row.get('measured', '?')} at commit {row.get('commit') or '?'}."
            + (f" {row['source']}" if row.get("source") else ""),
            "",
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Interrupted as e:
        print(f"\n{e}\nRun the same command again to resume.", file=sys.stderr)
        sys.exit(130)
    except TunesmithError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
