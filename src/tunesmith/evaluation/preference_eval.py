"""`tunesmith eval` on preference pairs: does the tuned model prefer the chosen answers, against the base model
prompted zero-shot and few-shot, on held-out pairs?

Systems (as for SFT, docs/eval-format.md):
- base_zero_shot: the base model, the data's system prompt (data.system_prompt), the pair's prompt;
- base_few_shot: the same with k training pairs' prompts and CHOSEN answers as earlier turns (for raw-text pairs,
  prompt + chosen answer blocks before the prompt), k = eval.shots (auto: 3), drawn with the seed;
- fine_tuned: the run's model, prompted as in training.

Metrics per system:
- preference_accuracy (primary): share of pairs the system ranks chosen above rejected. A prompted base model ranks
  by log-likelihood: log p(chosen) > log p(rejected) (summed over the answer tokens). The tuned model ranks by its
  objective's reward, which is what training optimised: DPO/IPO the log-ratio to the reference (the base model on
  the same prompt), log p(chosen) - log p_ref(chosen) > log p(rejected) - log p_ref(rejected) (IPO per token);
  SimPO and ORPO the mean token log-probability. Ties count as wrong.
- logp_margin: mean over pairs of log p(chosen) - log p(rejected) in nats (every system; how far the model's own
  likelihood prefers the chosen answer);
- reward_margin (fine-tuned only): mean margin of the objective's reward (what training logged as reward_margin);
- where the test pairs say which prompts are harmful (`metadata.category` "harmful" / "harmless", as in
  data/safety-preferences): each system answers every test prompt (greedy) and evaluation/refusal.py's rule-based
  detector decides whether the answer is a refusal: refusal_rate_harmful (higher is better),
  over_refusal_rate_harmless (lower is better) and refusal_accuracy (share of prompts handled as their category
  asks: a refusal for harmful, an answer for harmless).

Per-example scores in task_examples.jsonl are 1/0 (ranked right), so the report's paired bootstrap tests the
fine-tuned model against the best prompt exactly as for SFT; the generated answers are stored as the outputs.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import torch

from tunesmith.atomic import atomic_write_text
from tunesmith.data.example import Example, Message
from tunesmith.data.pairs import budget_batches
from tunesmith.errors import DataError
from tunesmith.evaluation.tasks import METRICS
from tunesmith.models.functional import pair_batch_logits, sequence_logps, takes_custom_masks
from tunesmith.models.util import pad_id
from tunesmith.progress import Progress

VERSION = 1
ROW_TOKENS = 512
FORWARD_TOKENS = 4096  # tokens per no-grad scoring forward
SHARE_PREFIX = 8  # a system prompt of at least this many tokens that all pairs of a batch share is fed once
CATEGORIES = ("harmful", "harmless")
DEFAULT_SHOTS = 3


def is_preference_data(examples: list[Example]) -> bool:
    return bool(examples) and all(e.kind == "preference" for e in examples)


def few_shot_example(ex: Example, shots: list[Example]) -> Example:
    """The pair with `shots` (their prompts and chosen answers) as earlier turns."""
    if ex.is_chat_pair:
        lead = [m for m in ex.messages[:1] if m.role == "system"]
        turns: list[Message] = []
        for s in shots:
            turns += [m for m in s.messages if m.role != "system"] + [Message("assistant", s.chosen or "")]
        messages = [*lead, *turns, *ex.messages[len(lead) :]]
        return Example("preference", messages=messages, chosen=ex.chosen, rejected=ex.rejected, source=ex.source)
    context = "".join(f"{s.prompt}{s.chosen}\n\n" for s in shots)
    return Example(
        "preference", prompt=context + (ex.prompt or ""), chosen=ex.chosen, rejected=ex.rejected, source=ex.source
    )


@torch.no_grad()
def pair_logps(model, pairs: list, pad_id: int, progress: Progress | None = None, label: str = "") -> torch.Tensor:
    """(n, 2) summed answer log-probs [chosen, rejected], in batches of about FORWARD_TOKENS fed tokens."""
    shared = takes_custom_masks(model)[0]
    device = next(model.parameters()).device
    out = []
    bar = progress.start(label, len(pairs)) if progress is not None else None
    for _, batch in budget_batches(pairs, FORWARD_TOKENS, pad_id, ROW_TOKENS, shared, SHARE_PREFIX if shared else 0):
        batch = batch.to(device)
        out.append(sequence_logps(pair_batch_logits(model, batch), batch).view(-1, 2).cpu())
        if bar is not None:
            progress.update(bar, advance=batch.n_pairs)
    return torch.cat(out) if out else torch.zeros((0, 2))


def trained_counts(pairs: list) -> torch.Tensor:
    """(n, 2) trained answer tokens of each pair."""
    return torch.tensor(
        [[sum(t != -100 for t in p.chosen_labels), sum(t != -100 for t in p.rejected_labels)] for p in pairs],
        dtype=torch.float32,
    )


def tuned_rewards(cfg, objective: str, tuned: torch.Tensor, ref: torch.Tensor | None, counts: torch.Tensor):
    """(n, 2) the objective's implicit reward of each answer (see the module docstring)."""
    if objective == "dpo":
        if cfg.dpo.loss == "ipo":
            return cfg.dpo.beta * (tuned - ref) / counts.clamp(min=1)
        return cfg.dpo.beta * (tuned - ref)
    mean = tuned / counts.clamp(min=1)
    return cfg.simpo.beta * mean if objective == "simpo" else mean


