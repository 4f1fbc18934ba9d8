"""The run configuration: typed, self-checking, every problem reported at once.

A config comes from a YAML recipe, from CLI flags, or both: `load_config("recipe.yaml", overrides)` where
overrides are dotted keys (`train.lr=1e-4`, `lora.r=8`). Every section forbids unknown keys so a typo fails
before any work, with the file, line, key, bad value and a suggestion.

Values written `auto` are chosen later from the data (see `tunesmith.training.auto`), and the run directory's
`config.yaml` records the resolved value of every key.

This module imports nothing heavy (no torch) so that `tunesmith --help` stays instant.
"""

from __future__ import annotations

import difflib
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from tunesmith.errors import ConfigError

Auto = Literal["auto"]
AUTO_MAX_LENGTH = 2048
"""data.max_length auto: the model's context, at most this many tokens."""
METHODS = ("full", "freeze", "lora", "dora", "ia3", "prefix", "prompt", "adapter")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    name: str = "smollm2-135m-instruct"
    """A built-in name (`tunesmith models list`), a local Hugging Face model directory, or a .gguf file."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Precision the model is loaded in for evaluation, generation and serving. auto: bfloat16 where the device
    computes it natively (CPUs with AVX512-BF16 or AMX, GPUs of compute capability 8.0+), float32 elsewhere
    (float16 on older GPUs). Training uses train.precision."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    chat_template: str | None = None
    """Override the model's chat template: a built-in template name (chatml, llama3, gemma, plain) or Jinja text."""


class DataConfig(_Section):
    train: str | None = None
    """Training file: .jsonl, .json, .csv, .parquet or .txt."""
    validation: str | None = None
    """Validation file. Without one, `val_fraction` of the training file is held out (stratified by label)."""
    test: str | None = None
    """Held-out test file used by `tunesmith eval`."""
    format: Literal["auto", "chat", "alpaca", "completion", "text", "preference"] = "auto"
    """Data format; auto detects it from the first rows."""
    system_prompt: str | None = None
    """System message added to chat examples that have none (also used for the prompted baselines)."""
    max_length: Union[Annotated[int, Field(ge=8, le=1_000_000)], Auto] = "auto"
    """Longest sequence in tokens; longer examples are handled by `truncation`. auto: the model's context, at most 2048."""
    truncation: Literal["error", "drop", "truncate"] = "truncate"
    """What to do with examples longer than max_length: fail, drop them, or cut the end off."""
    strict: bool = False
    """Fail on unknown keys in data rows (such as `source` or `difficulty`). By default a key that is not a
    misspelling of a known one is ignored with a warning naming it and its lines; misspelt keys (`mesages`) and
    unknown keys inside a message are errors either way."""
    val_fraction: float = Field(0.1, ge=0.0, lt=0.9)
    """Share of the training file held out for validation when no validation file is given."""


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=1024)
    """Rank of the update matrices."""
    alpha: float = Field(32, gt=0)
    """Scale: the update is multiplied by alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target: Union[Literal["all-linear", "attention"], list[str]] = "all-linear"
    """Modules to adapt: all-linear (every linear layer but the LM head), attention, or a list of module names."""


class FreezeConfig(_Section):
    last_n_blocks: int | None = Field(2, ge=0)
    """Train the last N transformer blocks (None or 0: no blocks)."""
    modules: list[str] = []
    """Also train parameters whose name contains any of these strings (e.g. `norm`, `lm_head`)."""


class IA3Config(_Section):
    target: Union[Literal["auto"], list[str]] = "auto"
    """Modules to scale; auto: keys, values and the MLP down projection."""
    feedforward: Union[Literal["auto"], list[str]] = "auto"
    """Which of `target` are feed-forward (scaled on their input); auto: the MLP down projection."""


class PrefixConfig(_Section):
    num_virtual_tokens: int = Field(20, ge=1, le=1024)
    projection: bool = False
    """Reparametrise the prefix through an MLP (more stable, more parameters while training)."""


class PromptConfig(_Section):
    num_virtual_tokens: int = Field(20, ge=1, le=1024)
    init_text: str | None = None
    """Initialise the soft prompt from the embeddings of this text (else random vocabulary embeddings)."""


class AdapterConfig(_Section):
    style: Literal["houlsby", "pfeiffer"] = "houlsby"
    """houlsby: an adapter after attention and after the MLP; pfeiffer: after the MLP only."""
    bottleneck: int = Field(64, ge=1)
    """Width of the adapter's bottleneck."""
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    init_scale: float = Field(1e-3, ge=0.0)
    """Std of the up-projection's initial weights; near 0 so an untrained adapter is the identity."""


