"""`tunesmith generate` and `tunesmith chat`: use a run's model."""

from __future__ import annotations

import json
import sys

import click

from tunesmith import api
from tunesmith.errors import DataError
from tunesmith.jsonl import read_objects

_common = [
    click.option("--max-new-tokens", default=256, show_default=True, type=int),
    click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy."),
    click.option("--top-p", default=1.0, show_default=True, type=float),
    click.option("--seed", type=int, help="Sampling seed."),
    click.option(
        "--dtype",
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        help="Precision the model is loaded in (default: the run's model.dtype; auto: bfloat16 where native).",
    ),
]


def common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--prompt", "-p", help="One prompt (a user message).")
@click.option(
    "--file",
    "prompts_file",
    type=click.Path(dir_okay=False, exists=True),
    help='JSONL of prompts: {"prompt": ...} or {"messages": [...]} per line; answers go to stdout as JSONL.',
)
@click.option("--batch-size", default=8, show_default=True, type=int)
@common
def generate(run_dir, prompt, prompts_file, batch_size, **gen):
    """Generate answers with a run's fine-tuned model."""
    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give exactly one of --prompt or --file")
    prompts = None if prompts_file is None else _read_prompts(prompts_file)  # its problems before the model loads
    run = api.load(run_dir)
    run.load_model(dtype=gen.pop("dtype"))
    if prompts is None:
        click.echo(run.generate(prompt, **gen))
        return
    answers = run.generate_batch(prompts, batch_size=batch_size, **gen)
    for p, a in zip(prompts, answers):
        sys.stdout.write(json.dumps({"prompt": p, "answer": a}, ensure_ascii=False) + "\n")


def _read_prompts(path: str) -> list:
    rows, bad = read_objects(path)
    problems = [(n, f"{path}:{n}: {what}; write one JSON object per line") for n, what in bad]
    prompts = []
    for n, row in rows:
        msgs = row.get("messages")
        if isinstance(row.get("prompt"), str) and _is_text(row["prompt"]):
            prompts.append(row["prompt"])
        elif isinstance(msgs, list) and msgs and all(_is_message(m) for m in msgs):
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]  # a full conversation: answer its last user turn
            prompts.append([{"role": m["role"], "content": m["content"]} for m in msgs])  # other keys dropped
        else:
            problems.append(
                (
                    n,
                    f'{path}:{n}: expected {{"prompt": "..."}} or {{"messages": [{{"role": "user", "content": "..."}}, '
                    "...]} with text that is valid Unicode (no lone surrogate such as \\ud800)",
                )
            )
    if problems:
        raise DataError(f"{path}: {len(problems)} problem(s)", [p for _, p in sorted(problems)])
    return prompts


def _is_text(value) -> bool:
    """A string a tokenizer can encode (a lone surrogate, "\\ud800" in JSON, is not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_message(item) -> bool:
    return isinstance(item, dict) and _is_text(item.get("role")) and _is_text(item.get("content"))


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--system", help="System message for the conversation.")
@common
def chat(run_dir, system, **gen):
    """Talk to a run's model (multi-turn, streaming). Empty line or Ctrl-D to quit; /reset to start over."""
    run = api.load(run_dir)
    click.echo("loading model...", err=True)
    run.load_model(dtype=gen.pop("dtype"))
    messages = [{"role": "system", "content": system}] if system else []
    click.echo("chat ready: type a message (/reset to clear, empty line to quit)", err=True)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            break
        if not text.strip():
            break
        if text.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": text})
        click.echo("model> ", nl=False)
        reply = []
        for piece in run.stream(messages, **gen):
            reply.append(piece)
            click.echo(piece, nl=False)
        click.echo()
        messages.append({"role": "assistant", "content": "".join(reply)})
