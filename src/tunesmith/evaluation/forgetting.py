"""Forgetting: what fine-tuning cost the model's general abilities, measured on a held-out probe.

(One module of ~600 lines: the probe's loading, its three measures, the answer scorer and the verdict share one
definition of the probe and its thresholds; split, each part would be too small to read on its own.)

The probe (src/tunesmith/resources/probe/, data card in its README.md) was written for tunesmith and is never
trained on. `forgetting_eval` compares the base model with the fine-tuned one on it in three ways:

- perplexity on general_text.jsonl (35 passages of varied English prose, ~6.7k tokens): token-weighted, each
  passage scored alone, cut into chunks of at most the model's context;
- the mean per-token KL(base || fine-tuned) of the next-token distributions, teacher-forced over the probe's
  questions with their reference answers (prompt and answer tokens), rendered with the run's chat template but
  without the run's task system prompt: how far the tuned model's predictions moved on general input;
- the score on questions.jsonl (305 questions: facts, arithmetic, reasoning, language, instructions, writing),
  answered greedily by both models and scored per item ("exact", "starts", "contains", "number", "chrf"; see
  `score_answer`).

Verdict thresholds (forgetting is the worse of the two signals):
- high:     perplexity up by 30% or more, or the question score down by 0.15 or more;
- moderate: perplexity up by 10% or more, or the question score down by 0.05 or more;
- low:      otherwise.
Why these numbers: perplexity on the probe is exact (no sampling), so any rise is real, but a rise of a few
percent is what even a light LoRA on unrelated data produces and does not show in answers; +10% is where a
model's general text predictions are clearly worse, and +30% (e^0.26 nats/token) is a large shift for a model
that was not meant to change its language at all. A score drop of 0.05 is 15 of the 305 questions lost net
(about two standard errors of a paired difference when ~10% of answers flip), the smallest drop that is not
decoding noise; 0.15 (~46 questions) means the model visibly lost abilities a user will notice.
KL is reported, not thresholded: it has no natural scale across models, but it is the most sensitive of the
three and the one `train.kl_to_base` minimises, so it is the number to compare runs by.

`tunesmith.evaluate()` calls `forgetting_eval` after the task metrics, reusing the models it already loaded.
"""

from __future__ import annotations

import json
import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import DataError
from tunesmith.evaluation import memo
from tunesmith.jsonl import read_objects
from tunesmith.models.kv import cache_kw, cache_of
from tunesmith.run_dir import RunDir

PROBE_NAME = "tunesmith-general-v1"
PROBE_DIR = Path(__file__).resolve().parent.parent / "resources" / "probe"
CHECKS = ("exact", "starts", "contains", "number", "chrf")
CATEGORIES = ("facts", "arithmetic", "reasoning", "language", "instructions", "writing")
# answers are short by design: a generous bound per check keeps generation cheap (it dominates the cost)
MAX_NEW_TOKENS = {"exact": 8, "starts": 8, "contains": 16, "number": 16, "chrf": 40}
THRESHOLDS = {"perplexity_change": {"moderate": 0.10, "high": 0.30}, "score_drop": {"moderate": 0.05, "high": 0.15}}
THRESHOLDS_TEXT = (
    "low: perplexity up less than 10% and question score down less than 0.05; "
    "moderate: perplexity up 10% or more, or question score down 0.05 or more; "
    "high: perplexity up 30% or more, or question score down 0.15 or more"
)
RAW_QUESTION = "Question: {prompt}\nAnswer:"  # runs trained on raw text/completions get no chat template


@dataclass
class Probe:
    name: str
    path: Path
    texts: list[dict]
    questions: list[dict]


