"""The public Python API. The CLI is a thin layer over these functions.

    import tunesmith
    run = tunesmith.train("recipes/ticket-triage-lora.yaml", **{"train.max_steps": 50})
    print(run.generate("My card was charged twice"))
    run = tunesmith.load("runs/ticket-triage")

Heavy imports (torch, transformers) happen inside the functions so `import tunesmith` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from tunesmith.config import Config, load_config, parse_override, validate_config  # noqa: F401  (re-exported)
from tunesmith.run_dir import RunDir


def train(
    config: Config | str | Path | dict | None = None,
    *,
    resume: str | Path | None = None,
    quiet: bool = False,
    log=print,
    progress=None,
    hooks=None,
    **overrides: Any,
) -> "Run":
    """Fine-tune a model. `config` is a Config, a recipe path, or a dict; `overrides` are dotted keys
    (`tunesmith.train("r.yaml", **{"train.lr": 1e-4})`). With resume=RUN_DIR, continue that run from its last
    whole checkpoint (from step 0 with its saved config when it stopped before its first one).

    `progress` (a tunesmith.progress.Progress, e.g. tunesmith.cli.display.RichProgress() for a bar) follows the
    steps and shows the validation results; by default no bar is drawn and those lines go to `log`, or nowhere
    with quiet=True. `log` gets the other messages either way. `hooks` (tunesmith.training.loop.TrainHooks) choose
    when to validate and may stop the run at a step boundary (tunesmith.errors.Stopped)."""
    from tunesmith.progress import Progress
    from tunesmith.training.loop import train as _train

    if progress is None:
        progress = Progress(None if quiet else log)
    if resume is not None:
        cfg = validate_config({"output": str(resume)})
        return Run(_train(cfg, resume=True, progress=progress, log=log, hooks=hooks))
    return Run(_train(_config(config, overrides), progress=progress, log=log, hooks=hooks))


def estimate_memory(
    config: Config | str | Path | dict | None = None, *, nproc: int = 1, log=print, **overrides
) -> None:
    """`tunesmith train --dry-run`: load the model and data, plan, and print the estimated memory per process for
    `nproc` processes (weights, gradients, optimizer state, activations); trains and writes nothing."""
    from tunesmith.training.loop import train as _train

    _train(_config(config, overrides), log=log, dry_run=True, world_size=nproc)


def launch_train(nproc: int, argv: list[str], log=print) -> None:
    """`tunesmith train ARGV --nproc N`: the same command on N local processes (torch.distributed.run)."""
    from tunesmith.training.launch import launch

    launch(nproc, argv, log=log)


def _config(config, overrides: dict) -> Config:
    if isinstance(config, Config):
        return config if not overrides else load_config(None, _merge(config.model_dump(mode="json"), overrides))
    if isinstance(config, dict):
        return load_config(None, _merge(config, overrides))
    return load_config(config, list(overrides.items()))


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
    truncation: str = "truncate",
    strict: bool = False,
):
    """Validate a data file (every problem as FILE:LINE, raised as one DataError) and return its DataReport.

    With `model`, token counts use that model's tokenizer and chat template exactly as training renders them, and
    every example longer than `max_length` is a warning saying what training does with it (per `truncation`,
    data.truncation). max_length None with a model: what training uses for data.max_length auto (the model's
    context, at most 2048). strict: unknown keys of rows are problems (data.strict), not warnings. Preference pairs:
    a pair whose prompt leaves no room for an answer within max_length is a problem."""
    from tunesmith.config import resolve_max_length
    from tunesmith.data.validate import check

    tokenizer = renderer = pair_tokens = None
    if model:
        from tunesmith.data.templates import Renderer
        from tunesmith.data.validate import pair_token_counter

        model_dir = _tokenizer_path(model)
        tokenizer = _load_tokenizer(model_dir)
        max_length = resolve_max_length("auto" if max_length is None else max_length, _context_length(model_dir))
        render = Renderer(tokenizer)
        renderer = render.encode  # an Encoded: its labels tell which long examples training drops rather than cuts
        pair_tokens = pair_token_counter(render)  # a pair: prompt and each answer (chat pairs: the chat template)

    return check(
        str(path),
        str(validation) if validation else None,
        tokenizer=tokenizer,
        max_length=max_length,
        renderer=renderer,
        format=format,
        truncation=truncation,
        strict=strict,
        pair_tokens=pair_tokens,
    )


def _tokenizer_path(name: str | Path) -> Path:
    """A local directory holding a tokenizer as is (it needs no weights); anything else through
    `tunesmith.models.resolve` (built-in names, model directories, .gguf files)."""
    from tunesmith.models import resolve

    path = Path(name).expanduser()
    if not (path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))):
        path = resolve(str(name))
    return path


def _load_tokenizer(name: str | Path):
    """Only the tokenizer of a model (see `_tokenizer_path`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_path(name))


