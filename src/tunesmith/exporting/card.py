"""The model card (README.md) written next to every export: what was trained, on what, how well, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.errors import RunError
from tunesmith.run_dir import RunDir


def model_card(
    run_dir: Path, config, method: str, kind: str, files: list[str], check: dict, quant: str | None = None
) -> str:
    summary = _data_summary(run_dir)
    train_loss, eval_loss, steps = _losses(run_dir)
    base = config.model.name
    library = "peft" if kind == "adapter" else ("gguf" if kind == "gguf" else "transformers")
    lines = [
        "---",
        f"base_model: {json.dumps(base)}",
        f"library_name: {library}",
        f"tags: [tunesmith, {method}]",
        "---",
        "",
        f"# {Path(run_dir).resolve().name}",
        "",
        f"Fine-tuned from `{base}` with [tunesmith](https://pypi.org/project/tunesmith/) (method: {method}) "
        f"and exported as {_what(kind, quant)}.",
        "",
        "## Training",
        "",
        f"- method: {method}{_settings(run_dir)}",
    ]
    if summary:
        train = summary.get("train", {}).get("examples")
        val = summary.get("validation", {}).get("examples")
        lines.append(f"- data: {train} training examples, {val} validation examples ({summary.get('kind', 'chat')})")
    if steps is not None:
        lines.append(
            f"- steps: {steps}; last training loss: {_fmt(train_loss)}; last validation loss: {_fmt(eval_loss)}"
        )
    if config.data.system_prompt:
        lines.append(
            f"- trained with the system prompt {config.data.system_prompt!r}: give it when you prompt the model"
        )
    lines += [
        "",
        "## Equivalence with the run",
        "",
        f"Checked on {len(check['prompts'])} prompts against the run's own model: max |logit difference| "
        f"{check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:.3g}, computed in "
        f"{check.get('compared_in', 'float32')}); greedy outputs of "
        f"{check['greedy_new_tokens']} tokens {'identical' if check['greedy_identical'] else 'different'}. "
        "Details: `equivalence.json`.",
        "",
        "## Use",
        "",
        "```python",
        *_usage(kind, base, files),
        "```",
        "",
    ]
    return "\n".join(lines)


def _what(kind: str, quant: str | None) -> str:
    return {
        "merge": "a merged Hugging Face model (safetensors; loads with transformers alone)",
        "gguf": f"a GGUF file ({quant}) for llama.cpp and compatible runtimes",
        "adapter": "a peft adapter (loads with peft, vLLM and LoRAX on top of the base model)",
    }[kind]


def _usage(kind: str, base: str, files: list[str]) -> list[str]:
    if kind == "merge":
        return [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/DIR")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIR")',
        ]
    if kind == "gguf":
        gguf = next(f for f in files if f.endswith(".gguf"))
        return [
            f"# llama.cpp: llama-cli -m {gguf}",
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/DIR", gguf_file="{gguf}")',
        ]
    return [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f"base = AutoModelForCausalLM.from_pretrained(...)  # the base model: {base}",
        'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/DIR")',
    ]


def _data_summary(run_dir: Path) -> dict:
    try:
        return RunDir(run_dir).data_summary
    except RunError:  # an unreadable data.json: the card goes without the data section
        return {}


def _settings(run_dir: Path) -> str:
    try:
        meta = json.loads((run_dir / "model" / "tunesmith.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return ""
    settings = ", ".join(f"{k}={v}" for k, v in meta.get("settings", {}).items() if v is not None)
    trained = meta.get("trainable_parameters")
    total = meta.get("total_parameters")
    counts = f"; {trained:,} trainable of {total:,} parameters" if trained and total else ""
    return f" ({settings}){counts}" if settings else counts


def _losses(run_dir: Path):
    train = evaluation = steps = None
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return None, None, None
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "train":
            train, steps = record.get("loss"), record.get("step")
        elif record.get("kind") == "eval":
            evaluation = record.get("val_loss")
    return train, evaluation, steps


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