def load_probe(path: str | Path | None = None) -> Probe:
    """The built-in probe, or a directory holding general_text.jsonl and questions.jsonl in the same shape.
    Every problem in the files is reported at once, as FILE:LINE."""
    root = Path(path) if path is not None else PROBE_DIR
    if not root.is_dir():
        raise DataError(
            f"{root}: probe directory not found; give a directory with general_text.jsonl and questions.jsonl"
        )
    problems: list[str] = []
    texts = _read_jsonl(root / "general_text.jsonl", problems)
    questions = _read_jsonl(root / "questions.jsonl", problems)
    for line, row in texts:
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            problems.append(f'{root / "general_text.jsonl"}:{line}: needs a non-empty "text"')
    seen: set[str] = set()
    for line, row in questions:
        where = f"{root / 'questions.jsonl'}:{line}"
        for key in ("id", "prompt", "reference", "check"):
            if not isinstance(row.get(key), str) or not row[key]:
                problems.append(f'{where}: needs a non-empty string "{key}"')
        if row.get("check") not in CHECKS:
            problems.append(f"{where}: check {row.get('check')!r} is not one of {', '.join(CHECKS)}")
        if row.get("check") == "number" and _number(str(row.get("reference"))) is None:
            problems.append(f'{where}: a "number" check needs a numeric reference, not {row.get("reference")!r}')
        if not isinstance(row.get("aliases", []), list):
            problems.append(f'{where}: "aliases" must be a list of strings')
        if row.get("id") in seen:
            problems.append(f"{where}: duplicate id {row.get('id')!r}")
        seen.add(row.get("id"))
    if not texts or not questions:
        problems.append(f"{root}: the probe needs at least one passage and one question")
    if problems:
        raise DataError(f"{root}: {len(problems)} problem(s) in the probe:", problems)
    name = PROBE_NAME if root.resolve() == PROBE_DIR.resolve() else f"custom:{root.name}"
    return Probe(name, root, [r for _, r in texts], [r for _, r in questions])


def _read_jsonl(path: Path, problems: list[str]) -> list[tuple[int, dict]]:
    if not path.is_file():
        problems.append(f"{path}: missing")
        return []
    rows, bad = read_objects(path)
    problems += [f"{path}:{line}: {what}; write one JSON object per line" for line, what in bad]
    return rows


# ----------------------------------------------------------------------------------------------------
# Scoring one answer


def _norm(text: str, case_sensitive: bool = False) -> str:
    """Words and numbers only, single-spaced: punctuation, quotes and markdown do not decide a score."""
    text = text if case_sensitive else text.lower()
    return " ".join(re.findall(r"\d+(?:\.\d+)?|[^\W_]+", text))


def _numbers(text: str) -> list[float]:
    return [v for v in (_number(m) for m in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)) if v is not None]


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def score_answer(question: dict, answer: str) -> float:
    """Score in 0..1 of one answer. Checks (all case-insensitive unless the item sets "case_sensitive"):
    - exact: the answer's first non-empty line equals the reference or an alias (words and numbers compared);
    - starts: the answer begins with the reference (e.g. "yes" for "Yes, because ...");
    - contains: the reference or an alias occurs in the answer as whole words;
    - number: the first number in the answer that is not merely copied from the question equals the reference;
    - chrf: chrF (character n-gram F-score, sacrebleu) against the reference, divided by 100.
    """
    check = question["check"]
    cased = bool(question.get("case_sensitive"))
    targets = [_norm(t, cased) for t in [question["reference"], *question.get("aliases", [])]]
    if check == "chrf":
        from sacrebleu.metrics import CHRF

        return CHRF().sentence_score(answer.strip(), [question["reference"]]).score / 100.0
    if check == "number":
        ref = _number(question["reference"])
        copied = set(_numbers(question["prompt"]))
        found = [v for v in _numbers(answer) if v not in copied or v == ref]
        return float(bool(found) and abs(found[0] - ref) < 1e-6)
    text = _norm(answer, cased)
    if check == "exact":
        first = next((line for line in answer.splitlines() if line.strip()), "")
        return float(_norm(first, cased) in targets)
    if check == "starts":
        return float(any(text == t or text.startswith(t + " ") for t in targets))
    if check == "contains":
        return float(any(f" {t} " in f" {text} " for t in targets if t))
    raise DataError(f"question {question.get('id')}: unknown check {check!r}")


def verdict(perplexity_change: float, score_change: float) -> str:
    """low | moderate | high, per the thresholds in the module docstring (THRESHOLDS)."""
    drop = -score_change
    ppl, score = THRESHOLDS["perplexity_change"], THRESHOLDS["score_drop"]
    if perplexity_change >= ppl["high"] or drop >= score["high"]:
        return "high"
    if perplexity_change >= ppl["moderate"] or drop >= score["moderate"]:
        return "moderate"
    return "low"


