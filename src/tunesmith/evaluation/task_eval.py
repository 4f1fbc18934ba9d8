"""`tunesmith eval`: task metrics of the fine-tuned model against the base model prompted zero- and few-shot.

The question it answers is "fine-tune or just prompt?", so every system is measured the same way on the same
test examples, with its cost (prompt tokens and seconds per example). The files it writes are the contract in
docs/eval-format.md (eval/task.json, eval/task_examples.jsonl).

Systems:
- base_zero_shot: the base model, the same system prompt, the test prompt as the user turn;
- base_few_shot: the same, with k training examples as prior user/assistant turns after the system prompt;
- fine_tuned: the run's model, prompted exactly as in training.

Cost: a system's prompts usually share a prefix (system prompt + shots). Its keys/values are computed once
(the longest common token prefix of all the system's prompts, so the result is exact for any template) and
copied into every batch, so few-shot costs little more than zero-shot.

Tasks (detected from the data, `metric=` overrides): classification (label scoring and/or greedy generation),
extraction (JSON answers), text (free text) and lm (raw text: loss and perplexity only).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.example import Example, Message
from tunesmith.errors import ConfigError, DataError

VERSION = 1
TASKS = ("classification", "extraction", "text", "lm")
PRIMARY = {"classification": "accuracy", "extraction": "field_f1", "text": "chrf", "lm": "perplexity"}
SYSTEM_ORDER = ("base_zero_shot", "base_few_shot", "fine_tuned")
FLIP_THRESHOLD = 0.5  # a per-example score in 0..1 "passes" at or above this (0/1 scores: right or wrong)
MAX_LABELS = 50
LABEL_COVERAGE = 0.8  # share of test answers that must be training labels for a classification eval

# name -> (task, higher_is_better, description)
METRICS: dict[str, tuple[str, bool, str]] = {
    "accuracy": ("classification", True, "share of examples whose label is right (label scoring)"),
    "macro_f1": ("classification", True, "mean over labels of F1 (label scoring)"),
    "accuracy_generated": ("classification", True, "share of greedy generations that name the right label"),
    "macro_f1_generated": ("classification", True, "mean over labels of F1 of the generated labels"),
    "invalid_rate": ("classification", False, "share of greedy generations that name no valid label"),
    "parse_rate": ("extraction", True, "share of outputs that are a JSON object"),
    "schema_match_rate": ("extraction", True, "share of outputs with the references' keys and value types"),
    "exact_match": ("text", True, "share of outputs equal to the reference (case and spacing ignored)"),
    "field_precision": ("extraction", True, "share of output (key, value) pairs that are in the reference"),
    "field_recall": ("extraction", True, "share of reference (key, value) pairs found in the output"),
    "field_f1": ("extraction", True, "F1 of (key, value) pairs, nested keys dotted, micro-averaged"),
    "token_f1": ("text", True, "word-overlap F1 between output and reference (mean per example)"),
    "chrf": ("text", True, "chrF character n-gram F-score (sacrebleu), 0..1"),
    "rouge_l": ("text", True, "ROUGE-L: longest common word subsequence F1 (mean per example)"),
    "loss": ("text", False, "mean negative log-likelihood per reference token (nats)"),
    "format_rate": ("text", True, "share of generated answers that match eval.format (a regular expression) in full"),
    "perplexity": ("lm", False, "exp(loss): perplexity of the reference tokens"),
}
TASK_METRICS = {
    "classification": ["accuracy", "macro_f1", "accuracy_generated", "macro_f1_generated", "invalid_rate"],
    "extraction": ["field_f1", "field_precision", "field_recall", "parse_rate", "schema_match_rate", "exact_match",
                   "loss", "perplexity"],
    "text": ["chrf", "rouge_l", "token_f1", "exact_match", "format_rate", "loss", "perplexity"],
    "lm": ["perplexity", "loss"],
}

TABLE_METRICS = {  # the summary table's columns (all metrics are in task.json)
    "classification": ["accuracy", "macro_f1", "accuracy_generated", "invalid_rate"],
    "extraction": ["field_f1", "parse_rate", "schema_match_rate", "exact_match"],
    "text": ["chrf", "format_rate", "rouge_l", "token_f1", "exact_match", "perplexity"],
    "lm": ["perplexity", "loss"],
}
HEADERS = {"format_rate": "format","accuracy": "acc", "macro_f1": "macro-F1", "accuracy_generated": "acc (gen)", "invalid_rate": "invalid",
           "field_f1": "field F1", "parse_rate": "parses", "schema_match_rate": "schema", "exact_match": "exact",
           "rouge_l": "ROUGE-L", "token_f1": "token F1", "perplexity": "ppl"}


# ---- what to evaluate ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    task: str
    primary: str
    labels: list[str] | None = None
    by: tuple[str, ...] = ()  # classification: ("score",), ("generate",) or both
    format: str | None = None  # eval.format: generated answers are also checked against this regular expression


def plan_task(train: list[Example], test: list[Example], metric: str | None, by: str | None) -> Plan:
    """Task from the data: labels -> classification; every reference a JSON object -> extraction; raw text ->
    lm; else free text. `metric` (a task name or a metric name) overrides."""
    from tunesmith.data.validate import is_classification
    from tunesmith.evaluation.metrics import parse_json_object

    task = primary = None
    if metric is not None:
        if metric in TASKS:
            task = metric
        elif metric in METRICS:
            task, primary = METRICS[metric][0], metric
            if metric in ("exact_match", "loss") and _references_are_json(test):
                task = "extraction"
            if metric == "perplexity" and test and test[0].kind != "text":
                task = "text"
        else:
            raise ConfigError(
                f"--metric {metric!r} is not known; use a task ({', '.join(TASKS)}) or a metric "
                f"({', '.join(METRICS)})"
            )
    kinds = {ex.kind for ex in test}
    if "preference" in kinds:
        raise DataError("the test data holds preference pairs (prompt/chosen/rejected); evaluate on chat, "
                        "prompt/completion or text rows")
    if kinds == {"text"} or task == "lm":
        if kinds != {"text"}:
            raise DataError(f"--metric {metric}: the lm task measures raw text rows; this test data is {sorted(kinds)}")
        return Plan("lm", primary if primary in TASK_METRICS["lm"] else "perplexity")
    if "text" in kinds:
        raise DataError("the test data mixes raw text rows with prompt/answer rows; use one kind per file")

    labels = None
    if task in (None, "classification"):
        # the training labels, if the test answers are (mostly) among them; else labels of the test data itself
        labels = is_classification(train)
        refs = [(ex.answer() or "").strip() for ex in test]
        if labels and sum(r in labels for r in refs) < LABEL_COVERAGE * len(refs):
            labels = None
        labels = labels or is_classification(test)
        if task == "classification" and not labels:
            answers = sorted({(ex.answer() or "").strip() for ex in [*train, *test]} - {""})
            if len(answers) > MAX_LABELS:
                raise DataError(f"--metric {metric}: the answers take {len(answers)} different values; classification "
                                f"needs at most {MAX_LABELS} labels")
            labels = answers
        if labels:
            task = "classification"
    if task is None:
        task = "extraction" if _references_are_json(test) else "text"
    if task == "extraction" and not _references_are_json(test):
        bad = [ex.source for ex in test if parse_json_object(ex.answer() or "") is None][:3]
        raise DataError(f"--metric {metric}: extraction needs every reference answer to be a JSON object; "
                        f"these are not: {', '.join(bad)}")
    modes = {"score": ("score",), "generate": ("generate",), "both": ("score", "generate"), None: ("score", "generate")}
    if by not in modes:
        raise ConfigError(f"--by {by!r}: use score, generate or both")
    plan_by = modes[by] if task == "classification" else ()
    if primary is None or primary not in TASK_METRICS[task]:
        primary = PRIMARY[task]
    if task == "classification" and plan_by == ("generate",) and primary in ("accuracy", "macro_f1"):
        primary += "_generated"
    if task == "classification" and plan_by == ("score",) and primary in ("accuracy_generated", "macro_f1_generated", "invalid_rate"):
        raise ConfigError(f"--metric {primary} needs generation; use --by generate or --by both")
    return Plan(task, primary, labels, plan_by)


def _references_are_json(test: list[Example]) -> bool:
    from tunesmith.evaluation.metrics import parse_json_object

    return bool(test) and all(parse_json_object(ex.answer() or "") is not None for ex in test)


def pick_shots(train: list[Example], k: int, labels: list[str] | None, seed: int) -> list[Example]:
    """k training examples drawn with a fixed seed; for classification with k >= labels, stratified: every label
    first, round robin over the labels (each label's examples shuffled), then shuffled as a whole."""
    rng = random.Random(seed)
    pool = [ex for ex in train if ex.kind in ("chat", "completion") and (ex.answer() or "").strip()]
    if k <= 0 or not pool:
        return []
    k = min(k, len(pool))
    if labels and k >= len(labels):
        by_label = {label: [ex for ex in pool if ex.answer().strip() == label] for label in labels}
        for exs in by_label.values():
            rng.shuffle(exs)
        shots: list[Example] = []
        while len(shots) < k and any(by_label.values()):
            for label in labels:
                if by_label[label] and len(shots) < k:
                    shots.append(by_label[label].pop())
        rng.shuffle(shots)
        return shots
    return rng.sample(pool, k)


# ---- systems: a model and how it is prompted ------------------------------------------------------------------


@dataclass
class System:
    key: str
    name: str
    model: object
    tokenizer: object
    renderer: object
    shots: list[Example] = field(default_factory=list)
    raw_completion: bool = False  # the run was trained on raw prompt/completion rows: prompt it the same way

    @property
    def pad(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def messages(self, ex: Example) -> list[Message]:
        """The conversation the model answers: the example's turns (a completion's prompt is the user turn),
        with the shots inserted after any leading system messages."""
        turns = list(ex.prompt_messages()) if ex.kind == "chat" else [Message("user", ex.prompt or "")]
        lead = 0
        while lead < len(turns) and turns[lead].role == "system":
            lead += 1
        shots = [m for s in self.shots for m in (Message("user", _user_text(s)), Message("assistant", s.answer()))]
        return [*turns[:lead], *shots, *turns[lead:]]

    def prompt(self, ex: Example) -> list[int]:
        if self.raw_completion and ex.kind == "completion":
            return self.pair(ex, "")[0]
        return self.renderer.prompt_ids(self.messages(ex), add_generation_prompt=True)

    def pair(self, ex: Example, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, trained ids of `answer`), as training renders the example with that answer."""
        from tunesmith.evaluation.classify import split_encoded

        if self.raw_completion and ex.kind == "completion":
            return split_encoded(self.renderer, Example(kind="completion", prompt=ex.prompt, completion=answer))
        msgs = self.messages(ex)
        full = Example(kind="chat", messages=[*msgs, Message("assistant", answer)], source=ex.source)
        return split_encoded(self.renderer, full, self.renderer.prompt_ids(msgs, add_generation_prompt=True))


def _user_text(ex: Example) -> str:
    if ex.kind == "completion":
        return ex.prompt or ""
    users = [m.content for m in ex.prompt_messages() if m.role == "user"]
    return users[-1] if users else ""


def input_text(ex: Example) -> str:
    if ex.kind == "text":
        return ex.text or ""
    return _user_text(ex)


# ---- measuring one system -----------------------------------------------------------------------------------


@dataclass
class SystemResult:
    outputs: list[str] = field(default_factory=list)  # the answer recorded per example
    generated: list[str] | None = None
    predictions: list[str | None] | None = None  # classification by label scoring
    nll: list[tuple[float, int]] | None = None  # reference log-likelihood per example (negated), tokens
    prompt_tokens: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)


def measure(system: System, test: list[Example], plan: Plan, *, batch_size: int, max_new_tokens: int,
            max_length: int | None, progress) -> SystemResult:
    """Run one system over the test set: label scoring, generation and/or reference likelihood, as the task needs."""
    import torch

    from tunesmith.evaluation.generate import common_prefix_length, encode_prefix, uses_prompt_learning

    result = SystemResult()
    if plan.task == "lm":
        return _measure_lm(system, test, batch_size=batch_size, max_length=max_length, progress=progress)
    prompts = [system.prompt(ex) for ex in test]
    result.prompt_tokens = sum(map(len, prompts)) / len(prompts)
    # Batches of similar length waste less on padding: measure in order of prompt length, report in test order.
    order = sorted(range(len(test)), key=lambda i: (len(prompts[i]), i))
    test, prompts = [test[i] for i in order], [prompts[i] for i in order]
    t0 = time.perf_counter()
    prefix_len = 0 if uses_prompt_learning(system.model) else common_prefix_length(prompts)
    prefix = encode_prefix(system.model, prompts[0][:prefix_len])
    shared = {"prefix_len": prefix_len, "prefix_cache": prefix}
    setup = time.perf_counter() - t0
    with torch.no_grad():
        if "score" in plan.by:
            t0 = time.perf_counter()
            result.predictions = _score_labels(system, test, prompts, plan.labels, batch_size, shared, progress)
            result.seconds["score"] = setup + time.perf_counter() - t0
        if plan.task != "classification" or "generate" in plan.by:
            t0 = time.perf_counter()
            result.generated = _generate(system, prompts, batch_size, max_new_tokens, shared, progress)
            result.seconds["generate"] = setup + time.perf_counter() - t0
        if plan.task in ("extraction", "text"):
            t0 = time.perf_counter()
            result.nll = _reference_nll(system, test, prompts, batch_size, shared, progress)
            result.seconds["reference_loss"] = time.perf_counter() - t0
    back = [0] * len(order)
    for pos, i in enumerate(order):
        back[i] = pos
    for name in ("predictions", "generated", "nll"):
        values = getattr(result, name)
        if values is not None:
            setattr(result, name, [values[back[i]] for i in range(len(order))])
    result.outputs = result.predictions if result.predictions is not None else result.generated
    return result


def _score_labels(system, test, prompts, labels, batch_size, shared, progress) -> list[str]:
    from tunesmith.evaluation.classify import score_continuations

    predictions = []
    task = progress.start(f"{system.name}: label scoring", len(test))
    for start in range(0, len(test), batch_size):
        chunk = range(start, min(start + batch_size, len(test)))
        conts = []
        for i in chunk:
            rows = [system.pair(test[i], label) for label in labels]
            if any(p != prompts[i] for p, _ in rows):
                raise RuntimeError(f"{test[i].source}: label rendering changed the prompt tokens")
            conts.append([c for _, c in rows])
        scores = score_continuations(system.model, [prompts[i] for i in chunk], conts, pad=system.pad, **shared)
        for row in scores:
            predictions.append(labels[max(range(len(labels)), key=lambda k: row[k][0])])
        progress.advance(task, len(chunk))
    return predictions


def _generate(system, prompts, batch_size, max_new_tokens, shared, progress) -> list[str]:
    from tunesmith.evaluation.generate import greedy_batch, uses_prompt_learning

    renderer = system.renderer
    out = []
    task = progress.start(f"{system.name}: generation", len(prompts))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        if uses_prompt_learning(system.model):
            out += _generate_plain(system, chunk, max_new_tokens)
        else:
            out += greedy_batch(system.model, system.tokenizer, chunk, stop_ids=renderer.stop_token_ids,
                                stop_strings=renderer.stop_strings, max_new_tokens=max_new_tokens, **shared)
        progress.advance(task, len(chunk))
    return [o.strip() for o in out]


def _generate_plain(system, prompts, max_new_tokens) -> list[str]:
    """model.generate without a shared prefix, for models whose forward() adds virtual tokens."""
    import torch

    from tunesmith.evaluation.generate import _cut, left_pad

    ids, mask, _ = left_pad(prompts, system.pad, 0)
    device = next(system.model.parameters()).device
    kwargs = {"stop_strings": list(system.renderer.stop_strings), "tokenizer": system.tokenizer} \
        if system.renderer.stop_strings else {}
    out = system.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=system.renderer.stop_token_ids,
                                pad_token_id=system.pad, **kwargs)
    return [_cut(system.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True),
                 list(system.renderer.stop_strings)) for row in out.cpu()]


def _reference_nll(system, test, prompts, batch_size, shared, progress) -> list[tuple[float, int]]:
    from tunesmith.evaluation.classify import score_continuations

    out = []
    task = progress.start(f"{system.name}: reference likelihood", len(test))
    for start in range(0, len(test), batch_size):
        chunk = range(start, min(start + batch_size, len(test)))
        conts = [[system.pair(test[i], test[i].answer() or "")[1]] for i in chunk]
        scores = score_continuations(system.model, [prompts[i] for i in chunk], conts, pad=system.pad, **shared)
        out += [(-row[0][0], row[0][1]) for row in scores]
        progress.advance(task, len(chunk))
    return out


def _measure_lm(system, test, *, batch_size, max_length, progress) -> SystemResult:
    """Loss of every text token after the first (which has no context without a BOS), as training scores it."""
    from tunesmith.evaluation.classify import score_continuations

    encoded = [system.renderer.encode(ex, max_length=max_length).input_ids for ex in test]
    encoded = [ids if len(ids) >= 2 else ids + ids for ids in encoded]
    result = SystemResult(outputs=["" for _ in test], nll=[])
    result.prompt_tokens = sum(map(len, encoded)) / len(encoded)
    t0 = time.perf_counter()
    task = progress.start(f"{system.name}: text likelihood", len(test))
    longest = max(map(len, encoded))
    rows = max(1, min(batch_size, 4096 // longest))  # bounds the (rows, tokens, vocabulary) logits tensor
    for start in range(0, len(encoded), rows):
        chunk = encoded[start : start + rows]
        scores = score_continuations(system.model, [ids[:1] for ids in chunk], [[ids[1:]] for ids in chunk],
                                     pad=system.pad)
        result.nll += [(-row[0][0], row[0][1]) for row in scores]
        progress.advance(task, len(chunk))
    result.seconds["likelihood"] = time.perf_counter() - t0
    return result


# ---- metrics per system ---------------------------------------------------------------------------------------


def system_metrics(plan: Plan, test: list[Example], res: SystemResult) -> tuple[dict, list[float], dict]:
    """(metrics, per-example primary score, extra fields: per_label and confusion for classification)."""
    from tunesmith.evaluation import metrics as M

    refs = [(ex.answer() or "").strip() for ex in test]
    out: dict[str, float] = {}
    extra: dict = {}
    per: dict[str, list[float]] = {}
    if plan.task == "classification":
        from tunesmith.evaluation.classify import parse_label

        report = None
        if res.predictions is not None:
            report = M.classification_report(refs, res.predictions, plan.labels)
            out.update(accuracy=report["accuracy"], macro_f1=report["macro_f1"])
            per["accuracy"] = per["macro_f1"] = [float(p == r) for p, r in zip(res.predictions, refs)]
        if res.generated is not None:
            parsed = [parse_label(g, plan.labels) for g in res.generated]
            gen = M.classification_report(refs, parsed, plan.labels)
            out.update(accuracy_generated=gen["accuracy"], macro_f1_generated=gen["macro_f1"],
                       invalid_rate=sum(p is None for p in parsed) / len(parsed))
            per["accuracy_generated"] = per["macro_f1_generated"] = [float(p == r) for p, r in zip(parsed, refs)]
            per["invalid_rate"] = [float(p is None) for p in parsed]
            report = report or gen
        extra = {"per_label": report["per_label"], "confusion": report["confusion"]}
    elif plan.task == "extraction":
        references = [M.parse_json_object(r) for r in refs]
        out, per_f1 = M.extraction_report(res.generated, references)
        per = {k: per_f1 for k in out}
        per["exact_match"] = [float(M.parse_json_object(g) is not None and M.field_pairs(M.parse_json_object(g)) ==
                                    M.field_pairs(r)) for g, r in zip(res.generated, references)]
    elif plan.task == "text":
        out, per = M.text_report(res.generated, refs)
    if plan.format is not None and res.generated is not None:
        per["format_rate"] = M.format_matches(res.generated, plan.format)
        out["format_rate"] = sum(per["format_rate"]) / max(len(per["format_rate"]), 1)
    if res.nll is not None:
        total, count = sum(n for n, _ in res.nll), sum(c for _, c in res.nll)
        out["loss"] = total / count if count else math.nan
        out["perplexity"] = M.perplexity(total, count)
        per["loss"] = [n / c if c else 0.0 for n, c in res.nll]
        per["perplexity"] = [math.exp(n / c) if c else math.inf for n, c in res.nll]
    return out, per.get(plan.primary, []), extra


def flipped(test, records, primary: str) -> dict:
    """Examples whose outcome changed between base zero-shot and fine-tuned: 0/1 scores flip between right and
    wrong, scores in 0..1 cross FLIP_THRESHOLD. Lower-is-better metrics (loss, perplexity) have no pass mark:
    nothing is listed for them."""
    out = {"improved": [], "regressed": []}
    if not METRICS[primary][1]:
        return out
    for rec in records:
        scores = rec["scores"]
        if "base_zero_shot" not in scores or "fine_tuned" not in scores:
            continue
        before, after = scores["base_zero_shot"] >= FLIP_THRESHOLD, scores["fine_tuned"] >= FLIP_THRESHOLD
        if before != after:
            item = {"id": rec["id"], "input": rec["input"], "reference": rec["reference"],
                    "base": rec["outputs"].get("base_zero_shot", ""), "tuned": rec["outputs"].get("fine_tuned", "")}
            out["improved" if after else "regressed"].append(item)
    return out


# ---- the whole evaluation ---------------------------------------------------------------------------------------


def example_ids(path: str, examples: list[Example]) -> list[str]:
    """Each example's `id` field where its JSONL row has one, else `line-N` (its line in the file) or `row-N`."""
    ids = []
    lines = None
    if str(path).endswith(".jsonl"):
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    for n, ex in enumerate(examples, 1):
        line = ex.source.rsplit(":", 1)[-1] if ":" in ex.source else ""
        row_id = None
        if lines is not None and line.isdigit() and int(line) <= len(lines):
            try:
                row = json.loads(lines[int(line) - 1])
                row_id = row.get("id") if isinstance(row, dict) else None
            except json.JSONDecodeError:
                pass
        ids.append(str(row_id) if row_id is not None else f"line-{line}" if line.isdigit() else f"row-{n}")
    return ids


def max_new_tokens_for(plan: Plan, tokenizer, test: list[Example], cap: int = 512) -> int:
    """Room for the longest reference and a margin: 1.5x its tokens + 16 (labels: + 8), at most `cap`."""
    if plan.task == "classification":
        return max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in plan.labels) + 8
    longest = max(len(tokenizer(ex.answer() or "", add_special_tokens=False)["input_ids"]) for ex in test)
    return min(cap, math.ceil(1.5 * longest) + 16)


def run_task_eval(run_dir: Path, cfg, test: list[Example], train: list[Example], data_path: str, plan: Plan,
                  systems: list[System], *, batch_size: int, max_new_tokens: int | None, log=print,
                  quiet: bool = False) -> dict:
    """Measure every system, write eval/task.json and eval/task_examples.jsonl, return task.json's content."""
    from tunesmith.atomic import atomic_write_text

    ids = example_ids(data_path, test)
    max_new = max_new_tokens or max_new_tokens_for(plan, systems[-1].tokenizer, test)
    max_length = cfg.data.max_length if isinstance(cfg.data.max_length, int) else None
    entries, per_example = [], {}
    with Progress(quiet) as progress:
        for system in systems:
            res = measure(system, test, plan, batch_size=batch_size, max_new_tokens=max_new, max_length=max_length,
                          progress=progress)
            metrics, scores, extra = system_metrics(plan, test, res)
            seconds = sum(res.seconds.values())
            entry = {"key": system.key, "name": system.name, "shots": len(system.shots), "metrics": metrics, **extra,
                     "prompt_tokens_per_example": res.prompt_tokens, "seconds_per_example": seconds / len(test),
                     "seconds": seconds, "seconds_by_mode": res.seconds}
            entries.append(entry)
            per_example[system.key] = (res, scores)
            log(f"  {system.name}: {plan.primary} {_fmt(plan.primary, metrics.get(plan.primary))}  "
                f"({res.prompt_tokens:.0f} prompt tokens, {seconds / len(test):.3f} s per example)")

    records = []
    for i, ex in enumerate(test):
        rec = {"id": ids[i], "input": input_text(ex), "reference": (ex.answer() or "") if ex.kind != "text" else "",
               "outputs": {k: r.outputs[i] for k, (r, _) in per_example.items()},
               "scores": {k: s[i] for k, (_, s) in per_example.items()}}
        generated = {k: r.generated[i] for k, (r, _) in per_example.items()
                     if r.generated is not None and r.predictions is not None}
        if generated:
            rec["generated"] = generated
        records.append(rec)
    data_file = Path(data_path)
    result = {
        "version": VERSION,
        "task": plan.task,
        "data": {"path": str(data_path), "sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(),
                 "examples": len(test)},
        **({"labels": plan.labels} if plan.task == "classification" else {}),
        "primary": plan.primary,
        "metrics_info": {name: {"higher_is_better": METRICS[name][1], "description": METRICS[name][2]}
                         for name in dict.fromkeys(k for e in entries for k in e["metrics"])},
        "systems": sorted(entries, key=lambda e: SYSTEM_ORDER.index(e["key"])),
        "examples_file": "task_examples.jsonl",
        "flipped": flipped(test, records, plan.primary),
        "flip_rule": (f"per-example {plan.primary} >= {FLIP_THRESHOLD} counts as a pass; listed: passes gained or "
                      "lost from base zero-shot to fine-tuned") if METRICS[plan.primary][1] else
                     f"{plan.primary} has no pass mark; no examples listed",
        "max_new_tokens": max_new,
        "by": list(plan.by),
    }
    out = Path(run_dir) / "eval"
    atomic_write_text(out / "task_examples.jsonl",
                      "".join(json.dumps(_finite(r), ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(out / "task.json", json.dumps(_finite(result), indent=2, ensure_ascii=False))
    return result


def _finite(obj):
    """JSON has no inf/nan: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _fmt(name: str, value) -> str:
    if value is None:
        return "-"
    if name in ("loss", "perplexity"):
        return f"{value:.3f}"
    return f"{value:.1%}"


# ---- progress and the summary table -----------------------------------------------------------------------------


class Progress:
    """A rich progress bar per measured pass, with rate and ETA (nothing when quiet)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._bar = None

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, description: str, total: int):
        if self._bar is None:
            return None
        return self._bar.add_task(description, total=total, rate="")

    def advance(self, task, n: int) -> None:
        if self._bar is None or task is None:
            return
        self._bar.advance(task, n)
        speed = self._bar.tasks[task].speed if task < len(self._bar.tasks) else None
        self._bar.update(task, rate=f"{speed:.2f} ex/s" if speed else "")


def summary_table(result: dict):
    """A rich Table: each system's headline metrics, deltas vs base zero-shot, prompt tokens and latency."""
    from rich.table import Table

    shown = [m for m in TABLE_METRICS[result["task"]] if any(m in s["metrics"] for s in result["systems"])]
    base = next((s for s in result["systems"] if s["key"] == "base_zero_shot"), None)
    table = Table(title=f"{result['task']} eval, {result['data']['examples']} examples",
                  caption=f"primary: {result['primary']}; (+x): change vs base zero-shot, in points for rates")
    table.add_column("system", no_wrap=True)
    for m in shown:
        table.add_column(HEADERS.get(m, m), justify="right")
    table.add_column("prompt tok", justify="right")
    table.add_column("s/ex", justify="right")
    for s in result["systems"]:
        cells = []
        for m in shown:
            value = s["metrics"].get(m)
            cell = _fmt(m, value)
            if base is not None and s is not base and value is not None and base["metrics"].get(m) is not None:
                delta = value - base["metrics"][m]
                cell += f" ({delta:+.2f})" if m in ("loss", "perplexity") else f" ({delta * 100:+.1f})"
            cells.append(cell)
        table.add_row(s["name"], *cells, f"{s['prompt_tokens_per_example']:.0f}", f"{s['seconds_per_example']:.2f}")
    return table
