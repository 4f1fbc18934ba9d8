"""The search space of a sweep: which config keys are searched, over what values, and how a trial's values
become config overrides.

The default space is centred on what the baseline trial resolved (the recipe as written: its own values, or the
`auto` ones tunesmith chose from the data), so a sweep searches around a known-good point instead of a generic box:

- train.lr: log-uniform over [lr/4, 4 lr]. Learning rate is the hyperparameter that matters most for LoRA and
  full fine-tuning alike (Biderman et al. 2024, "LoRA Learns Less and Forgets Less", sweep it first); a factor
  of 4 each way spans the rates people report for the same method (LoRA 5e-5 .. 8e-4 around 2e-4).
- train.epochs: whole numbers from 1 to max(2, 2 x the baseline's): fewer epochs forget less, more fit a strict
  format better. Not searched when the recipe fixes train.max_steps.
- train.batch_size: half, the same, or twice the baseline's (at most a quarter of the training examples).
- train.warmup: 0 to 10% of the steps.
- LoRA / DoRA: lora.r in {4, 8, 16, 32, 64}, lora.alpha as a ratio of r in {0.5, 1, 2, 4} (alpha/r is the update's
  scale: searching the ratio keeps rank and scale apart), lora.dropout 0 to 0.1.
- adapter: adapter.bottleneck in {16, 32, 64, 128}; prefix / prompt tuning: num_virtual_tokens in {10, 20, 40}.
- preference objectives: dpo.beta log-uniform over [0.02, 0.5] (the DPO paper's 0.1 in the middle), orpo.lambda
  over [0.02, 0.5], simpo.beta over [1, 10] and simpo.gamma over [0.3, 2] (the SimPO paper's grid).
- train.replay (a share of general-text examples mixed in against forgetting) 0 to 0.3 in steps of 0.05, only when
  forgetting is an objective: with the validation loss or the task metric alone it can only cost.

A recipe's `sweep.space` adds keys, replaces a default key's range, or drops one (`key: null`);
`sweep.default_space: false` starts from nothing.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any

from tunesmith.config import Config, apply_overrides, validate_config
from tunesmith.errors import ConfigError

ALPHA_RATIO = "lora.alpha_ratio"  # not a config key: lora.alpha = ratio x lora.r
VIRTUAL_KEYS = {ALPHA_RATIO: "lora.alpha"}
LORA_RANKS = [4, 8, 16, 32, 64]
ALPHA_RATIOS = [0.5, 1, 2, 4]


@dataclass(frozen=True)
class Param:
    """One searched key, in the form Optuna's suggest_* take it."""

    key: str
    kind: str  # "int", "float" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log and not self.step
            )
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {{{', '.join(str(c) for c in self.choices)}}}"
        scale = " (log)" if self.log else (f" step {self.step:g}" if self.step else "")
        return f"{self.key} in [{self.low:g}, {self.high:g}]{scale}"

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and v is not False} | {
            "choices": list(self.choices) if self.choices else None
        }

    @classmethod
    def from_json(cls, d: dict) -> "Param":
        d = {k: v for k, v in d.items() if v is not None}
        if "choices" in d:
            d["choices"] = tuple(d["choices"])
        return cls(**d)


