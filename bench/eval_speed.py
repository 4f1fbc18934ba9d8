"""Evaluating classification data: tunesmith's label scoring against generating the answer with `model.generate`.

    .venv/bin/python bench/eval_speed.py                                  # base model, zero- and 3-shot
    .venv/bin/python bench/eval_speed.py --run runs/demo-ticket-triage    # + the run's fine-tuned model

For each way `tunesmith eval` prompts a model (base zero-shot, base k-shot, fine-tuned) it times, on the same
examples, model, threads and batch size:
- score: what `tunesmith eval --by score` runs (evaluation.measure.measure): the prompts' common prefix
  (system prompt, shots) encoded once for the whole set, prompt tails in batches of similar length, every label
  scored from the cached keys/values;
- generate: what a user would otherwise write: `model.generate`, greedy, on left-padded batches of the rendered
  prompts in test order, up to the eval's max_new_tokens (longest label + 8), stopping at end-of-turn;
- generate-1: the same one example at a time (no padding at all; how many evaluation scripts call generate).
The generated answer is read with classify.parse_label; predictions are compared where it names a valid label.
Methods alternate within each repeat; the figure is the ratio of median times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

# a benchmark times measuring: never reuse a stored measurement (tunesmith/evaluation/memo.py)
os.environ["TUNESMITH_EVAL_CACHE"] = "0"

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--run", help="a run directory: also time its fine-tuned model (prompted as in training)")
    parser.add_argument(
        "--data", default=str(ROOT / "data" / "ticket-triage"), help="folder with train.jsonl (shots) and test.jsonl"
    )
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="score,generate,generate-1")
    args = parser.parse_args()

    import torch

    from tunesmith import models
    from tunesmith.config import validate_config
    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer
    from tunesmith.evaluation import systems as S
    from tunesmith.evaluation import tasks
    from tunesmith.evaluation.classify import parse_label
    from tunesmith.evaluation.measure import measure
    from tunesmith.progress import Progress

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    train = read_examples(str(data / "train.jsonl"), "auto")
    test = read_examples(str(data / "test.jsonl"), "auto")[: args.examples]
    plan = tasks.plan_task(train, test, "classification", "score")
    labels = plan.labels

    model, tokenizer = models.load(args.model, dtype="float32", device="cpu")
    model.eval()
    cfg = validate_config({"model": {"name": args.model}})
    renderer = Renderer(tokenizer, cfg.model.chat_template, None)
    systems = [S.System("base_zero_shot", "base, zero-shot", model, tokenizer, renderer)]
    if args.shots:
        shots = S.pick_shots(train, args.shots, labels, 42)
        systems.append(S.System("base_few_shot", f"base, {len(shots)}-shot", model, tokenizer, renderer, shots=shots))
    if args.run:
        import tunesmith

        tuned, tuned_tok, tuned_renderer = tunesmith.load(args.run).load_model()
        systems.append(S.System("fine_tuned", "fine-tuned", tuned.eval(), tuned_tok, tuned_renderer))
    max_new = tasks.max_new_tokens_for(plan, tokenizer, test)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(
        f"load average: {os.getloadavg()[0]:.2f}; {len(test)} test examples of {data}, labels {labels}; "
        f"batch {args.batch}, {args.threads} threads, max_new_tokens {max_new}",
        flush=True,
    )

    def score(system) -> list[str]:
        res = measure(
            system, test, plan, batch_size=args.batch, max_new_tokens=max_new, max_length=None, progress=Progress(None)
        )
        return res.predictions

    def generate(system, batch: int) -> tuple[list[str | None], list[str]]:
        pad = system.pad
        texts = []
        for start in range(0, len(test), batch):
            prompts = [system.prompt(ex) for ex in test[start : start + batch]]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.no_grad():
                out = system.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=system.renderer.stop_token_ids,
                    pad_token_id=pad,
                )
            texts += system.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [parse_label(t, labels) for t in texts], texts

    rows = []
    for system in systems:
        prompt_tokens = statistics.mean(len(system.prompt(ex)) for ex in test)
        times: dict[str, list[float]] = {m: [] for m in methods}
        answers: dict[str, list] = {}
        for rep in range(args.repeats):
            for m in methods:
                t0 = time.perf_counter()
                if m == "score":
                    answers[m] = score(system)
                else:
                    answers[m], texts = generate(system, args.batch if m == "generate" else 1)
                    answers[m + ":text"] = texts
                times[m].append(time.perf_counter() - t0)
                print(f"{system.name:<18} repeat {rep + 1} {m:<11} {times[m][-1]:7.2f} s", flush=True)
        med = {m: statistics.median(t) for m, t in times.items()}
        row = {"system": system.name, "prompt_tokens": prompt_tokens, "median": med}
        if "score" in answers:
            for m in methods:
                if m == "score":
                    continue
                valid = [(g, s) for g, s in zip(answers[m], answers["score"]) if g is not None]
                row[m] = {"valid": len(valid), "same": sum(g == s for g, s in valid), "ratio": med[m] / med["score"]}
                if m == "generate":
                    row["first"] = answers[m + ":text"][:2]
        rows.append(row)

    print()
    head = f"{'system':<18} {'prompt tok':>10} " + " ".join(f"{m + ' s':>13}" for m in methods)
    others = [m for m in methods if m != "score"]
    if "score" in methods:
        head += " " + " ".join(f"{'vs ' + m:>14}" for m in others) + "  same prediction (where generation is valid)"
    print(head)
    for row in rows:
        line = f"{row['system']:<18} {row['prompt_tokens']:>10.0f} " + " ".join(
            f"{row['median'][m]:>13.2f}" for m in methods
        )
        if "score" in methods:
            line += " " + " ".join(f"{row[m]['ratio']:>13.1f}x" for m in others)
            line += "  " + ", ".join(f"{m}: {row[m]['same']}/{row[m]['valid']}" for m in others)
        print(line)
    for row in rows:
        if "first" in row:
            print(f"  {row['system']}: first generated answers {row['first']!r}")


if __name__ == "__main__":
    main()
