"""The strongest cheap prompt of the base model, chosen on the validation split.

"Fine-tuned beats prompting" is only worth what the prompting was. On a real 8-label task, a 4-shot prompt that
showed half the labels scored 13.8% (chance 12.5%) while the 8 most similar training examples as shots scored
58.8%: the margin fine-tuning was credited with shrank from ~46 points to ~14. So `tunesmith eval` tries the
variants a practitioner would try and compares the fine-tuned model with the best of them:

- zero-shot: the dataset's system prompt and the input;
- instructed: the same plus an instruction naming the answer format (classification: the labels; extraction:
  the JSON keys) — for a base model that otherwise answers in prose;
- few-shot: k random training examples as prior turns, every label covered (evaluation/shots.py);
- knn: per example, the k most similar training examples (TF-IDF, evaluation/shots.py), most similar last;
- for label scoring, each of those with contextual calibration (Zhao et al. 2021) and/or length normalisation
  (mean log-probability per label token): rules that reuse the same forward passes, so they cost little.

The variants are measured on validation examples (never the test split), the best by the primary metric is
chosen (ties: the earlier, i.e. cheaper, variant), and only that one is measured on the test split, beside the
plain zero- and few-shot systems. Whether calibration or length normalisation helps is thus decided per dataset
by measurement, and the selection table (every variant's validation score, prompt tokens, seconds per example)
is kept in eval/task.json.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from tunesmith.data.example import Example
from tunesmith.evaluation import memo
from tunesmith.evaluation.aggregate import system_metrics
from tunesmith.evaluation.measure import SystemResult, measure
from tunesmith.evaluation.shots import ShotRetriever, missing_labels, pick_shots
from tunesmith.evaluation.systems import System
from tunesmith.evaluation.tasks import METRICS, TaskPlan, max_new_tokens_for

AUTO_KNN_SHOTS = 8  # retrieved shots: what lifted the 8-label task above (4 did as well on a one-line summary task)
SELECT_LIMIT = {"classification": 100, "extraction": 40, "text": 40}  # validation examples the variants are tried on
MAX_INSTRUCTION_KEYS = 20


@dataclass(frozen=True)
class PromptVariant:
    """One way to prompt the base model: the prompt (shots, instruction) and the label-scoring decision rule."""

    shots: str = "none"  # none | random | knn
    k: int = 0
    instructed: bool = False
    calibrated: bool = False
    length_norm: bool = False

    @property
    def prompt(self) -> tuple[str, int, bool]:
        """What must be measured: variants that differ only in the decision rule share one measurement."""
        return self.shots, self.k, self.instructed

    @property
    def key(self) -> str:
        parts = ["zero_shot" if self.shots == "none" else f"{self.shots}_{self.k}"]
        parts += [
            name
            for name, on in (
                ("instructed", self.instructed),
                ("calibrated", self.calibrated),
                ("length_norm", self.length_norm),
            )
            if on
        ]
        return "+".join(parts)

    @property
    def name(self) -> str:
        text = {"none": "zero-shot", "random": f"{self.k}-shot", "knn": f"{self.k} retrieved shots"}[self.shots]
        extras = [
            name
            for name, on in (
                ("format instruction", self.instructed),
                ("calibrated", self.calibrated),
                ("length-normalised", self.length_norm),
            )
            if on
        ]
        return text + (f" ({', '.join(extras)})" if extras else "")

    def describe(self) -> dict:
        return {"key": self.key, "name": self.name, **asdict(self)}


def instruction_for(plan: TaskPlan, train: list[Example]) -> str | None:
    """The answer-format instruction a prompter would add to the system prompt; None where there is none to give."""
    if plan.task == "classification":
        return f"Answer with exactly one of these labels and nothing else: {', '.join(plan.labels)}."
    if plan.task == "extraction":
        from tunesmith.evaluation.metrics import parse_json_object

        keys = Counter(k for ex in train for k in (parse_json_object(ex.answer() or "") or {}))
        if not keys:
            return None
        names = [k for k, _ in keys.most_common(MAX_INSTRUCTION_KEYS)]
        return f"Answer with only a JSON object with the keys {', '.join(names)}; no other text."
    return None


def variants(plan: TaskPlan, few_k: int, knn_k: int, instruction: str | None) -> list[PromptVariant]:
    """Every variant to try, cheapest first (ties go to the earlier one)."""
    prompts = [PromptVariant()]
    if instruction:
        prompts.append(PromptVariant(instructed=True))
    if few_k:
        prompts.append(PromptVariant("random", few_k))
    if knn_k:
        prompts.append(PromptVariant("knn", knn_k))
    if plan.task != "classification" or "score" not in plan.by:
        return prompts
    return [
        PromptVariant(p.shots, p.k, p.instructed, calibrated, norm)
        for p in prompts
        for norm in (False, True)
        for calibrated in (False, True)
    ]


def build_system(
    variant: PromptVariant,
    key: str,
    model,
    tokenizer,
    renderer,
    pool: list[Example],
    plan: TaskPlan,
    seed: int,
    instruction: str | None,
    allow_missing_labels: bool = False,
) -> System:
    """The base-model System that prompts as `variant` says; shots come from `pool` (training examples only)."""
    shots, retriever = [], None
    if variant.shots == "random":
        shots = pick_shots(pool, variant.k, plan.labels, seed, allow_missing_labels=allow_missing_labels)
    elif variant.shots == "knn":
        retriever = ShotRetriever(pool, variant.k)
    return System(
        key,
        f"base, {variant.name}",
        model,
        tokenizer,
        renderer,
        shots=shots,
        retriever=retriever,
        instruction=instruction if variant.instructed else None,
    )


def decided(res: SystemResult, variant: PromptVariant, plan: TaskPlan) -> SystemResult:
    """The result under the variant's decision rule (the plain rule needs nothing new)."""
    if plan.task != "classification" or res.label_scores is None or not (variant.calibrated or variant.length_norm):
        return res
    return res.decided(plan.labels, calibrated=variant.calibrated, length_norm=variant.length_norm)