class DPOConfig(_Section):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) and IPO (Azar et al. 2023,
    arXiv:2310.12036) against the starting model as reference."""

    beta: float = Field(0.1, gt=0.0, le=100.0)
    """Strength of the pull towards the reference: the paper's and TRL's default 0.1 (IPO's tau, same default)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: the DPO paper's loss; ipo: IPO's squared loss on length-averaged log-ratios (as TRL computes it)."""
    sft_weight: float = Field(0.0, ge=0.0, le=10.0)
    """Add this weight times the chosen answers' token-mean cross-entropy (RPO, Pang et al. 2024, arXiv:2404.19733;
    TRL's rpo_alpha); 0: plain DPO."""


class ORPOConfig(_Section):
    """Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691): SFT on the chosen answers plus an
    odds-ratio term; no reference model."""

    lambda_: float = Field(0.1, gt=0.0, le=100.0, alias="lambda")
    """Weight of the odds-ratio term (the paper's lambda; TRL's ORPOConfig.beta); default 0.1 as in both."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        populate_by_name=True,
        serialize_by_alias=True,
    )


class SimPOConfig(_Section):
    """Simple Preference Optimization (Meng et al. 2024, arXiv:2405.14734): length-normalised log-likelihood as the
    reward, a target margin, no reference model."""

    beta: float = Field(2.0, gt=0.0, le=100.0)
    """Reward scale; the paper uses 2.0-2.5 (2.0 here, its Mistral/Llama-3 base setting)."""
    gamma: float = Field(1.0, ge=0.0, le=100.0)
    """Target reward margin in reward units: loss = -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected))
    - gamma). The SimPO repository's default gamma/beta ratio 0.5 with beta 2.0 gives 1.0 (TRL's CPOConfig
    simpo_gamma is this gamma, default 0.5 with its beta 0.1)."""


class TrainConfig(_Section):
    objective: Literal["sft", "dpo", "orpo", "simpo"] = "sft"
    """sft: cross-entropy on the answers (chat, completion, text data); dpo, orpo, simpo: preference tuning on
    prompt/chosen/rejected pairs (options in the dpo / orpo / simpo sections)."""
    epochs: Union[int, Auto] = "auto"
    """Passes over the training data; auto: chosen from the dataset size."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs)."""
    lr: Union[float, Auto] = "auto"
    """Peak learning rate; auto: chosen from the method."""
    batch_size: Union[int, Auto] = "auto"
    """Examples per optimizer step (the effective batch)."""
    micro_batch_size: Union[int, Auto] = "auto"
    """Examples per forward pass; gradients are accumulated over batch_size / micro_batch_size passes."""
    warmup: Union[float, Auto] = "auto"
    """Share of steps spent warming the learning rate up from 0."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this value (None: no clipping)."""
    seed: int = 42
    eval_every: Union[int, Auto] = "auto"
    """Validate every N optimizer steps (and at the end); auto: about 8 times per run."""
    save_every: Union[int, Auto] = "auto"
    """Checkpoint every N optimizer steps (and at the end); auto: same as eval_every."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many recent checkpoints to keep."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop when validation loss has not improved for this many evaluations (None: never)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third slower."""
    batching: Literal["auto", "pack", "pad", "group"] = "auto"
    """pack: several examples per row without padding; pad: dynamic padding; group: length-grouped padding."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for torch; None: all cores (shared out among the processes of a run on one machine)."""
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"
    """fp32; bf16-mixed: bf16 matmuls under autocast, fp32 weights, optimizer state, LM head and loss; bf16: all in
    bf16 (least memory; updates below a weight's bf16 resolution are lost). auto: bf16-mixed where the device
    computes bf16 natively, fp32 elsewhere."""
    log: list[Literal["jsonl", "tensorboard"]] = ["jsonl"]
    """Metric sinks; metrics.jsonl is always written."""
    log_every: int = Field(1, ge=1)
    replay: float = Field(0.0, ge=0.0, le=0.9)
    """Share of the training set made of general chat examples, against forgetting (0: off; 0.1: one in ten).
    They are drawn once, with the seed, from train.replay_data and never enter validation."""
    replay_data: str | None = None
    """Chat JSONL file of general examples for replay; None: the built-in general-chat set."""
    kl_to_base: float = Field(0.0, ge=0.0, le=10.0)
    """Weight of a KL(base || model) penalty on the labelled positions of each batch, against forgetting (0: off;
    try 0.1-1). Costs one extra forward of the base model per batch."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """With several processes (--nproc N, torchrun): ddp replicates the model and averages gradients; fsdp shards
    weights, gradients and optimizer state (FSDP2, per decoder layer; full and freeze only). auto: fsdp for full
    fine-tuning, ddp otherwise. One process ignores it."""


def resolve_max_length(max_length: int | str, context: int | None) -> int:
    """data.max_length as training uses it: auto -> the model's context (2048 when unknown), at most
    AUTO_MAX_LENGTH. A value longer than the context is a ConfigError."""
    context = context or 2048
    if max_length == "auto":
        return min(context, AUTO_MAX_LENGTH)
    if int(max_length) > context:
        raise ConfigError(
            f"data.max_length={max_length} is longer than the model's context ({context} tokens); "
            f"set data.max_length to at most {context}"
        )
    return int(max_length)


def compile_format(pattern: str):
    """eval.format as a compiled regular expression; ValueError naming the problem when it is not one."""
    import re

    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"not a valid regular expression ({e}); escape literal characters such as ( ) [ ] . * + ?"
        ) from None


class EvalConfig(_Section):
    """Defaults of `tunesmith eval` for this recipe (its flags override them)."""

    shots: Union[Annotated[int, Field(ge=0, le=64)], Auto] = "auto"
    """Few-shot examples (random, seeded) for the prompted base model, drawn from the training data; 0: no few-shot
    baseline. auto: 3, and for classification at least one per label. Fewer than the labels needs
    allow_missing_labels."""
    knn_shots: Union[Annotated[int, Field(ge=0, le=64)], Auto] = "auto"
    """Retrieved shots: per example, the k most similar training examples (TF-IDF); 0: no such variant. auto: 8."""
    select: bool = True
    """Try the prompting variants (zero-shot, format instruction, few-shot, retrieved shots, calibrated label
    scoring) on the validation split and compare the fine-tuned model with the best one on the test split."""
    select_limit: Union[Annotated[int, Field(ge=1)], None] = None
    """Validation examples the variants are tried on; None: 100 for classification, 40 for generation tasks."""
    allow_missing_labels: bool = False
    """Allow a few-shot prompt with fewer shots than labels (then some labels never appear in the prompt)."""
    metric: str | None = None
    """Task or headline metric; None: chosen from the data (classification, extraction, text or lm)."""
    by: Literal["score", "generate", "both"] = "both"
    """Classification: label scoring, greedy generation, or both."""
    batch_size: Union[Annotated[int, Field(ge=1, le=1024)], Auto] = "auto"
    """Test examples per forward pass; auto: as many as fit 4096 tokens (and ~1 GiB of keys/values and activations),
    at most 64: short prompts decode many answers per step, long few-shot prompts take fewer rows."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Generation length; None: from the longest reference (1.5x + 16, at most 512)."""
    format: str | None = None
    """A regular expression every generated answer should match in full (surrounding whitespace ignored), e.g.
    `Answer: .+\\nWhy: .+\\nConfidence: (high|medium|low)` for a fixed three-line format: adds the metric
    `format_rate`, the share of answers that match, for every system."""

    @field_validator("format")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            compile_format(v)
        return v


DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float) -> float:
    """ "2h", "90m", "1h30m", "45s", "1.5h" -> seconds. A bare number is ambiguous and refused."""
    import re

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        raise ValueError(f"{text!r} has no unit; write e.g. 90m, 2h or 1h30m")
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(min|[smhd])", str(text).strip().lower())
    rebuilt = "".join(f"{n}{u}" for n, u in parts)
    if not parts or rebuilt != re.sub(r"\s+", "", str(text).strip().lower()):
        raise ValueError(f"{text!r} is not a duration; write e.g. 90m, 2h, 1h30m or 45s")
    seconds = sum(float(n) * DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r}: a budget must be longer than zero")
    return seconds


class SweepParam(_Section):
    """One searched key: a range (`low`, `high`, optional `log` scale or `step`) or a list of `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    """Sample on a log scale (learning rates, betas): needs low > 0."""
    step: float | None = Field(None, gt=0)
    """Only multiples of step above low (e.g. 0.05 for a replay share); not with log."""
    choices: list[Union[StrictBool, StrictInt, float, str]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _range_or_choices(self) -> "SweepParam":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either choices or a low/high range, not both")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"choices repeat a value: {self.choices}")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (a range) or choices (a list)")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log scale needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step do not combine; drop one")
        return self


class SweepConfig(_Section):
    """`tunesmith sweep`: a hyperparameter search (Optuna) over this recipe; ignored by `tunesmith train`."""

    trials: int = Field(20, ge=1, le=10_000)
    """Trials in all, the baseline trial 0 (this recipe as written) included; --trials overrides."""
    budget: str | None = None
    """Wall-clock budget, e.g. 2h or 90m (--budget overrides); None: no limit. A trial estimated to overrun what is
    left is not started; a trial running when the budget ends stops at a step boundary and counts as pruned."""
    objective: str = "val_loss"
    """val_loss (the final validation loss), task (the held-out task's headline metric, measured on the validation
    split), a metric name (accuracy, macro_f1, field_f1, chrf, ...; or val_reward_accuracy for preference pairs), or
    task,forgetting: both at once, a Pareto front."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stop trials early on their validation loss: median (below the median of earlier trials at the same epoch
    fraction), hyperband (successive halving brackets), none. Multi-objective sweeps never prune."""
    evals_per_epoch: int = Field(2, ge=1, le=20)
    """Validations per epoch of each trial, at the same fractions of an epoch in every trial (what pruning compares)."""
    startup_trials: int = Field(4, ge=0, le=1000)
    """Trials sampled at random before TPE models the results, and finished before the pruner may stop any."""
    eval_limit: int | None = Field(None, ge=1)
    """Validation examples the task objective is measured on; None: all of them."""
    probe_limit: int = Field(96, ge=8, le=100_000)
    """Forgetting objective: questions of the general-ability probe (and a passage per 8 of them) per trial."""
    seed: int | None = None
    """Sampler seed; None: train.seed."""
    default_space: bool = True
    """Start from tunesmith's search space for the method and objective; `space` adds, narrows or (null) drops keys."""
    space: dict[str, Union[SweepParam, None]] = {}
    """Config key -> range or choices, e.g. `train.lr: {low: 1e-5, high: 1e-3, log: true}`, `lora.r: {choices:
    [8, 16, 32]}`; `lora.alpha_ratio` sets lora.alpha to ratio x lora.r; null drops a key of the default space."""

    @field_validator("budget")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v