def evaluate_pairs(
    run,
    cfg,
    test: list[Example],
    data_path: str,
    train: list[Example],
    base: tuple,
    tuned: tuple,
    *,
    max_new_tokens: int | None,
    shots: int | None,
    progress: Progress,
    log=print,
    dtype: str | None = None,
) -> dict:
    """Measure the three systems on the test pairs; write eval/task.json and eval/task_examples.jsonl."""
    from tunesmith.evaluation.aggregate import flipped
    from tunesmith.evaluation.task_eval import SYSTEM_ORDER, _finite, example_ids

    base_model, base_tok, base_renderer = base
    tuned_model, tuned_tok, tuned_renderer = tuned
    objective = run.objective
    max_length = cfg.data.max_length if isinstance(cfg.data.max_length, int) else None
    k = DEFAULT_SHOTS if shots is None else shots
    pool = [e for e in train if e.kind == "preference" and e.is_chat_pair == test[0].is_chat_pair]
    rng = random.Random(f"{cfg.train.seed}:shots")
    chosen_shots = rng.sample(pool, min(k, len(pool))) if k and pool else []

    def encode(renderer, examples):
        out = []
        for ex in examples:
            # evaluation keeps every pair: an answer cut to fit is scored on what fits
            out.append(renderer.encode_pair(ex, max_length=max_length, truncation="truncate"))
        return out

    systems = [("base_zero_shot", "base zero-shot", base_model, base_tok, base_renderer, test)]
    if chosen_shots:
        few = [few_shot_example(ex, chosen_shots) for ex in test]
        systems.append(("base_few_shot", f"base {len(chosen_shots)}-shot", base_model, base_tok, base_renderer, few))
    systems.append(("fine_tuned", "fine-tuned", tuned_model, tuned_tok, tuned_renderer, test))

    categories = [(ex.metadata or {}).get("category") for ex in test]
    with_categories = all(c in CATEGORIES for c in categories)
    if with_categories:
        from tunesmith.evaluation.refusal import is_refusal
    max_new = max_new_tokens or _max_new_tokens(base_tok, test)

    entries, per_example, encoded_zero = [], {}, None
    for key, name, model, tok, renderer, examples in systems:
        t0 = time.perf_counter()
        pairs = encode(renderer, examples)
        pad = pad_id(tok)
        logps = pair_logps(model, pairs, pad, progress, f"{name}: scoring")
        counts = trained_counts(pairs)
        metrics = {"logp_margin": float((logps[:, 0] - logps[:, 1]).mean())}
        if key == "fine_tuned":
            ref = None
            if objective == "dpo":
                # the reference of training: the base model on the prompts as the tuned model sees them
                same = encoded_zero is not None and all(
                    a.prompt == b.prompt and a.chosen == b.chosen and a.rejected == b.rejected
                    for a, b in zip(encoded_zero[0], pairs)
                )
                ref = encoded_zero[1] if same else pair_logps(base_model, pairs, pad, progress, "reference")
            rewards = tuned_rewards(cfg, objective, logps, ref, counts) if objective != "sft" else logps
            right = (rewards[:, 0] > rewards[:, 1]).float()
            metrics["reward_margin"] = float((rewards[:, 0] - rewards[:, 1]).mean())
        else:
            right = (logps[:, 0] > logps[:, 1]).float()
        if key == "base_zero_shot":
            encoded_zero = (pairs, logps)
        metrics = {"preference_accuracy": float(right.mean()), **metrics}
        scoring = time.perf_counter() - t0
        seconds = {"scoring": scoring}
        generated = None
        if with_categories:
            t1 = time.perf_counter()
            generated = _generate(model, tok, renderer, [p.prompt for p in pairs], max_new, progress, name)
            seconds["generation"] = time.perf_counter() - t1
            refused = [is_refusal(text) for text in generated]
            harmful = [r for r, c in zip(refused, categories) if c == "harmful"]
            harmless = [r for r, c in zip(refused, categories) if c == "harmless"]
            if harmful:
                metrics["refusal_rate_harmful"] = sum(harmful) / len(harmful)
            if harmless:
                metrics["over_refusal_rate_harmless"] = sum(harmless) / len(harmless)
            metrics["refusal_accuracy"] = sum(r == (c == "harmful") for r, c in zip(refused, categories)) / len(test)
        total = sum(seconds.values())
        prompt_tokens = sum(len(p.prompt) for p in pairs) / len(pairs)
        entries.append(
            {
                "key": key,
                "name": name,
                "shots": len(chosen_shots) if key == "base_few_shot" else 0,
                "metrics": metrics,
                "prompt_tokens_per_example": prompt_tokens,
                "seconds_per_example": total / len(test),
                "seconds": total,
                "seconds_by_mode": seconds,
            }
        )
        per_example[key] = (right.tolist(), generated)
        shown = "  ".join(f"{m} {v:.3f}" for m, v in metrics.items())
        log(f"  {name}: {shown}  ({prompt_tokens:.0f} prompt tokens, {total / len(test):.3f} s per example)")

    ids = example_ids(data_path, test)
    records = []
    for i, ex in enumerate(test):
        rec = {
            "id": ids[i],
            "input": _prompt_text(ex),
            "reference": ex.chosen or "",
            "rejected": ex.rejected or "",
            "outputs": {k: (g[i] if g is not None else "") for k, (_, g) in per_example.items()},
            "scores": {k: s[i] for k, (s, _) in per_example.items()},
        }
        if with_categories:
            rec["category"] = categories[i]
        records.append(rec)
    result = {
        "version": VERSION,
        "task": "preference",
        "objective": objective,
        "data": {
            "path": str(data_path),
            "sha256": hashlib.sha256(Path(data_path).read_bytes()).hexdigest(),
            "examples": len(test),
            **({"categories": {c: categories.count(c) for c in CATEGORIES}} if with_categories else {}),
        },
        "primary": "preference_accuracy",
        "metrics_info": {
            name: {"higher_is_better": METRICS[name][1], "description": METRICS[name][2]}
            for name in dict.fromkeys(m for e in entries for m in e["metrics"])
        },
        "systems": sorted(entries, key=lambda e: SYSTEM_ORDER.index(e["key"])),
        "examples_file": "task_examples.jsonl",
        "flipped": flipped(test, records, "preference_accuracy"),
        "flip_rule": "per-example preference_accuracy is 1 (ranked right) or 0; listed: pairs gained or lost from "
        "base zero-shot to fine-tuned",
        "max_new_tokens": max_new if with_categories else None,
        **({"dtype": dtype.removeprefix("torch.")} if dtype else {}),
        "by": ["score", "generate"] if with_categories else ["score"],
    }
    eval_dir = Path(run.path) / "eval"
    atomic_write_text(
        eval_dir / "task_examples.jsonl", "".join(json.dumps(_finite(r), ensure_ascii=False) + "\n" for r in records)
    )
    atomic_write_text(eval_dir / "task.json", json.dumps(_finite(result), indent=2, ensure_ascii=False))
    return result


