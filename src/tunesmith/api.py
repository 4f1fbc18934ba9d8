"""The public Python API. The CLI is a thin layer over these functions.

    import tunesmith
    run = tunesmith.train("recipes/ticket-triage-lora.yaml", **{"train.max_steps": 50})
    print(run.generate("My card was charged twice"))
    run = tunesmith.load("runs/ticket-triage")

Heavy imports (torch, transformers) happen inside the functions so `import tunesmith` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from tunesmith.config import Config, load_config, parse_override, validate_config  # noqa: F401  (re-exported)
from tunesmith.errors import RunError


def train(
    config: Config | str | Path | dict | None = None,
    *,
    resume: str | Path | None = None,
    quiet: bool = False,
    log=print,
    **overrides: Any,
) -> "Run":
    """Fine-tune a model. `config` is a Config, a recipe path, or a dict; `overrides` are dotted keys
    (`tunesmith.train("r.yaml", **{"train.lr": 1e-4})`). With resume=RUN_DIR, continue that run."""
    from tunesmith.training.loop import train as _train

    if resume is not None:
        cfg = validate_config({"output": str(resume)})
        return Run(_train(cfg, resume=True, quiet=quiet, log=log))
    if isinstance(config, Config):
        cfg = config if not overrides else load_config(None, _merge(config.model_dump(mode="json"), overrides))
    elif isinstance(config, dict):
        cfg = load_config(None, _merge(config, overrides))
    else:
        cfg = load_config(config, list(overrides.items()))
    return Run(_train(cfg, quiet=quiet, log=log))


def _merge(raw: dict, overrides: dict) -> list[tuple[str, Any]]:
    flat: list[tuple[str, Any]] = []

    def walk(prefix, node):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat.append((prefix, node))

    walk("", raw)
    return flat + list(overrides.items())


def check_data(
    path: str | Path,
    validation: str | Path | None = None,
    model: str | None = None,
    max_length: int | None = None,
    format: str = "auto",
):
    """Validate a data file (every problem as FILE:LINE, raised as one DataError) and return its DataReport.
    With `model`, token counts use that model's tokenizer and chat template exactly as training renders them."""
    from tunesmith.data.validate import check

    tokenizer = renderer = None
    if model:
        from tunesmith.data.templates import Renderer
        from tunesmith.data.validate import chat_template_renderer

        tokenizer = _load_tokenizer(model)
        render = Renderer(tokenizer)
        # preference pairs are not trainable yet, so Renderer refuses them; count prompt + longer answer instead
        pairs = chat_template_renderer(tokenizer) or (lambda ex: tokenizer(ex.prompt or "")["input_ids"])

        def renderer(ex):
            return pairs(ex) if ex.kind == "preference" else render.encode(ex).input_ids
    return check(str(path), str(validation) if validation else None, tokenizer=tokenizer, max_length=max_length,
                 renderer=renderer, format=format)


def render_data_report(report) -> None:
    from tunesmith.data.validate import render_report

    render_report(report)


def _load_tokenizer(name: str):
    """Only the tokenizer of a model. A local directory holding a tokenizer is used as is (it needs no weights);
    anything else goes through `tunesmith.models.resolve` (built-in names, model directories, .gguf files)."""
    from transformers import AutoTokenizer

    from tunesmith.models import resolve

    path = Path(name).expanduser()
    if not (path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))):
        path = resolve(name)
    return AutoTokenizer.from_pretrained(path)


def list_models() -> list[dict]:
    from tunesmith.models import list_models as _list

    return _list()


def pull_model(name: str, force: bool = False, progress=True) -> Path:
    from tunesmith.models import pull

    return pull(name, force=force, progress=progress)


def model_info(name: str) -> dict:
    from tunesmith.models import info

    return info(name)


def load(run_dir: str | Path) -> "Run":
    """Open a finished run directory."""
    return Run(run_dir)