class Config(_Section):
    name: str | None = None
    """Run name; default: the training file's stem."""
    output: str | None = None
    """Run directory; default: runs/<name>."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: Literal["full", "freeze", "lora", "dora", "ia3", "prefix", "prompt", "adapter"] = "lora"
    lora: LoraConfig = LoraConfig()
    freeze: FreezeConfig = FreezeConfig()
    ia3: IA3Config = IA3Config()
    prefix: PrefixConfig = PrefixConfig()
    prompt: PromptConfig = PromptConfig()
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig()
    dpo: DPOConfig = DPOConfig()
    orpo: ORPOConfig = ORPOConfig()
    simpo: SimPOConfig = SimPOConfig()
    eval: EvalConfig = EvalConfig()
    sweep: SweepConfig = SweepConfig()

    _source: str = PrivateAttr("config")
    _lines: dict = PrivateAttr(default_factory=dict)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        # `model: smollm2-135m-instruct` is short for `model: {name: smollm2-135m-instruct}`
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _defaults(self) -> "Config":
        if self.name is None and self.data.train:
            self.name = Path(self.data.train).stem
        return self

    def run_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / (self.name or "run")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def __eq__(self, other: object) -> bool:  # equal settings; where they were read from does not count
        return isinstance(other, Config) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    def where(self, *loc: str) -> str:
        """ "recipe.yaml:12: " for the line of the key path `loc` in the recipe this config was read from (the
        nearest enclosing key's line), "recipe.yaml: " when unknown, "" for a config from flags only."""
        line = _nearest_line(tuple(loc), self._lines)
        if line:
            return f"{self._source}:{line}: "
        return "" if self._source == "command line" else f"{self._source}: "


# ----------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_override(item: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 0.0001). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE; write e.g. train.lr=1e-4")
    key, _, raw = item.partition("=")
    return key.strip(), _parse_value(raw)


def _parse_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # YAML reads "1e-4" as a string (it wants "1.0e-4"); accept the form everyone writes
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: dict[str, Any] | list[tuple[str, Any]]) -> dict:
    items = overrides.items() if isinstance(overrides, dict) else overrides
    for key, value in items:
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None or isinstance(child, str) and part == "model":
                child = {"name": child} if isinstance(child, str) else {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[tuple[str, Any]] | None = None,
) -> Config:
    """Read a YAML recipe (optional), apply dotted overrides, validate. Raises ConfigError listing every problem."""
    raw: dict = {}
    lines: dict[tuple, int] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such recipe file")
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise ConfigError(
                f"{path}:{line}: invalid UTF-8 byte 0x{data[e.start]:02X}; save the recipe with UTF-8 encoding"
            ) from None
        try:
            raw = yaml.safe_load(text) or {}
            lines = _key_lines(yaml.compose(text))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
        except RecursionError:  # PyYAML composes nodes recursively: `[[[[...` 1000 deep ends it
            raise ConfigError(f"{path}: nested too deeply; a recipe is a mapping of sections two levels deep") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections (model:, data:, train: ...)")
        # relative data paths in a recipe are relative to the recipe's folder... unless they exist as given
        _resolve_data_paths(raw, path.parent)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return validate_config(raw, source=source, lines=lines)