def _prompt_text(ex: Example) -> str:
    if ex.is_chat_pair:
        return "\n".join(f"{m.role}: {m.content}" for m in ex.messages)
    return ex.prompt or ""


def _max_new_tokens(tokenizer, test: list[Example], cap: int = 256) -> int:
    """Room for the longer answers of the test pairs: 1.5x the longest chosen or rejected + 16, at most `cap`."""
    longest = max(
        len(tokenizer(a or "", add_special_tokens=False)["input_ids"]) for ex in test for a in (ex.chosen, ex.rejected)
    )
    return min(cap, int(1.5 * longest) + 16)


def _generate(model, tokenizer, renderer, prompts: list[list[int]], max_new: int, progress, name) -> list[str]:
    from tunesmith.evaluation.generate import greedy_batch, plan_batches, tokens_per_forward

    out = [""] * len(prompts)
    bar = progress.start(f"{name}: generation", len(prompts))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    widths = [len(prompts[i]) + max_new for i in order]
    for batch in plan_batches(widths, None, tokens_per_forward(model)):
        idx = [order[j] for j in batch]
        texts = greedy_batch(
            model,
            tokenizer,
            [prompts[i] for i in idx],
            stop_ids=renderer.stop_token_ids,
            stop_strings=renderer.stop_strings,
            max_new_tokens=max_new,
        )
        for i, text in zip(idx, texts):
            out[i] = text.strip()
        progress.update(bar, advance=len(idx))
    return out


def check_pairs(test: list[Example], data_path: str) -> None:
    forms = {e.is_chat_pair for e in test}
    if len(forms) > 1:
        raise DataError(f"{data_path}: the test pairs mix raw-text and chat prompts; use one form per file")