class Run:
    """A run directory (see DESIGN.md: config.yaml, data.json, metrics.jsonl, checkpoints/, model/, eval/)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.yaml").is_file():
            raise RunError(f"{self.path}: not a run directory (no config.yaml); train one with: tunesmith train ...")
        self._loaded = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def config(self) -> Config:
        import yaml

        return validate_config(yaml.safe_load((self.path / "config.yaml").read_text()), source=str(self.path / "config.yaml"))

    @property
    def metrics(self) -> list[dict]:
        from tunesmith.training.metrics import read_metrics

        return read_metrics(self.path)

    @property
    def data_summary(self) -> dict:
        return json.loads((self.path / "data.json").read_text())

    def load_model(self, device: str | None = None):
        """(model, tokenizer, renderer) of the fine-tuned model, cached on the Run."""
        if self._loaded is None:
            from tunesmith.evaluation.generate import load_run_model

            self._loaded = load_run_model(self.path, self.config, device=device)
        return self._loaded

    def generate(self, prompt: str | list[dict], **kwargs) -> str:
        """Answer one prompt (a user message, or a list of chat messages). kwargs: max_new_tokens, temperature,
        top_p, seed, stop."""
        from tunesmith.evaluation.generate import generate

        model, tokenizer, renderer = self.load_model()
        return generate(model, tokenizer, renderer, prompt, **kwargs)

    def generate_batch(self, prompts: list, batch_size: int = 8, **kwargs) -> list[str]:
        """Answers to many prompts (strings or message lists), batched."""
        from tunesmith.evaluation.generate import generate_batch

        model, tokenizer, renderer = self.load_model()
        return generate_batch(model, tokenizer, renderer, prompts, batch_size=batch_size, **kwargs)

    def stream(self, messages: list[dict], **kwargs) -> Iterator[str]:
        """Yield the answer to a conversation piece by piece as it is generated."""
        from tunesmith.evaluation.generate import stream

        model, tokenizer, renderer = self.load_model()
        yield from stream(model, tokenizer, renderer, messages, **kwargs)


def serve(
    runs: list[str | Path] = (),
    base: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    log=print,
    **options: Any,
) -> None:
    """Serve `base` and the LoRA/DoRA/IA3 runs of it over an OpenAI-compatible HTTP API until interrupted.
    A non-loopback `host` needs `api_key` (or TUNESMITH_API_KEY). options: watch, max_tokens, max_prompt_tokens,
    max_pending, max_batch, max_body_bytes, device, dtype. See tunesmith.serving."""
    from tunesmith.serving import serve as _serve

    _serve(list(runs), base, host=host, port=port, api_key=api_key, log=log, **options)


def evaluate(
    run: "Run | str | Path",
    data: str | Path | None = None,
    metric: str | None = None,
    by: str | None = None,
    shots: int | None = None,
    limit: int | None = None,
    forgetting: bool = True,
    log=print,
    *,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    quiet: bool = False,
    probe_limit: int | None = None,
    answer_format: str | None = None,
) -> dict:
    """Task metrics of the fine-tuned model vs the base model prompted zero-shot and few-shot (`shots` training
    examples), on `data` (default: the run's data.test). Writes RUN_DIR/eval/task.json and task_examples.jsonl
    (docs/eval-format.md) and returns task.json's content; with `forgetting`, also the general-ability probe
    (eval/forgetting.json, under the key "forgetting" of the result) when that probe is installed.
    Unset arguments come from the run's `eval:` config section. `probe_limit` caps the forgetting probe's questions
    (spread over its categories; default: `limit`, i.e. the whole probe when no limit is given). `answer_format`
    (default: eval.format) is a regular expression generated answers should match in full: adds `format_rate`."""
    import importlib.util

    from tunesmith.errors import ConfigError, DataError

    run = run if isinstance(run, Run) else Run(run)
    cfg = run.config
    if not (run.path / "model").is_dir():
        raise RunError(f"{run.path}: training has not finished (no model/ folder), so there is nothing to evaluate. "
                       f"Finish it with: tunesmith train --resume {run.path}")
    data_path = str(data) if data is not None else cfg.data.test
    if not data_path:
        raise ConfigError(f"{run.path}: no test data to evaluate on; pass --data test.jsonl "
                          "(or set data.test in the recipe)")
    if not Path(data_path).is_file():
        raise DataError(f"{data_path}: test data file not found; pass --data with an existing file")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit}: give a positive number of examples")
    shots = cfg.eval.shots if shots is None else shots
    if shots < 0:
        raise ConfigError(f"--shots {shots}: give 0 (no few-shot baseline) or a positive number")

    from tunesmith import models
    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer
    from tunesmith.evaluation import task_eval as T

    test = read_examples(data_path, cfg.data.format if data is None else "auto")[:limit]
    if not test:
        raise DataError(f"{data_path}: no examples to evaluate")
    train_examples = []
    if cfg.data.train and Path(cfg.data.train).is_file():
        train_examples = read_examples(cfg.data.train, cfg.data.format)
    elif shots:
        log(f"note: the training data {cfg.data.train} is not there, so no few-shot baseline")
    plan = T.plan_task(train_examples, test, metric or cfg.eval.metric, by or cfg.eval.by)
    plan.format = answer_format if answer_format is not None else cfg.eval.format
    if answer_format is not None:
        from tunesmith.config import compile_format

        try:
            compile_format(answer_format)
        except ValueError as e:
            raise ConfigError(f"--format {answer_format!r}: {e}") from None
    if plan.primary == "format_rate" and plan.format is None:
        raise ConfigError("--metric format_rate needs the format: pass --format REGEX or set eval.format in the recipe")
    log(f"eval: {plan.task} on {len(test)} examples of {data_path} (primary metric: {plan.primary})")

    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    tuned_model, tuned_tok, tuned_renderer = run.load_model()
    base_model, base_tok = models.load(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    base_model.eval()
    base_renderer = Renderer(base_tok, cfg.model.chat_template, cfg.data.system_prompt)
    systems = [T.System("base_zero_shot", "base, zero-shot", base_model, base_tok, base_renderer)]
    chosen = T.pick_shots(train_examples, shots, plan.labels, cfg.train.seed) if plan.task != "lm" else []
    if chosen:
        systems.append(T.System("base_few_shot", f"base, {len(chosen)}-shot", base_model, base_tok, base_renderer,
                                shots=chosen))
    systems.append(T.System("fine_tuned", "fine-tuned", tuned_model, tuned_tok, tuned_renderer,
                            raw_completion=bool(getattr(tuned_renderer, "raw_prompts", False))))
    result = T.run_task_eval(run.path, cfg, test, train_examples, data_path, plan, systems,
                             batch_size=batch_size or cfg.eval.batch_size,
                             max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens, log=log, quiet=quiet)
    log(f"wrote {run.path / 'eval' / 'task.json'} and {run.path / 'eval' / 'task_examples.jsonl'}")
    if forgetting and importlib.util.find_spec("tunesmith.evaluation.forgetting") is not None:
        from tunesmith.evaluation.forgetting import forgetting_eval

        result["forgetting"] = forgetting_eval(run, base=(base_model, base_tok), tuned=(tuned_model, tuned_tok),
                                               limit=probe_limit if probe_limit is not None else limit, log=log)
    return result


def render_eval_table(result: dict) -> None:
    """Print evaluate()'s summary table (rich)."""
    from rich.console import Console

    from tunesmith.evaluation.task_eval import summary_table

    Console().print(summary_table(result))


def report(run_dir: str | Path, out: str | Path | None = None, open_browser: bool = False) -> Path:
    """Write RUN_DIR/report.html (or `out`): one self-contained page with the training curves, the task metrics of
    the prompted base model vs the fine-tuned one, confusion matrices, forgetting, flipped examples and the config.
    Eval files that are missing are named in the page with the command that makes them. Returns the page's path."""
    from tunesmith.evaluation.report_html import write_report

    path = write_report(Run(run_dir).path, out)
    if open_browser:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return path


def export(
    run_dir: str | Path,
    out: str | Path,
    *,
    merge: bool = False,
    format: str | None = None,
    quant: str | None = None,
    adapter_only: bool = False,
    force: bool = False,
    log=print,
) -> dict:
    """Export a run's model into the directory `out`, then check it against the run (see tunesmith.exporting).

    merge=True (format "safetensors"): a merged Hugging Face model dir; format="gguf": one GGUF file (quant f16,
    q8_0 or f32; merged first); adapter_only=True: the peft adapter. Returns the equivalence figures (also in
    OUT/equivalence.json) with "out" and "files"; a failed check raises and leaves nothing behind."""
    from tunesmith.errors import ConfigError
    from tunesmith.exporting import export_run

    if format not in (None, "safetensors", "gguf"):
        raise ConfigError(f"export format {format!r} is not supported; use safetensors or gguf")
    if adapter_only and (merge or format is not None):
        raise ConfigError("--adapter-only writes the adapter alone; it cannot be combined with --merge or --format")
    if quant is not None and format != "gguf":
        raise ConfigError("--quant applies to GGUF exports only; add --format gguf")
    if adapter_only:
        kind = "adapter"
    elif format == "gguf":
        kind = "gguf"
    elif merge or format == "safetensors":
        kind = "merge"
    else:
        raise ConfigError(
            "say what to export: --merge (a Hugging Face model dir), --format gguf [--quant f16|q8_0] "
            "(a GGUF file for llama.cpp) or --adapter-only (a peft adapter)"
        )
    return export_run(run_dir, out, kind=kind, quant=quant or "f16", force=force, log=log)