def _context_length(path: Path) -> int | None:
    """max_position_embeddings from a model directory's config.json, as training reads it from the model's config;
    None for a tokenizer-only directory (training then assumes 2048)."""
    import json

    try:
        value = json.loads((path / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


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
    """A run directory (docs/architecture.md: config.yaml, data.json, metrics.jsonl, checkpoints/, model/, eval/),
    with its fine-tuned model loaded on first use. A Run is path-like: pass it wherever a run directory goes."""

    def __init__(self, path: str | Path):
        self.dir = RunDir.open(path)
        self.path = self.dir.path
        self._loaded = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Config:
        return self.dir.config

    @property
    def metrics(self) -> list[dict]:
        return self.dir.metrics

    @property
    def data_summary(self) -> dict:
        return self.dir.data_summary

    def load_model(self, device: str | None = None, dtype: str | None = None):
        """(model, tokenizer, renderer) of the fine-tuned model, cached on the Run."""
        if self._loaded is None:
            from tunesmith.evaluation.generate import load_run_model

            self._loaded = load_run_model(self.dir, device=device, dtype=dtype)
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
    max_pending, max_batch, max_body_bytes, device, dtype, adapter_roots (the folders POST /v1/adapters may load
    runs from, besides `watch` and `runs`); for fine-tuning as a service: jobs_dir (turns on the files and
    fine-tuning jobs API and the dashboard), workers, job_overrides (KEY=VALUE items for every job's run), keys_file
    (API keys of several tenants), max_file_bytes, max_queued_jobs. See tunesmith.serving and tunesmith.jobs."""
    from tunesmith.serving import serve as _serve

    _serve(list(runs), base, host=host, port=port, api_key=api_key, log=log, **options)


def jobs_client(url: str | None = None, api_key: str | None = None):
    """A client of a `tunesmith serve --jobs-dir` server's files and fine-tuning jobs API (standard library only):
    upload, wait_for_file, create_job, list_jobs, job, cancel, events. See tunesmith.jobs.client."""
    from tunesmith.jobs.client import JobsClient

    return JobsClient(url, api_key)


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
    batch_size: int | str | None = None,
    max_new_tokens: int | None = None,
    quiet: bool = False,
    probe_limit: int | None = None,
    answer_format: str | None = None,
    knn_shots: int | str | None = None,
    select: bool | None = None,
    select_limit: int | None = None,
    allow_missing_labels: bool = False,
    dtype: str | None = None,
    progress=None,
) -> dict:
    """Task metrics of the fine-tuned model vs the base model prompted zero-shot, few-shot (`shots` training
    examples, every label covered) and with the best prompt chosen on the validation split (`select`: zero-shot,
    a format instruction, random or `knn_shots` retrieved shots, calibrated label scoring; tried on `select_limit`
    validation examples), on `data` (default: the run's data.test). Writes RUN_DIR/eval/task.json and task_examples.jsonl
    (docs/eval-format.md) and returns task.json's content; with `forgetting`, also the general-ability probe
    (eval/forgetting.json, under the key "forgetting" of the result).
    `dtype` (auto, float32, bfloat16, float16; default: the run's model.dtype) is what both models are loaded in;
    auto is bfloat16 where the device computes it natively, float32 elsewhere (task.json records it).
    Unset arguments come from the run's `eval:` config section. `probe_limit` caps the forgetting probe's questions
    (spread over its categories; default: `limit`, i.e. the whole probe when no limit is given). `answer_format`
    (default: eval.format) is a regular expression generated answers should match in full: adds `format_rate`.
    `progress`: a tunesmith.progress.Progress to report to (the CLI passes progress bars); quiet: none."""
    from tunesmith.evaluation.task_eval import evaluate_run
    from tunesmith.progress import Progress

    return evaluate_run(
        run,
        data=data,
        metric=metric,
        by=by,
        shots=shots,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        answer_format=answer_format,
        forgetting=forgetting,
        probe_limit=probe_limit,
        knn_shots=knn_shots,
        select=select,
        select_limit=select_limit,
        allow_missing_labels=allow_missing_labels,
        dtype=dtype,
        progress=Progress(None) if quiet or progress is None else progress,
        log=log,
    )


def sweep(
    recipe: str | Path,
    *,
    trials: int | None = None,
    budget: str | None = None,
    objective: str | None = None,
    pruner: str | None = None,
    output: str | Path | None = None,
    progress=None,
    log=print,
    **overrides: Any,
) -> Path:
    """Search the recipe's hyperparameters with Optuna (`tunesmith sweep`); returns the sweep folder. Unset
    arguments come from the recipe's `sweep:` section; `overrides` are dotted config keys as in `train`. Trial 0 is
    the recipe as written; the winner is written to DIR/best.yaml and evaluated once on the test split. Calling it
    again with the same folder resumes. `progress`: a callable making a tunesmith.progress.Progress per trial
    (the CLI passes RichProgress); None: no bars. See tunesmith.sweep.runner."""
    from tunesmith.sweep.runner import run_sweep

    return run_sweep(
        recipe,
        overrides_=list(overrides.items()),
        trials=trials,
        budget=budget,
        objective=objective,
        pruner=pruner,
        output=output,
        progress_factory=progress,
        log=log,
    )


def report(run_dir: str | Path, out: str | Path | None = None, open_browser: bool = False) -> Path:
    """Write RUN_DIR/report.html (or `out`): one self-contained page with the training curves, the task metrics of
    the prompted base model vs the fine-tuned one, confusion matrices, forgetting, flipped examples and the config.
    Eval files that are missing are named in the page with the command that makes them. Returns the page's path.
    For a sweep folder (tunesmith sweep): the sweep's page (trials, best config, Pareto front, test comparison)."""
    from tunesmith.evaluation.report_html import write_report
    from tunesmith.sweep.report import is_sweep_dir, write_sweep_report

    if is_sweep_dir(run_dir):
        path = write_sweep_report(run_dir, out)
    else:
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
    llama_cpp: bool = False,
    log=print,
) -> dict:
    """Export a run's model into the directory `out`, then check it against the run (see tunesmith.exporting).

    merge=True (format "safetensors"): a merged Hugging Face model dir; format="gguf": one GGUF file (quant f16,
    q8_0 or f32; merged first; llama_cpp=True also runs it in llama.cpp, needs xllamacpp); adapter_only=True: the
    peft adapter. Returns the equivalence figures (also in
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
    return export_run(run_dir, out, kind=kind, quant=quant or "f16", force=force, llama_cpp=llama_cpp, log=log)