def explain(result: dict, method: str | None = None) -> str:
    ppl = result["perplexity"]["change"]
    q = result["questions"]
    pts = f"{abs(q['change']):.2f}"
    moved = (
        f"perplexity on general text {'rose' if ppl >= 0 else 'fell'} {abs(ppl):.1%} and the general-question score "
    )
    moved += f"{'fell' if q['change'] < 0 else 'rose'} by {pts} ({q['base']:.2f} -> {q['fine_tuned']:.2f})"
    if result["verdict"] == "low":
        return f"Forgetting is low: {moved}; the fine-tuned model keeps the base model's general abilities."
    worst = min(q["by_category"].items(), key=lambda kv: kv[1]["fine_tuned"] - kv[1]["base"])[0]
    steps = "train fewer steps or a lower learning rate, or set train.replay=0.1 or train.kl_to_base=0.1"
    if method in ("full", "freeze"):
        fix = f"use LoRA instead of {'full fine-tuning' if method == 'full' else 'unfrozen blocks'}, {steps}"
    elif method in ("lora", "dora"):
        fix = f"lower lora.r or the number of target modules, {steps}"
    else:
        fix = steps
    return (
        f"Forgetting is {result['verdict']}: {moved}, worst in {worst}; if the model must still handle general "
        f"requests, {fix}."
    )


# ----------------------------------------------------------------------------------------------------
# The three measurements


class _System:
    """A model as the probe sees it: the fine-tuned model, or the base model, which for a peft run can be the
    same object with its adapter disabled (no second copy in memory)."""

    def __init__(self, model, disable_adapter: bool = False):
        self.model = model
        self.disable_adapter = disable_adapter

    def active(self):
        return self.model.disable_adapter() if self.disable_adapter else nullcontext()

    def logits(self, ids, mask):
        import torch

        with torch.no_grad(), self.active():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits[:, -ids.shape[1] :].float()  # prompt tuning prepends virtual-token positions

    def prefix(self, ids: list[int]):
        """(key/value cache, logits (1, len, vocab)) of a shared prefix."""
        import torch

        t = torch.tensor([ids], device=self.device)
        with torch.no_grad(), self.active():
            out = self.model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=True)
        return cache_of(out), out.logits.float()

    def continuation(self, rows: list[list[int]], prefix_len: int, cache):
        """Logits (B, width, vocab) of left-padded rows that continue a cached prefix."""
        import torch

        from tunesmith.evaluation.generate import expand_cache, left_pad

        ids, mask, positions = left_pad(rows, 0, prefix_len)
        with torch.no_grad(), self.active():
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                **cache_kw(expand_cache(cache, len(rows))),
                use_cache=True,
            )
        return out.logits.float()

    @property
    def device(self):
        return next(self.model.parameters()).device


