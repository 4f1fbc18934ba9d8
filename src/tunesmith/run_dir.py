"""The run directory: the one reader and checker of what `tunesmith train` leaves behind.

    runs/<name>/
      config.yaml      the fully resolved config          -> RunDir.config / config_text
      data.json        fingerprints, counts, the plan     -> RunDir.data_summary, RunDir.trained_kind
      metrics.jsonl    one JSON object per step / eval    -> RunDir.metrics
      checkpoints/     step-N/ (training/checkpoint.py owns their content) -> RunDir.checkpoints
      model/           the final adapter or full model    -> RunDir.require_model()
      eval/            evaluation results (evaluation/ writes and reads them)

Everything else (train, eval, report, export, serve, the API) asks this module; nothing else parses config.yaml or
decides "what kind of data did this run train on". It imports only config and errors, so every layer may use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunesmith.atomic import clean_partial
from tunesmith.config import Config, validate_config
from tunesmith.errors import RunError

CONFIG = "config.yaml"
DATA = "data.json"
METRICS = "metrics.jsonl"
MODEL = "model"
REFERENCE = (
    "reference_logps.safetensors"  # preference runs: the starting model's answer log-probs (training/reference.py)
)
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"  # checkpoints/step-N/, N = optimizer steps done
EVAL = "eval"
RAW_KINDS = ("completion", "text")  # runs trained on these are prompted with raw text, not the chat template


@dataclass(frozen=True)
class RunDir:
    """A folder that holds a run (it has a config.yaml). Open one with `RunDir.open(path)`."""

    path: Path

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """The run at `path`; a RunError that says what is wrong when it is not one."""
        path = Path(path)
        if not path.exists():
            raise RunError(
                f"{path}: not a run directory (it does not exist); pass a directory made by tunesmith "
                "train (e.g. runs/<name>)"
            )
        if not (path / CONFIG).is_file():
            raise RunError(f"{path}: not a run directory (no {CONFIG}); train one with: tunesmith train ...")
        return cls(path)

    # ---- config.yaml -------------------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def config_text(self) -> str:
        return self.config_path.read_text(encoding="utf-8")

    @property
    def config(self) -> Config:
        """The resolved config, validated (file:line errors from tunesmith.config)."""
        import yaml

        try:
            raw = yaml.safe_load(self.config_text)
        except yaml.YAMLError as e:
            raise RunError(f"{self.config_path}: not valid YAML ({e}); restore it from the run or re-train") from None
        return validate_config(raw, source=str(self.config_path))

    # ---- data.json ---------------------------------------------------------------------------------------------

    @property
    def data_summary(self) -> dict:
        """data.json's content ({} when the run has none yet); a RunError when it is not a JSON object."""
        path = self.path / DATA
        if not path.is_file():
            return {}
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise RunError(f"{path}: not valid JSON ({e}); it is written by tunesmith train") from None
        if not isinstance(obj, dict):
            raise RunError(f"{path}: holds a {type(obj).__name__}, not a JSON object; it is written by tunesmith train")
        return obj

    @property
    def trained_kind(self) -> str:
        """The kind of the examples the run trained on: chat, completion or text (chat when data.json is absent)."""
        return self.data_summary.get("kind", "chat")

    @property
    def raw_prompts(self) -> bool:
        """Whether the run's model is prompted with raw text (trained on prompt/completion or text rows, or on
        preference pairs whose prompts are raw text)."""
        if self.trained_kind == "preference":
            return self.data_summary.get("prompt_form") == "raw"
        return self.trained_kind in RAW_KINDS

    @property
    def objective(self) -> str:
        """train.objective the run was trained with, as data.json records it (sft for runs from before objectives)."""
        return self.data_summary.get("objective", "sft")

    # ---- model/, checkpoints/, metrics.jsonl, eval/ ------------------------------------------------------------

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL

    @property
    def has_model(self) -> bool:
        return self.model_dir.is_dir()

    def require_model(self, to: str = "use") -> Path:
        """model/, or a RunError that says training has not finished and how to finish it."""
        if not self.has_model:
            raise RunError(
                f"{self.path}: training has not finished (no {MODEL}/ folder), so there is nothing to {to}. "
                f"Finish it with: tunesmith train --resume {self.path}"
            )
        return self.model_dir

    @property
    def checkpoints(self) -> list[Path]:
        """The complete checkpoints, oldest first. Each is written under a hidden temporary name and renamed into
        place when whole (tunesmith.atomic), so a step-N folder is complete and a half-written one is not listed."""
        return list_checkpoints(self.path)

    @property
    def holds_training(self) -> bool:
        """Whether the folder holds training worth keeping: a complete checkpoint or a final model. A run killed
        before its first checkpoint was whole holds none (config.yaml, data.json and a few metrics only)."""
        return self.has_model or bool(self.checkpoints)

    def clean_partial(self) -> list[str]:
        """Remove the half-written files and folders a killed run left (hidden `.NAME.tmp-*` ones; see
        tunesmith.atomic.clean_partial); one phrase per thing done."""
        done = clean_partial(self.path, (MODEL, CONFIG, DATA, REFERENCE))
        return done + clean_partial(self.path / CHECKPOINTS, (f"{CHECKPOINT_PREFIX}*",), where=f"{CHECKPOINTS}/")

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def metrics(self) -> list[dict]:
        """Every complete record of metrics.jsonl, in order ([] when there is none)."""
        return read_metrics(self.path)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """RUN_DIR/checkpoints/step-N folders, by N (see RunDir.checkpoints)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    n = len(CHECKPOINT_PREFIX)
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[n:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[n:]))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a ValueError for a line that is not JSON."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