def validation_sample(examples: list[Example], limit: int, seed: int) -> list[Example]:
    """At most `limit` examples, drawn with the seed and kept in file order (files are often sorted by label)."""
    if len(examples) <= limit:
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


@dataclass
class Selection:
    chosen: PromptVariant
    rows: list[dict]  # every variant: key, name, value of the primary metric, prompt tokens, seconds per example
    split: str  # where the validation examples came from
    examples: int
    metric: str

    def to_json(self) -> dict:
        return {
            "split": self.split,
            "examples": self.examples,
            "metric": self.metric,
            "chosen": self.chosen.key,
            "rule": "the variant with the best validation score; ties go to the cheaper variant listed first",
            "variants": self.rows,
        }


def select_prompt(
    validation: list[Example],
    split: str,
    plan: TaskPlan,
    tried: list[PromptVariant],
    system_for: Callable[[PromptVariant], System],
    *,
    batch_size: int | None,
    max_new_tokens: int,
    max_length: int | None,
    progress,
    log=print,
) -> Selection:
    """Measure every variant on the validation examples and pick the best by the primary metric. `system_for`
    gives the System that prompts as a variant says (one per prompt: the test split reuses it)."""
    # choose by what the test reports first: label scoring when it is on, else generation
    by = ("score",) if "score" in plan.by else plan.by
    val_plan = TaskPlan(plan.task, plan.primary, plan.labels, by, plan.format)
    higher = METRICS[plan.primary][1]
    measured: dict[tuple, SystemResult] = {}
    rows, best, best_value = [], None, None
    for variant in tried:
        if variant.prompt not in measured:
            measured[variant.prompt] = measure(
                system_for(variant),
                validation,
                val_plan,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                max_length=max_length,
                progress=progress,
                calibrate=any(v.calibrated and v.prompt == variant.prompt for v in tried),
                reference_loss=False,
            )
        res = measured[variant.prompt]
        metrics, _, _ = system_metrics(val_plan, validation, decided(res, variant, plan))
        value = metrics.get(plan.primary)
        seconds = sum(v for k, v in res.seconds.items() if k != "calibration" or variant.calibrated)
        rows.append(
            {
                **variant.describe(),
                "value": value,
                "prompt_tokens_per_example": res.prompt_tokens,
                "seconds_per_example": seconds / len(validation),
                **({"reused": res.reused} if res.reused else {}),
            }
        )
        if value is not None and (best_value is None or (value > best_value if higher else value < best_value)):
            best, best_value = variant, value
    best = best or tried[0]
    reused = [r.reused for r in measured.values() if r.reused]
    if reused:
        log(f"  {len(reused)} of {len(measured)} prompts: " + memo.reused_note(reused))
    log(
        f"  prompt chosen on {len(validation)} validation examples ({split}): {best.name}, "
        f"{plan.primary} {best_value if best_value is None else round(best_value, 4)}"
    )
    return Selection(best, rows, split, len(validation), plan.primary)


