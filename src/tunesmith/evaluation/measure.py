"""Measuring one system over the test examples: label scoring, greedy generation and reference likelihood.

Cost: a system's prompts usually share a prefix (system prompt + shots). Its keys/values are computed once
(the longest common token prefix of all the system's prompts, so the result is exact for any template) and
copied into every batch, so few-shot costs little more than zero-shot.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from tunesmith.data.example import Example
from tunesmith.evaluation import memo
from tunesmith.evaluation.systems import System
from tunesmith.evaluation.tasks import TaskPlan

# Contextual calibration's content-free inputs (Zhao et al. 2021, "Calibrate Before Use", section 5). A prompt with
# fixed shots needs them scored once; retrieved shots make every example's prompt different, so each example would
# need its own: there only "N/A" is scored, which keeps calibration at twice the label-scoring cost, not four times.
CONTENT_FREE = ("N/A", "", "[MASK]")
CONTENT_FREE_PER_EXAMPLE = ("N/A",)
MAX_ROWS_LM = 8  # raw text: rows per forward when eval.batch_size is auto (all their logits are kept)


@dataclass
class SystemResult:
    outputs: list[str] = field(default_factory=list)  # the answer recorded per example
    generated: list[str] | None = None
    predictions: list[str | None] | None = None  # classification by label scoring
    label_scores: list[list[tuple[float, int]]] | None = None  # per example, per label: (log-probability, tokens)
    content_free: list[list[list[float]]] | None = None  # per example: label log-probabilities per content-free input
    nll: list[tuple[float, int]] | None = None  # reference log-likelihood per example (negated), tokens
    prompt_tokens: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    reused: str | None = None  # when an identical earlier measurement was reused (evaluation/memo.py): its time

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "reused"}

    @classmethod
    def from_json(cls, value: dict, reused: str) -> "SystemResult":
        out = cls(**value, reused=reused)
        if out.label_scores is not None:
            out.label_scores = [[tuple(s) for s in row] for row in out.label_scores]
        if out.nll is not None:
            out.nll = [tuple(x) for x in out.nll]
        if out.predictions is not None:
            out.outputs = out.predictions  # the same list, as measure() returns it (decided() relies on it)
        return out

    def decided(self, labels: list[str], calibrated: bool = False, length_norm: bool = False) -> "SystemResult":
        """A copy whose label-scoring predictions follow another decision rule: contextual calibration (each
        label's probability divided by its probability for content-free inputs) and/or length normalisation
        (mean log-probability per token instead of the sum)."""
        from dataclasses import replace

        from tunesmith.evaluation.calibration import content_free_prior, predict

        if self.label_scores is None or (calibrated and self.content_free is None):
            raise ValueError("this result has no label scores (or no content-free scores) to decide on")
        predictions = []
        for i, row in enumerate(self.label_scores):
            logprobs = [lp for lp, _ in row]
            counts = [n for _, n in row] if length_norm else None
            prior = content_free_prior(self.content_free[i], counts) if calibrated else None
            predictions.append(labels[predict(logprobs, prior=prior, token_counts=counts)])
        outputs = predictions if self.outputs is self.predictions or self.generated is None else self.outputs
        return replace(self, predictions=predictions, outputs=outputs)


def measure(
    system: System,
    test: list[Example],
    plan: TaskPlan,
    *,
    batch_size: int | None,
    max_new_tokens: int,
    max_length: int | None,
    progress,
    calibrate: bool = False,
    reference_loss: bool = True,
) -> SystemResult:
    """Run one system over the test set: label scoring, generation and/or reference likelihood, as the task needs.
    calibrate: also score the labels after content-free inputs (classification label scoring), so that
    `SystemResult.decided(calibrated=True)` can apply contextual calibration. reference_loss: also the likelihood
    of the reference answers (extraction and text). batch_size None: batches sized by a token budget.

    When a classification system is both scored and generated, one forward per batch does both: label scoring
    keeps the prompts' keys/values and greedy decoding continues from them (classify.score_rows keep_state), so
    long few-shot prompts are encoded once, not twice. With retrieved shots, the content-free input that
    calibration needs is a branch of the same row (it shares the shots). Time is reported per mode: `score` is
    the forward (the prompts' encoding included), `generate` the decoding after it, and `calibration` the
    content-free inputs' share of the forward by tokens fed."""
    import torch

    from tunesmith.evaluation.generate import (
        common_prefix_length,
        encode_prefix,
        tokens_per_forward,
        uses_prompt_learning,
    )

    result = SystemResult()
    budget = tokens_per_forward(system.model)
    settings = {
        "plan": asdict(plan),
        "batch_size": batch_size,
        "budget": budget,
        "max_new_tokens": max_new_tokens,
        "max_length": max_length,
        "calibrate": calibrate,
        "reference_loss": reference_loss,
    }
    prompts = None
    if plan.task != "lm":
        system.prepare(test)
        prompts = [system.prompt(ex) for ex in test]
    k = _memo_key(system, test, prompts, settings)
    hit = _reused(k)
    if hit is not None:
        return hit
    if plan.task == "lm":
        lm = _measure_lm(system, test, batch_size=batch_size, budget=budget, max_length=max_length, progress=progress)
        return _stored(k, lm)
    result.prompt_tokens = sum(map(len, prompts)) / len(prompts)
    # Batches of similar length waste less on padding: measure in order of prompt length, report in test order.
    order = sorted(range(len(test)), key=lambda i: (len(prompts[i]), i))
    test, prompts = [test[i] for i in order], [prompts[i] for i in order]
    t0 = time.perf_counter()
    plain = uses_prompt_learning(system.model)
    prefix_len = 0 if plain else common_prefix_length(prompts)
    prefix = encode_prefix(system.model, prompts[0][:prefix_len])
    shared = {"prefix_len": prefix_len, "prefix_cache": prefix}
    setup = time.perf_counter() - t0
    sizing = {"batch_size": batch_size, "budget": budget}
    generate = plan.task != "classification" or "generate" in plan.by
    with torch.no_grad():
        if "score" in plan.by:
            fused = generate and not plain
            per_example_cf = calibrate and system.retriever is not None and not plain
            scored = _score_labels(
                system,
                test,
                prompts,
                plan.labels,
                sizing,
                shared,
                progress,
                generate=max_new_tokens if fused else None,
                content_free=per_example_cf,
            )
            result.label_scores = scored["scores"]
            result.predictions = [
                plan.labels[max(range(len(row)), key=lambda k: row[k][0])] for row in result.label_scores
            ]
            result.seconds["score"] = setup + scored["seconds"]["score"]
            if fused:
                result.generated = scored["generated"]
                result.seconds["generate"] = scored["seconds"]["generate"]
                generate = False
            if per_example_cf:
                result.content_free = scored["content_free"]
                result.seconds["calibration"] = scored["seconds"]["calibration"]
            elif calibrate:
                t0 = time.perf_counter()
                result.content_free = _score_content_free(
                    system, test, plan.labels, sizing, shared, prompts[0][:prefix_len], progress
                )
                result.seconds["calibration"] = time.perf_counter() - t0
        if generate:
            t0 = time.perf_counter()
            result.generated = _generate(system, prompts, sizing, max_new_tokens, shared, progress)
            result.seconds["generate"] = setup + time.perf_counter() - t0
        if plan.task in ("extraction", "text") and reference_loss:
            t0 = time.perf_counter()
            result.nll = _reference_nll(system, test, prompts, sizing, shared, progress)
            result.seconds["reference_loss"] = time.perf_counter() - t0
    back = [0] * len(order)
    for pos, i in enumerate(order):
        back[i] = pos
    for name in ("predictions", "label_scores", "content_free", "generated", "nll"):
        values = getattr(result, name)
        if values is not None:
            setattr(result, name, [values[back[i]] for i in range(len(order))])
    result.outputs = result.predictions if result.predictions is not None else result.generated
    return _stored(k, result)


def _memo_key(system: System, test: list[Example], prompts: list[list[int]] | None, settings: dict) -> str | None:
    """The key of this measurement in evaluation/memo.py's store: the model's weights, the prompts' token ids, the
    examples' content, the renderer, the tokenizer and the settings (None: not cached)."""
    r = system.renderer
    examples = [{k: v for k, v in asdict(ex).items() if k != "source"} for ex in test]
    return memo.key(
        system.model,
        {
            "measure": settings,
            "prompts": memo.digest(prompts),
            "examples": memo.digest(examples),
            "retrieved": system.retriever is not None,
            "renderer": [r.chat_template, r.system_prompt, r.raw_prompts, r.stop_strings, r.stop_token_ids],
            "tokenizer": [type(system.tokenizer).__name__, len(system.tokenizer), system.pad],
        },
    )


def _reused(k: str | None) -> SystemResult | None:
    entry = memo.load("measure", k)
    if entry is None:
        return None
    try:
        return SystemResult.from_json(entry["value"], entry["measured_at"])
    except (TypeError, KeyError):  # an entry of another shape: measure again
        return None


def _stored(k: str | None, result: SystemResult) -> SystemResult:
    memo.store("measure", k, result.to_json())
    return result


def _batches(widths: list[int], sizing: dict, prefix_len: int = 0) -> list[range]:
    from tunesmith.evaluation.generate import plan_batches

    return plan_batches([w - prefix_len for w in widths], sizing["batch_size"], sizing["budget"])


def _score_labels(
    system, test, prompts, labels, sizing, shared, progress, *, generate: int | None = None, content_free=False
) -> dict:
    """Label scores per example; with generate (max new tokens), also the greedy answers decoded from the same
    forward; with content_free, the labels' scores after the "N/A" input in each example's own shots (a branch of
    the example's row). Returns {"scores", "generated", "content_free", "seconds": {mode: seconds}}."""
    from tunesmith.evaluation.classify import score_rows
    from tunesmith.evaluation.generate import common_prefix_length, decode_greedy

    rows = []
    for i, ex in enumerate(test):
        pairs = [system.pair(ex, label) for label in labels]
        if any(p != prompts[i] for p, _ in pairs):
            raise RuntimeError(f"{ex.source}: label rendering changed the prompt tokens")
        side = []
        if content_free:
            for text in CONTENT_FREE_PER_EXAMPLE:
                free = [system.pair(system.content_free(ex, text), label, system.shots_for(ex)) for label in labels]
                side.append((free[0][0], [c for _, c in free]))
        rows.append(([c for _, c in pairs], side))

    def cost(conts):  # tokens fed for a list of continuations (each without its last token)
        return sum(len(c) - 1 for c in conts)

    main = [len(p) + cost(conts) for p, (conts, _) in zip(prompts, rows)]
    # a side prompt feeds only what follows its common beginning with the example's prompt
    extra = [
        sum(len(sp) - common_prefix_length([sp, p]) + cost(sc) for sp, sc in side)
        for p, (_, side) in zip(prompts, rows)
    ]
    fed = [m + e for m, e in zip(main, extra)]
    widths = [w + (generate or 0) for w in fed]
    # side prompts replace the input, which may reach into the test prompts' common prefix: then no prefix cache
    sides = [sp for _, s in rows for sp, _ in s]
    kwargs = _usable(shared, prompts[0][: shared["prefix_len"]], sides) if content_free else shared
    what = "label scoring" + (" and generation" if generate else "") + (" (+ calibration)" if content_free else "")
    task = progress.start(f"{system.name}: {what}", len(test))
    out = {"scores": [], "generated": [] if generate else None, "content_free": [] if content_free else None}
    seconds = {"score": 0.0, "generate": 0.0, "calibration": 0.0}
    for batch in _batches(widths, sizing, shared["prefix_len"]):
        t0 = time.perf_counter()
        got = score_rows(
            system.model,
            [prompts[i] for i in batch],
            [rows[i][0] for i in batch],
            pad=system.pad,
            side=[rows[i][1] for i in batch] if content_free else None,
            keep_state=generate is not None,
            **kwargs,
        )
        forward = time.perf_counter() - t0
        out["scores"] += got.scores
        if content_free:
            out["content_free"] += [[[lp for lp, _ in branch] for branch in row] for row in got.side]
            share = sum(extra[i] for i in batch) / max(1, sum(fed[i] for i in batch))
            seconds["calibration"] += forward * share
            forward *= 1 - share
        seconds["score"] += forward
        if generate:
            t0 = time.perf_counter()
            out["generated"] += [
                g.strip()
                for g in decode_greedy(
                    system.model,
                    system.tokenizer,
                    got.state,
                    stop_ids=system.renderer.stop_token_ids,
                    stop_strings=system.renderer.stop_strings,
                    max_new_tokens=generate,
                )
            ]
            seconds["generate"] += time.perf_counter() - t0
        progress.update(task, advance=len(batch))
    out["seconds"] = seconds
    return out


def _score_content_free(system, test, labels, sizing, shared, prefix_ids, progress) -> list[list[list[float]]]:
    """Per example, the label log-probabilities after each content-free input in the example's own prompt (its
    system prompt and shots). Identical content-free prompts (fixed shots: all of them) are scored once."""
    from tunesmith.evaluation.classify import score_continuations

    texts = CONTENT_FREE_PER_EXAMPLE if system.retriever is not None else CONTENT_FREE
    rows, index = [], {}  # distinct (prompt, continuations) rows, and each example's row numbers
    per_example = []
    for ex in test:
        mine = []
        for text in texts:
            free = system.content_free(ex, text)
            pairs = [system.pair(free, label, system.shots_for(ex)) for label in labels]
            key = (tuple(pairs[0][0]), tuple(tuple(c) for _, c in pairs))
            if key not in index:
                index[key] = len(rows)
                rows.append((pairs[0][0], [c for _, c in pairs]))
            mine.append(index[key])
        per_example.append(mine)
    task = progress.start(f"{system.name}: content-free inputs (calibration)", len(rows))
    scores = []
    widths = [len(p) + sum(len(c) - 1 for c in conts) for p, conts in rows]
    for batch in _batches(widths, sizing):
        chunk = [rows[i] for i in batch]
        got = score_continuations(
            system.model,
            [p for p, _ in chunk],
            [c for _, c in chunk],
            pad=system.pad,
            **_usable(shared, prefix_ids, [p for p, _ in chunk]),
        )
        scores += [[lp for lp, _ in row] for row in got]
        progress.update(task, advance=len(chunk))
    return [[scores[r] for r in mine] for mine in per_example]


def _usable(shared: dict, prefix_ids: list[int], prompts: list[list[int]]) -> dict:
    """The test prompts' shared prefix cache, where these prompts start with exactly those tokens too (a content-free
    prompt replaces the input, which may have been part of the test prompts' common prefix)."""
    n = len(prefix_ids)
    if n and all(len(p) > n and p[:n] == prefix_ids for p in prompts):
        return shared
    return {}


def _generate(system, prompts, sizing, max_new_tokens, shared, progress) -> list[str]:
    from tunesmith.evaluation.generate import greedy_batch

    renderer = system.renderer
    out = []
    task = progress.start(f"{system.name}: generation", len(prompts))
    for batch in _batches([len(p) + max_new_tokens for p in prompts], sizing, shared["prefix_len"]):
        chunk = [prompts[i] for i in batch]
        out += greedy_batch(
            system.model,
            system.tokenizer,
            chunk,
            stop_ids=renderer.stop_token_ids,
            stop_strings=renderer.stop_strings,
            max_new_tokens=max_new_tokens,
            **shared,
        )
        progress.update(task, advance=len(chunk))
    return [o.strip() for o in out]


def _reference_nll(system, test, prompts, sizing, shared, progress) -> list[tuple[float, int]]:
    from tunesmith.evaluation.classify import score_continuations

    out = []
    task = progress.start(f"{system.name}: reference likelihood", len(test))
    conts = [system.pair(ex, ex.answer() or "")[1] for ex in test]
    for batch in _batches([len(p) + len(c) for p, c in zip(prompts, conts)], sizing, shared["prefix_len"]):
        scores = score_continuations(
            system.model, [prompts[i] for i in batch], [[conts[i]] for i in batch], pad=system.pad, **shared
        )
        out += [(-row[0][0], row[0][1]) for row in scores]
        progress.update(task, advance=len(batch))
    return out


def _measure_lm(system, test, *, batch_size, budget, max_length, progress) -> SystemResult:
    """Loss of every text token after the first (which has no context without a BOS), as training scores it."""
    from tunesmith.evaluation.classify import score_continuations

    encoded = [system.renderer.encode(ex, max_length=max_length).input_ids for ex in test]
    encoded = [ids if len(ids) >= 2 else ids + ids for ids in encoded]
    result = SystemResult(outputs=["" for _ in test], nll=[])
    result.prompt_tokens = sum(map(len, encoded)) / len(encoded)
    t0 = time.perf_counter()
    task = progress.start(f"{system.name}: text likelihood", len(test))
    longest = max(map(len, encoded))
    # every position's logits are kept: bound the (rows, tokens, vocabulary) tensor, whatever the batch size
    rows = max(1, min(batch_size or MAX_ROWS_LM, 4096 // longest))
    for start in range(0, len(encoded), rows):
        chunk = encoded[start : start + rows]
        scores = score_continuations(
            system.model, [ids[:1] for ids in chunk], [[ids[1:]] for ids in chunk], pad=system.pad
        )
        result.nll += [(-row[0][0], row[0][1]) for row in scores]
        progress.update(task, advance=len(chunk))
    result.seconds["likelihood"] = time.perf_counter() - t0
    return result