def default_space(resolved: Config, n_train: int, forgetting: bool) -> list[Param]:
    """The default search space around the baseline trial's resolved config (see the module docstring)."""
    t = resolved.train
    space = [Param("train.lr", "float", t.lr / 4, t.lr * 4, log=True)]
    if t.max_steps is None:
        space.append(Param("train.epochs", "int", 1, max(2, 2 * t.epochs)))
    batches = sorted({max(1, t.batch_size // 2), t.batch_size, t.batch_size * 2})
    batches = [b for b in batches if b <= max(1, n_train // 4)] or [t.batch_size]
    if len(batches) > 1:
        space.append(Param("train.batch_size", "categorical", choices=tuple(batches)))
    space.append(Param("train.warmup", "float", 0.0, 0.1))
    method = resolved.method
    if method in ("lora", "dora"):
        space += [
            Param("lora.r", "categorical", choices=tuple(LORA_RANKS)),
            Param(ALPHA_RATIO, "categorical", choices=tuple(ALPHA_RATIOS)),
            Param("lora.dropout", "float", 0.0, 0.1),
        ]
    elif method == "adapter":
        space.append(Param("adapter.bottleneck", "categorical", choices=(16, 32, 64, 128)))
    elif method in ("prefix", "prompt"):
        space.append(Param(f"{method}.num_virtual_tokens", "categorical", choices=(10, 20, 40)))
    objective = t.objective
    if objective == "dpo":
        space.append(Param("dpo.beta", "float", 0.02, 0.5, log=True))
    elif objective == "orpo":
        space.append(Param("orpo.lambda", "float", 0.02, 0.5, log=True))
    elif objective == "simpo":
        space += [Param("simpo.beta", "float", 1.0, 10.0, log=True), Param("simpo.gamma", "float", 0.3, 2.0)]
    if forgetting:
        space.append(Param("train.replay", "float", 0.0, 0.3, step=0.05))
    return space


def user_params(cfg: Config) -> dict[str, Param | None]:
    """The recipe's sweep.space as Params (None: drop that default key), every problem as one ConfigError with the
    recipe's file:line: unknown keys, values the key does not accept, ranges on a key that takes no numbers."""
    problems: list[str] = []
    out: dict[str, Param | None] = {}
    base_raw = _raw(cfg)
    for key, spec in cfg.sweep.space.items():
        where = cfg.where("sweep", "space", key)
        if spec is None:
            out[key] = None
            continue
        target = VIRTUAL_KEYS.get(key, key)
        field = _field(target)
        if field is None or key in ("sweep", "name", "output") or key.startswith(("sweep.", "model.", "data.")):
            problems.append(f"  {where}sweep.space.{key}: not a searchable config key; use e.g. train.lr, lora.r")
            continue
        if spec.choices is not None:
            param = Param(key, "categorical", choices=tuple(spec.choices))
            values = list(spec.choices)
        else:
            is_int = _takes_int_only(field) and all(float(v).is_integer() for v in (spec.low, spec.high))
            if spec.step is not None and not float(spec.step).is_integer():
                is_int = False
            kind = "int" if is_int else "float"
            param = Param(key, kind, spec.low, spec.high, spec.log, spec.step)
            values = [spec.low, spec.high]
            if kind == "int":
                values = [int(v) for v in values]
        if key == ALPHA_RATIO:
            bad = (v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0)
            msg = next((f"a ratio must be a positive number (got {v!r})" for v in bad), None)
        else:
            msg = next(
                (f"{v!r} is not a valid {target}: {m}" for v in values if (m := _rejects(base_raw, target, v))), None
            )
        if msg:
            problems.append(f"  {where}sweep.space.{key}: {msg}")
        else:
            out[key] = param
    if problems:
        n = len(problems)
        raise ConfigError(f"{cfg._source}: {n} problem{'s' if n > 1 else ''} in sweep.space:", problems)
    return out


def build_space(cfg: Config, resolved: Config, n_train: int, forgetting: bool) -> list[Param]:
    """The default space (unless sweep.default_space is false) with the recipe's sweep.space applied."""
    space = {p.key: p for p in default_space(resolved, n_train, forgetting)} if cfg.sweep.default_space else {}
    for key, param in user_params(cfg).items():
        if param is None:
            space.pop(key, None)
        else:
            space[key] = param
    if ALPHA_RATIO in space and cfg.method not in ("lora", "dora"):
        space.pop(ALPHA_RATIO)
    return list(space.values())


def overrides(values: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A trial's sampled values as config overrides (lora.alpha_ratio becomes lora.alpha = ratio x r)."""
    out = {k: v for k, v in values.items() if k not in VIRTUAL_KEYS}
    if ALPHA_RATIO in values:
        r = out.get("lora.r", cfg.lora.r)
        out["lora.alpha"] = float(values[ALPHA_RATIO]) * r
    return out


def _raw(cfg: Config) -> dict:
    raw = cfg.model_dump(mode="json", by_alias=True)
    raw.pop("sweep", None)
    return raw


def _rejects(raw: dict, key: str, value: Any) -> str | None:
    """Why the config refuses `key: value`, or None when it takes it."""
    import copy

    try:
        validate_config(apply_overrides(copy.deepcopy(raw), [(key, value)]), source="command line")
    except ConfigError as e:
        return "; ".join(p.strip().split(": ", 1)[-1] for p in e.problems) or e.message
    return None


def _field(key: str):
    """The pydantic field a dotted key names, or None."""
    model: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        name = next((n for n, f in fields.items() if part in (n, f.alias)), None)
        if name is None:
            return None
        field = fields[name]
        if i == len(parts) - 1:
            return field
        ann = field.annotation
        if not (isinstance(ann, type) and hasattr(ann, "model_fields")):
            return None
        model = ann
    return None


def _takes_int_only(field) -> bool:
    """True for a field that takes whole numbers and no fractions (epochs, ranks, batch sizes)."""
    found: set = set()

    def walk(t):
        origin = typing.get_origin(t)
        if origin is None:
            found.add(t)
            return
        for a in typing.get_args(t):
            walk(a)

    walk(field.annotation)
    return int in found and float not in found


def sampled(param: Param, value: Any) -> str:
    """A sampled value as a person reads it: learning rates in scientific notation, shares with two digits."""
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.2e}" if param.log or abs(value) < 1e-3 and value else f"{value:.3g}"
    return str(value)
