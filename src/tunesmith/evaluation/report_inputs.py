"""The files a run's report is made from (config.yaml, data.json, metrics.jsonl, eval/*.json), read and checked.

Each optional file that is missing or unusable becomes a `*_problem` sentence the report shows in its place, so
one bad file never hides the rest; only a folder that is not a run directory is an error.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import RunError
from tunesmith.jsonl import read_objects
from tunesmith.run_dir import RunDir, read_metrics

FORMAT_VERSION = 1  # the eval-file version this report understands (docs/eval-format.md)


@dataclass
class Inputs:
    run_dir: Path
    config_text: str = ""
    config: dict = field(default_factory=dict)
    data: dict | None = None
    data_problem: str | None = None
    metrics: list[dict] = field(default_factory=list)
    metrics_problem: str | None = None
    task: dict | None = None
    task_problem: str | None = None
    examples: list[dict] | None = None
    examples_problem: str | None = None
    forgetting: dict | None = None
    forgetting_problem: str | None = None

    @property
    def eval_command(self) -> str:
        return f"tunesmith eval {shlex.quote(str(self.run_dir))}"

    def systems(self) -> dict[str, dict]:
        return {s["key"]: s for s in (self.task or {}).get("systems", [])}


def read_inputs(run_dir: str | Path) -> Inputs:
    import yaml

    run = RunDir.open(run_dir)
    run_dir = run.path
    inp = Inputs(run_dir=run_dir, config_text=run.config_text)
    try:
        loaded = yaml.safe_load(inp.config_text)
    except yaml.YAMLError as e:
        raise RunError(f"{run.config_path}: not valid YAML ({e}); restore it from the run or re-train") from None
    # the report shows the config as written, even one this version of tunesmith would not validate
    inp.config = loaded if isinstance(loaded, dict) else {}

    try:
        inp.data = run.data_summary or None
    except RunError as e:
        inp.data_problem = str(e)
    inp.metrics, inp.metrics_problem = _read_metrics(run_dir)
    inp.task, inp.task_problem = _read_json(run_dir / "eval" / "task.json")
    if inp.task is not None:
        problems = _task_problems(inp.task)
        if problems:
            inp.task, inp.task_problem = (
                None,
                "eval/task.json does not follow docs/eval-format.md: " + "; ".join(problems),
            )
    if inp.task is not None:
        name = inp.task.get("examples_file") or "task_examples.jsonl"
        inp.examples, inp.examples_problem = _read_jsonl(run_dir / "eval" / Path(name).name)
    inp.forgetting, inp.forgetting_problem = _read_json(run_dir / "eval" / "forgetting.json")
    if inp.forgetting is not None:
        problems = _forgetting_problems(inp.forgetting)
        if problems:
            inp.forgetting, inp.forgetting_problem = (
                None,
                ("eval/forgetting.json does not follow docs/eval-format.md: " + "; ".join(problems)),
            )
    return inp


def _read_json(path: Path, versioned: bool = True) -> tuple[dict | None, str | None]:
    """(content, None), or (None, None) when the file is missing, or (None, why it cannot be used)."""
    if not path.is_file():
        return None, None
    rel = f"{path.parent.name}/{path.name}" if path.parent.name == "eval" else path.name
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{rel} is not valid JSON ({e})"
    if not isinstance(obj, dict):
        return None, f"{rel} holds a {type(obj).__name__}, not a JSON object"
    if versioned and obj.get("version") != FORMAT_VERSION:
        return None, (
            f"{rel} has format version {obj.get('version')!r}; this tunesmith reads version "
            f"{FORMAT_VERSION} (re-run the command that wrote it with this tunesmith, or upgrade)"
        )
    return obj, None


def _read_jsonl(path: Path) -> tuple[list[dict] | None, str | None]:
    if not path.is_file():
        return None, None
    rows, bad = read_objects(path)
    if bad:
        line, what = bad[0]
        return None, f"eval/{path.name}:{line}: {what}"
    return [row for _, row in rows], None


def _read_metrics(run_dir: Path) -> tuple[list[dict], str | None]:
    try:
        return read_metrics(run_dir), None
    except ValueError:
        # a run killed mid-write can leave a partial last line: keep every complete record
        good, bad = [], []
        for i, line in enumerate((run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines(), 1):
            try:
                good.append(json.loads(line)) if line.strip() else None
            except ValueError:
                bad.append(i)
        return good, f"metrics.jsonl: skipped unreadable line(s) {', '.join(map(str, bad[:10]))}"


def _task_problems(task: dict) -> list[str]:
    problems = []
    systems = task.get("systems")
    if not isinstance(systems, list) or not systems:
        return ["no systems"]
    for i, s in enumerate(systems):
        if not isinstance(s, dict) or not isinstance(s.get("key"), str) or not isinstance(s.get("metrics"), dict):
            problems.append(f"systems[{i}] needs a key and a metrics object")
    primary = task.get("primary")
    if not isinstance(primary, str):
        problems.append("no primary metric")
    if task.get("task") == "classification":
        labels = task.get("labels")
        if not isinstance(labels, list) or not labels:
            problems.append("classification without labels")
        else:
            for s in systems:
                c = s.get("confusion") if isinstance(s, dict) else None
                if c is not None and not (
                    isinstance(c, list)
                    and len(c) == len(labels)
                    and all(isinstance(r, list) and len(r) == len(labels) for r in c)
                ):
                    problems.append(f"{s.get('key')}: confusion is not {len(labels)}x{len(labels)}")
    return problems


def _forgetting_problems(f: dict) -> list[str]:
    problems = []
    for key in ("perplexity", "kl", "questions"):
        if f.get(key) is not None and not isinstance(f.get(key), dict):
            problems.append(f"{key} is not an object")
    if f.get("verdict") not in ("low", "moderate", "high"):
        problems.append(f"verdict {f.get('verdict')!r} is not one of low, moderate, high")
    return problems