def labels_missing_from(system: System, plan: TaskPlan) -> list[str]:
    """The labels a fixed-shot prompt never shows (reported beside the system)."""
    if plan.task != "classification" or system.retriever is not None or not system.shots:
        return []
    return missing_labels(system.shots, plan.labels)


# ---- the prompted systems of one evaluation ---------------------------------------------------------------------


@dataclass(frozen=True)
class PromptOptions:
    """How the base model is prompted: `eval:` config values, overridden by the command's flags."""

    shots: int | str = "auto"  # random shots; auto: 3, and at least one per label for classification
    knn_shots: int | str = "auto"  # retrieved shots; auto: AUTO_KNN_SHOTS
    select: bool = True  # try the variants on validation and add base_best_prompt
    select_limit: int | None = None  # validation examples; None: SELECT_LIMIT by task
    allow_missing_labels: bool = False

    @classmethod
    def resolve(cls, cfg, **flags) -> "PromptOptions":
        """The config's eval section with the flags that were given (None: not given); ConfigError for bad values."""
        from tunesmith.errors import ConfigError

        given = {k: v for k, v in flags.items() if v is not None}
        values = {name: getattr(cfg.eval, name) for name in cls.__dataclass_fields__}
        values.update(given)
        values["allow_missing_labels"] = bool(flags.get("allow_missing_labels")) or cfg.eval.allow_missing_labels
        for name, what in (("shots", "0 (no few-shot baseline)"), ("knn_shots", "0 (no retrieved-shots variant)")):
            if values[name] != "auto" and values[name] < 0:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} {values[name]}: give {what} or a positive number")
        if values["select_limit"] is not None and values["select_limit"] < 1:
            raise ConfigError(f"--select-limit {values['select_limit']}: give a positive number of validation examples")
        return cls(**values)


@dataclass(frozen=True)
class MeasureSettings:
    """How every system is measured: examples per forward pass, generation length (None: from the references),
    the longest encoded example."""

    batch_size: int | None  # None: batches sized by a token budget (generate.tokens_per_forward)
    max_new_tokens: int | None
    max_length: int | None

    @classmethod
    def of(cls, cfg, batch_size: int | str | None = None, max_new_tokens: int | None = None) -> "MeasureSettings":
        """The config's eval settings, with the flags that were given; the run's resolved data.max_length."""
        chosen = cfg.eval.batch_size if batch_size is None else batch_size  # a flag wins; "auto" is a choice too
        return cls(
            chosen if isinstance(chosen, int) else None,
            max_new_tokens or cfg.eval.max_new_tokens,
            cfg.data.max_length if isinstance(cfg.data.max_length, int) else None,
        )


@dataclass
class Compared:
    """One system of task.json: its key and name, the System measured, and (base systems) the prompt variant it
    stands for, whose decision rule applies. Entries that share a System share its measurement."""

    key: str
    name: str
    system: System
    variant: PromptVariant | None = None
    labels_missing: list[str] = field(default_factory=list)