def validate_config(raw: dict, source: str = "config", lines: dict[tuple, int] | None = None) -> Config:
    try:
        cfg = Config.model_validate(raw)
        cfg._source, cfg._lines = source, dict(lines or {})
        return cfg
    except ValidationError as e:
        problems = _merge_union_errors([_printable(_describe(err, source, lines or {})) for err in e.errors()])
        n = len(problems)
        raise ConfigError(f"{source}: {n} problem{'s' if n > 1 else ''} in the configuration:", problems) from None


def _describe(err: dict, source: str, lines: dict[tuple, int]) -> str:
    loc = tuple(str(p) for p in err["loc"] if not str(p).startswith(("literal[", "int", "float", "list[")))
    # pydantic reports union members as extra loc parts; drop the type tags it inserts
    loc = tuple(p for p in loc if p not in {"str", "function-after[_model_shorthand(), ModelConfig]"})
    key = ".".join(loc)
    line = _nearest_line(loc, lines)
    where = f"{source}:{line}: " if line else ("" if source == "command line" else f"{source}: ")
    if err["type"] == "extra_forbidden":
        section_model = _section_model(loc[:-1])
        known = list(section_model.model_fields) if section_model else []
        hint = (
            difflib.get_close_matches(loc[-1], known, n=1)
            or [k for k in known if loc[-1].startswith(k) or k.startswith(loc[-1])][:1]
        )
        fix = f"did you mean '{'.'.join(loc[:-1] + (hint[0],))}'?" if hint else f"known keys: {', '.join(known)}"
        return f"  {where}unknown key '{key}'; {fix}"
    value = err.get("input")
    shown = f" (got {_REPR.repr(value)})" if not isinstance(value, dict) else ""
    return f"  {where}{key}: {err['msg']}{shown}"


def _printable(text: str) -> str:
    """Lone surrogates (a YAML key written "\\ud800") escaped, so the message can be printed as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


_REPR = reprlib.Repr()  # bounded: YAML aliases can make a value whose full repr is billions of characters
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 6, 6, 4, 6


def _merge_union_errors(problems: list[str]) -> list[str]:
    """A value that fits no member of a union yields one error per member; say it once."""
    merged: dict[str, list[str]] = {}
    for p in problems:
        head, sep, rest = p.partition(": Input should be ")
        if not sep:
            merged.setdefault(p, [])
            continue
        msg, _, got = rest.rpartition(" (got ")
        merged.setdefault(f"{head}|{got}", []).append(msg.split(", unable to")[0])
    out = []
    for key, msgs in merged.items():
        if not msgs:
            out.append(key)
        else:
            head, _, got = key.partition("|")
            out.append(f"{head}: expected {' or '.join(msgs)} (got {got}")
    return out


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model


def _nearest_line(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for i in range(len(loc), 0, -1):
        if loc[:i] in lines:
            return lines[loc[:i]]
    return None


def _key_lines(node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path of a YAML document to its 1-based line, for error messages."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = prefix + (str(k.value),)
            out[path] = k.start_mark.line + 1
            out.update(_key_lines(v, path))
    return out


def _resolve_data_paths(raw: dict, base: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train", "validation", "test"):
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and not _exists(Path(value)):
            candidate = base / value
            if _exists(candidate):
                data[key] = str(candidate)


def _exists(path: Path) -> bool:
    """Path.exists without its exceptions for names no file can have (a NUL byte, too long): those don't exist."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False
