"""Evaluating classification data: label scoring (tunesmith.evaluation.classify) against generating the answer.

    .venv/bin/python bench/eval_speed.py                  # 48 test tickets, the base model, batch 8
    .venv/bin/python bench/eval_speed.py --run runs/demo-ticket-triage --examples 96

Generation is what a user would otherwise write: `model.generate` greedy on left-padded batches of prompts
rendered with the same chat template, up to --max-new-tokens tokens, stopping at end-of-turn, the answer read
with classify.parse_label. Label scoring asks the model how likely each label is as the answer (one forward
of the prompts, one of the label continuations from their cached keys/values). Both run on the same model,
examples, batch size and threads, alternated --repeats times; the figure is the ratio of median times. The
predictions are compared where generation produced a valid label.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--run", help="a run directory: evaluate its trained model instead of --model")
    parser.add_argument("--data", default=str(ROOT / "data" / "ticket-triage" / "test.jsonl"))
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from tunesmith import models
    from tunesmith.config import validate_config
    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer
    from tunesmith.data.validate import is_classification
    from tunesmith.evaluation.classify import parse_label, score_labels

    torch.set_num_threads(args.threads)
    all_examples = read_examples(args.data, "auto")
    labels = is_classification(all_examples)
    if labels is None:
        raise SystemExit(f"error: {args.data} does not look like classification data")
    examples = all_examples[: args.examples]
    if args.run:
        import tunesmith

        model, tokenizer, renderer = tunesmith.load(args.run).load_model()
    else:
        model, tokenizer = models.load(args.model, dtype="float32", device="cpu")
        cfg = validate_config({"model": {"name": args.model}})
        renderer = Renderer(tokenizer, cfg.model.chat_template, None)
    model.eval()
    print(f"load average: {os.getloadavg()[0]:.2f}; {len(examples)} examples, labels {labels}", flush=True)

    def generate_all() -> list[str]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        texts = []
        for start in range(0, len(examples), args.batch):
            prompts = [renderer.prompt_ids(e.prompt_messages()) for e in examples[start : start + args.batch]]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False,
                    eos_token_id=renderer.stop_token_ids, pad_token_id=pad,
                )
            texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return texts

    def score_all() -> list[str]:
        with torch.no_grad():
            return [s.prediction for s in score_labels(model, tokenizer, renderer, examples, labels, batch_size=args.batch)]

    times: dict[str, list[float]] = {"generate": [], "score": []}
    for rep in range(args.repeats):
        for name, fn in (("generate", generate_all), ("score", score_all)):
            t0 = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "generate":
                generated = result
            else:
                scored = result
            print(f"repeat {rep + 1} {name:<8} {times[name][-1]:6.2f} s", flush=True)

    parsed = [parse_label(t, labels) for t in generated]
    valid = [(g, s) for g, s in zip(parsed, scored) if g is not None]
    same = sum(g == s for g, s in valid)
    gen_s, score_s = statistics.median(times["generate"]), statistics.median(times["score"])
    print()
    print(f"{'method':<16} {'median s':>9} {'examples/s':>11}")
    print(f"{'model.generate':<16} {gen_s:>9.2f} {len(examples) / gen_s:>11.1f}")
    print(f"{'label scoring':<16} {score_s:>9.2f} {len(examples) / score_s:>11.1f}")
    print(f"label scoring is {gen_s / score_s:.1f}x faster than generation")
    print(f"generation gave a valid label for {len(valid)} of {len(examples)} examples; "
          f"label scoring predicts the same label for {same} of those {len(valid)}")
    print("  first generated answers:", "; ".join(repr(t) for t in generated[:3]))
    if valid and same < len(valid):
        diffs = [(t, s) for t, g, s in zip(generated, parsed, scored) if g is not None and g != s][:5]
        print("  differing (generated text -> scored label):", "; ".join(f"{t!r} -> {s}" for t, s in diffs))


if __name__ == "__main__":
    main()