@dataclass
class ShotSource:
    """Where shots and validation examples come from: the shot pool never holds a validation example."""

    pool: list[Example]
    validation: list[Example]
    split: str  # where the validation examples came from, in words

    @classmethod
    def of(cls, cfg, train: list[Example]) -> "ShotSource":
        """The validation split is data.validation, else the part of the training file training held out
        (data.val_fraction, same seed), else 10% of it held out here; shots come from the rest."""
        from pathlib import Path

        from tunesmith.data.formats import read_examples
        from tunesmith.data.split import split_train_val

        def shown(path: str) -> str:  # as the user would write it: relative to the working directory when under it
            resolved = Path(path).resolve()
            return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(resolved)

        if cfg.data.validation and Path(cfg.data.validation).is_file():
            return cls(train, read_examples(cfg.data.validation, cfg.data.format), shown(cfg.data.validation))
        if len(train) < 20:
            return cls(train, [], "")
        fraction = cfg.data.val_fraction if cfg.data.val_fraction > 0 else 0.1
        rest, held = split_train_val(train, fraction, cfg.train.seed)
        return cls(rest, held, f"{fraction:.0%} of {shown(cfg.data.train)} held out (seed {cfg.train.seed})")


@dataclass
class BaseSystems:
    """The prompted base systems of an evaluation, and how the best prompt was chosen (None: not chosen)."""

    compared: list[Compared]
    selection: Selection | None = None


def base_systems(
    cfg,
    plan: TaskPlan,
    base: tuple,
    source: ShotSource,
    options: PromptOptions,
    settings: MeasureSettings,
    progress,
    log=print,
) -> BaseSystems:
    """base zero-shot, base few-shot (every label covered) and the best prompt chosen on validation."""
    if plan.task == "lm":  # raw text: the base model is measured as it is; there is nothing to prompt
        base_system = System("base_zero_shot", "base", *base)
        return BaseSystems([Compared("base_zero_shot", "base", base_system, PromptVariant())])
    labels, pool, seed = plan.labels or [], source.pool, cfg.train.seed
    few_k = (max(3, len(labels)) if options.shots == "auto" else options.shots) if pool else 0
    knn_k = (AUTO_KNN_SHOTS if options.knn_shots == "auto" else options.knn_shots) if pool else 0
    if options.shots != "auto" and labels and 0 < few_k < len(labels) and not options.allow_missing_labels:
        pick_shots(pool, few_k, labels, seed)  # raises the ConfigError that says what to do
    instruction = instruction_for(plan, pool)

    by_prompt: dict[tuple, System] = {}

    def system_for(variant: PromptVariant) -> System:  # one System per prompt, for validation and test alike
        if variant.prompt not in by_prompt:
            by_prompt[variant.prompt] = build_system(
                variant, variant.key, *base, pool, plan, seed, instruction, options.allow_missing_labels
            )
        return by_prompt[variant.prompt]

    zero, few = PromptVariant(), PromptVariant("random", few_k)
    out = BaseSystems([Compared("base_zero_shot", "base, zero-shot", system_for(zero), zero)])
    if few_k:
        missing = labels_missing_from(system_for(few), plan)
        if missing:
            log(f"note: the {few_k}-shot prompt shows no example of {', '.join(missing)} (fewer shots than labels)")
        out.compared.append(
            Compared("base_few_shot", f"base, {few_k}-shot", system_for(few), few, labels_missing=missing)
        )
    if not options.select:
        return out
    if not source.validation:
        log(
            "note: no validation examples to choose a prompt on (data.validation, or 20+ training examples): "
            "the fine-tuned model is compared with zero- and few-shot prompting only"
        )
        return out
    sample = validation_sample(source.validation, options.select_limit or SELECT_LIMIT[plan.task], seed)
    tried = variants(plan, few_k, knn_k, instruction)
    log(f"eval: trying {len(tried)} prompt variants on {len(sample)} validation examples")
    out.selection = select_prompt(
        sample,
        source.split,
        plan,
        tried,
        system_for,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens or max_new_tokens_for(plan, base[1], sample),
        max_length=settings.max_length,
        progress=progress,
        log=log,
    )
    chosen = out.selection.chosen
    out.compared.append(Compared("base_best_prompt", "base, best prompt", system_for(chosen), chosen))
    return out