def _context(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def _batches(sequences: list[list[int]], size: int):
    """Right-padded (ids, mask, index) batches of similar lengths."""
    import torch

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[r, : len(sequences[i])] = 1
        yield ids, mask, idx


def text_sequences(tokenizer, texts: list[str], context: int) -> list[list[int]]:
    """Each passage tokenized alone (with BOS where the tokenizer adds one), cut into chunks of <= context."""
    out = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        out += [ids[i : i + context] for i in range(0, len(ids), context) if len(ids[i : i + context]) > 1]
    return out


def perplexity(system: _System, sequences: list[list[int]], batch_size: int = 8) -> tuple[float, int]:
    """exp(mean next-token NLL over every predicted token), and how many tokens were predicted."""
    import torch.nn.functional as F

    device = next(system.model.parameters()).device
    total, n = 0.0, 0
    for ids, mask, _ in _batches(sequences, batch_size):
        logits = system.logits(ids.to(device), mask.to(device))
        targets = ids[:, 1:].to(device).masked_fill(mask[:, 1:].to(device) == 0, -100)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
        n += int(mask[:, 1:].sum())
    return math.exp(total / max(n, 1)), n


def mean_kl(base: _System, tuned: _System, sequences: list[list[int]], batch_size: int = 16) -> tuple[float, int]:
    """Mean over predicted positions of KL(base || tuned) of the next-token distributions, in nats per token.

    The probe's chat prompts all start with the same template tokens (SmolLM2's default system prompt is ~30
    of ~60 tokens per item). Causal attention makes the distributions at those positions identical for every
    item, so the prefix is run once per model and its KL counted once per item; the rest of each sequence runs
    on top of the prefix's cached keys/values. The result equals scoring every sequence whole."""
    import torch

    from tunesmith.evaluation.generate import common_prefix_length, uses_prompt_learning

    shared = 0 if uses_prompt_learning(tuned.model) else common_prefix_length(sequences)
    total, n = 0.0, 0
    if not shared:  # virtual tokens (prompt/prefix tuning) or nothing shared: right-padded whole sequences
        for ids, mask, _ in _batches(sequences, batch_size):
            ids, mask = ids.to(tuned.device), mask.to(tuned.device)
            kl, count = _kl_sum(base.logits(ids, mask)[:, :-1], tuned.logits(ids, mask)[:, :-1], mask[:, 1:].bool())
            total, n = total + kl, n + count
        return max(total, 0.0) / max(n, 1), n
    (base_cache, p), (tuned_cache, q) = base.prefix(sequences[0][:shared]), tuned.prefix(sequences[0][:shared])
    kl, count = _kl_sum(p, q, None)
    total, n = kl * len(sequences), count * len(sequences)
    suffixes = [s[shared:] for s in sequences]
    for idx in _length_batches(suffixes, batch_size):
        rows = [suffixes[i] for i in idx]
        p, q = base.continuation(rows, shared, base_cache), tuned.continuation(rows, shared, tuned_cache)
        width = p.shape[1]
        # left-padded rows: a suffix of length m fills the last m columns; its last token predicts nothing
        valid = torch.tensor([[width - len(r) <= c < width - 1 for c in range(width)] for r in rows], device=p.device)
        kl, count = _kl_sum(p, q, valid)
        total, n = total + kl, n + count
    return max(total, 0.0) / max(n, 1), n


def _kl_sum(p_logits, q_logits, valid) -> tuple[float, int]:
    from tunesmith.models.functional import kl_per_position

    kl = kl_per_position(p_logits, q_logits)
    if valid is None:
        return kl.sum().item(), kl.numel()
    return kl[valid].sum().item(), int(valid.sum())


def _length_batches(sequences: list[list[int]], size: int) -> list[list[int]]:
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def question_sequences(tokenizer, renderer, questions: list[dict], raw: bool) -> list[list[int]]:
    """Prompt + reference answer token ids, as the model would see a correct answer."""
    from tunesmith.data.example import Example, Message

    out = []
    for q in questions:
        if raw:
            text = RAW_QUESTION.format(prompt=q["prompt"]) + " " + q["reference"]
            out.append(tokenizer(text)["input_ids"])
        else:
            ex = Example(kind="chat", messages=[Message("user", q["prompt"]), Message("assistant", q["reference"])])
            out.append(renderer.encode(ex).input_ids)
    return out


def answer_questions(
    system: _System, tokenizer, renderer, questions: list[dict], raw: bool, log=print, label=""
) -> list[str]:
    """Greedy answers, in batches of similar prompt length within groups of equal max_new_tokens. The
    template tokens every prompt starts with are encoded once (evaluation.generate.greedy_batch)."""
    from tunesmith.evaluation.generate import (
        common_prefix_length,
        encode_prefix,
        greedy_batch,
        plan_batches,
        prompt_ids,
        tokens_per_forward,
    )

    prompts = [
        RAW_QUESTION.format(prompt=q["prompt"]) if raw else [{"role": "user", "content": q["prompt"]}]
        for q in questions
    ]
    ids = [prompt_ids(tokenizer, renderer, p) for p in prompts]
    stops = ["\nQuestion:"] if raw else []
    shared = common_prefix_length(ids)
    answers: list[str] = [""] * len(questions)
    groups: dict[int, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(int(q.get("max_tokens") or MAX_NEW_TOKENS[q["check"]]), []).append(i)
    done = 0
    with system.active():
        cache = encode_prefix(system.model, ids[0][:shared])
        budget = tokens_per_forward(system.model)
        for max_new, idx in sorted(groups.items()):
            idx = sorted(idx, key=lambda i: len(ids[i]))
            for batch in plan_batches([len(ids[i]) - shared + max_new for i in idx], None, budget):
                part = [idx[j] for j in batch]
                outs = greedy_batch(
                    system.model,
                    tokenizer,
                    [ids[i] for i in part],
                    stop_ids=renderer.stop_token_ids,
                    stop_strings=[*renderer.stop_strings, *stops],
                    max_new_tokens=max_new,
                    prefix_len=shared,
                    prefix_cache=cache,
                )
                for i, text in zip(part, outs):
                    answers[i] = text.strip()
                done += len(part)
            log(f"  {label}: answered {done}/{len(questions)} questions")
    return answers


# ----------------------------------------------------------------------------------------------------
# The evaluation


def forgetting_eval(
    run,
    base=None,
    tuned=None,
    limit: int | None = None,
    log=print,
    probe: str | Path | None = None,
    base_cache: dict | None = None,
) -> dict:
    """Compare base and fine-tuned model on the general-ability probe; write RUN_DIR/eval/forgetting.json
    (docs/eval-format.md) and eval/forgetting_examples.jsonl, and return the JSON object.

    run: the run directory (a path or a RunDir). base/tuned: (model, tokenizer) already loaded, else tuned is
    loaded from the run and base is the tuned model with its adapter disabled (peft methods) or a fresh copy of the base model.
    limit: use only this many questions (spread evenly over the file) and limit // 8 passages (at least 3), for
    a quick look; the verdict thresholds stay the same but the numbers are noisier.
    probe: a directory with your own general_text.jsonl and questions.jsonl (default: the built-in probe).
    base_cache: a dict kept across calls on runs of the same base model and template (tunesmith sweep's trials):
    the base model's perplexity and answers, which do not change, are measured once, and a base model that had to
    be loaded is kept."""
    from tunesmith.atomic import atomic_write_text
    from tunesmith.data.templates import Renderer

    t0 = time.perf_counter()
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    cfg = run.config
    data = load_probe(probe)
    texts, questions = data.texts, data.questions
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be a positive number of questions, not {limit}")
        questions = _spread(questions, limit)
        texts = _spread(texts, max(3, limit // 8))

    if tuned is None:
        from tunesmith.evaluation.generate import load_run_model

        tuned = load_run_model(run)[:2]
    tuned_model, tokenizer = tuned
    tuned_sys = _System(tuned_model.eval())
    if base is not None:
        base_sys = _System(base[0].eval())
    elif hasattr(tuned_model, "disable_adapter"):
        base_sys = _System(tuned_model, disable_adapter=True)
    elif base_cache is not None and "model" in base_cache:
        base_sys = _System(base_cache["model"])
    else:
        from tunesmith import models

        log(f"forgetting: loading the base model {cfg.model.name}")
        base_model, _ = models.load(
            cfg.model.name, dtype=cfg.model.dtype, device=str(next(tuned_model.parameters()).device)
        )
        base_sys = _System(base_model.eval())
        if base_cache is not None:
            base_cache["model"] = base_model
    # the run's template, not its task system prompt: the probe asks general questions
    raw = run.raw_prompts
    renderer = Renderer(tokenizer, cfg.model.chat_template, None, raw_prompts=raw)

    text_seqs = text_sequences(tokenizer, [t["text"] for t in texts], min(_context(tuned_model), 2048))
    q_seqs = question_sequences(tokenizer, renderer, questions, raw)
    n_tokens = sum(len(s) - 1 for s in text_seqs)
    log(f"forgetting: probe {data.name}: {len(texts)} passages ({n_tokens:,} tokens), {len(questions)} questions")
    stage = time.perf_counter()
    cache = base_cache if base_cache is not None else {}
    key = (cfg.model.name, cfg.model.chat_template, raw, tuple(t.get("id", i) for i, t in enumerate(texts)))
    # the base model's measurements: kept in `cache` for this process, and on disk for later evaluations (memo.py)
    reused: list[str] = []
    ppl_base = _remembered(
        cache,
        ("ppl",) + key,
        lambda: _memo_key(base_sys, "perplexity", text_seqs),
        lambda: perplexity(base_sys, text_seqs)[0],
        reused,
    )
    ppl_tuned, _ = perplexity(tuned_sys, text_seqs)
    log(f"  perplexity base {ppl_base:.3f}, fine-tuned {ppl_tuned:.3f} ({time.perf_counter() - stage:.0f} s)")
    stage = time.perf_counter()
    kl, kl_tokens = mean_kl(base_sys, tuned_sys, q_seqs)
    log(f"  KL(base || fine-tuned) {kl:.4f} nats/token over {kl_tokens:,} tokens ({time.perf_counter() - stage:.0f} s)")
    stage = time.perf_counter()
    qkey = ("answers", cfg.model.name, cfg.model.chat_template, raw, tuple(q["id"] for q in questions))
    _remembered(
        cache,
        qkey,
        lambda: _memo_key(
            base_sys, "answers", [questions, raw, renderer.chat_template, renderer.stop_strings, len(tokenizer)]
        ),
        lambda: answer_questions(base_sys, tokenizer, renderer, questions, raw, log, "base"),
        reused,
    )
    answers = {
        "base": cache[qkey],
        "fine_tuned": answer_questions(tuned_sys, tokenizer, renderer, questions, raw, log, "fine-tuned"),
    }
    log(f"  questions answered ({time.perf_counter() - stage:.0f} s)")
    if reused:
        log(f"  base model's perplexity/answers: {memo.reused_note(reused)}")

    scores = {k: [score_answer(q, a) for q, a in zip(questions, v)] for k, v in answers.items()}
    result = _result(data, len(texts), n_tokens, questions, ppl_base, ppl_tuned, kl, kl_tokens, scores)
    result["explanation"] = explain(result, cfg.method)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if reused:
        result["base_reused"] = min(reused)
    out = Path(run.path) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "id": q["id"],
                "category": q.get("category", "other"),
                "input": q["prompt"],
                "reference": q["reference"],
                "outputs": {k: answers[k][i] for k in answers},
                "scores": {k: round(scores[k][i], 4) for k in scores},
            },
            ensure_ascii=False,
        )
        for i, q in enumerate(questions)
    ]
    atomic_write_text(out / "forgetting_examples.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(out / "forgetting.json", json.dumps(result, indent=2, ensure_ascii=False))
    log(f"forgetting: {result['verdict']} ({result['seconds']:.0f} s) -> {out / 'forgetting.json'}")
    log(f"  {result['explanation']}")
    return result


def _result(data: Probe, n_passages, n_tokens, questions, ppl_base, ppl_tuned, kl, kl_tokens, scores) -> dict:
    def mean(values):
        return sum(values) / len(values) if values else 0.0

    by_category = {}
    for cat in dict.fromkeys(q.get("category", "other") for q in questions):
        idx = [i for i, q in enumerate(questions) if q.get("category", "other") == cat]
        b, t = mean([scores["base"][i] for i in idx]), mean([scores["fine_tuned"][i] for i in idx])
        by_category[cat] = {"base": round(b, 4), "fine_tuned": round(t, 4), "n": len(idx)}
    q_base, q_tuned = mean(scores["base"]), mean(scores["fine_tuned"])
    ppl_change = ppl_tuned / ppl_base - 1
    result = {
        "version": 1,
        "probe": {"name": data.name, "text_tokens": n_tokens, "questions": len(questions), "passages": n_passages},
        "perplexity": {"base": round(ppl_base, 4), "fine_tuned": round(ppl_tuned, 4), "change": round(ppl_change, 4)},
        "kl": {"mean_per_token": round(kl, 6), "tokens": kl_tokens},
        "questions": {
            "metric": "score",
            "base": round(q_base, 4),
            "fine_tuned": round(q_tuned, 4),
            "change": round(q_tuned - q_base, 4),
            "by_category": by_category,
        },
        "verdict": verdict(ppl_change, q_tuned - q_base),
        "thresholds": THRESHOLDS_TEXT,
        "threshold_values": THRESHOLDS,
        "examples_file": "forgetting_examples.jsonl",
    }
    result["explanation"] = explain(result)
    return result


def _remembered(cache: dict, key: tuple, memo_key, compute, reused: list[str]):
    """cache[key]: from `cache`, else from memo.py's store under memo_key() (its time appended to `reused`), else
    compute() stored in both."""
    if key not in cache:
        k = memo_key()
        entry = memo.load("forgetting", k)
        if entry is not None:
            reused.append(entry["measured_at"])
            cache[key] = entry["value"]
        else:
            cache[key] = compute()
            memo.store("forgetting", k, cache[key])
    return cache[key]


def _memo_key(system: _System, what: str, content) -> str | None:
    """evaluation/memo.py's key of a base-model measurement (None: a peft model with its adapter disabled, or
    caching off)."""
    if system.disable_adapter:
        return None
    return memo.key(system.model, {"forgetting": what, "content": memo.digest(content)})


def _spread(items: list, n: int) -> list:
    """n items spread evenly over the list (every category of a file grouped by category is kept)."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]
