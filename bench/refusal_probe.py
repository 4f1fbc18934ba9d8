"""How sure is a tuned safety model of its refusals? Greedy answers to preference test prompts with
`metadata.category` harmful / harmless, the refusal detector's verdict (evaluation/refusal.py, as `tunesmith eval`
uses it), and, per prompt, the probability the model gives to the first token of its greedy answer.

    python bench/refusal_probe.py runs/safety-dpo [--data data/safety-preferences/test.jsonl] [--limit N]
        [--max-new-tokens 48] [--out answers.json]

Greedy decoding takes the most probable first token. A refusal opens with one token ("I" of "I can't ..."), while
helpful answers open with many different ones; so a refusal can be the greedy answer where the model gives its
opening little probability. This prints, for refused and answered prompts of each category, the median and largest
probability of the greedy first token. 48 new tokens are enough for the detector, which reads the first two
sentences (every refusal of data/safety-preferences declines within its first 95 characters).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tunesmith.evaluation.generate import load_run_model  # noqa: E402
from tunesmith.evaluation.preference_eval import _generate  # noqa: E402
from tunesmith.evaluation.refusal import is_refusal  # noqa: E402
from tunesmith.jsonl import read_objects  # noqa: E402
from tunesmith.progress import Progress  # noqa: E402

CATEGORIES = ("harmful", "harmless")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--data", default=str(ROOT / "data" / "safety-preferences" / "test.jsonl"))
    ap.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write each prompt's answer, verdict and top first tokens here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    objects, problems = read_objects(args.data)
    objects = objects[: args.limit]
    bad = [n for n, r in objects if "messages" not in r or (r.get("metadata") or {}).get("category") not in CATEGORIES]
    if problems or bad or not objects:
        lines = [n for n, _ in problems] + bad
        print(
            f"{args.data}: needs chat-form pairs with metadata.category harmful or harmless; lines {lines[:10]} are not"
        )
        return 2
    rows = [r for _, r in objects]
    model, tok, renderer = load_run_model(args.run_dir, dtype=args.dtype)
    prompts = [renderer.prompt_ids(r["messages"], add_generation_prompt=True) for r in rows]
    started = time.perf_counter()
    tops = []
    with torch.no_grad():
        for p in prompts:
            probs = model(torch.tensor([p]), logits_to_keep=1).logits[0, -1].float().softmax(-1)
            top = probs.topk(5)
            tops.append([(tok.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)])
    answers = _generate(model, tok, renderer, prompts, args.max_new_tokens, Progress(None), "model")
    seconds = time.perf_counter() - started

    records = []
    for r, top, answer in zip(rows, tops, answers):
        records.append(
            {
                "category": r["metadata"]["category"],
                "prompt": r["messages"][-1]["content"],
                "refused": is_refusal(answer),
                "greedy_first_token_p": top[0][1],
                "top_first_tokens": [[t, round(p, 4)] for t, p in top],
                "answer": answer,
            }
        )
    print(f"{args.run_dir}: {len(rows)} prompts, {seconds:.0f} s (greedy, {args.max_new_tokens} new tokens)")
    for category in CATEGORIES:
        of = [x for x in records if x["category"] == category]
        if not of:
            continue
        refused = [x for x in of if x["refused"]]
        line = f"  {category}: refused {len(refused)}/{len(of)} ({len(refused) / len(of):.1%})"
        for name, group in (("refused", refused), ("answered", [x for x in of if not x["refused"]])):
            if group:
                ps = [x["greedy_first_token_p"] for x in group]
                line += f"; {name}: greedy first token p median {statistics.median(ps):.3f}, max {max(ps):.3f}"
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
