"""Generation from a run's model: one prompt, a batch of prompts, or a token stream for chat."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterator

import torch


def load_run_model(run_dir: Path, cfg, device: str | None = None):
    """Base model + the run's trained weights, the tokenizer, and a Renderer configured as in training."""
    from tunesmith import methods, models
    from tunesmith.data.templates import Renderer
    from tunesmith.errors import RunError

    model_dir = Path(run_dir) / "model"
    if not model_dir.is_dir():
        raise RunError(
            f"{run_dir}: training has not finished (no model/ folder). "
            f"Continue it with: tunesmith train --resume {run_dir}"
        )
    model, tokenizer = models.load(cfg.model.name, dtype=cfg.model.dtype, device=device or cfg.model.device)
    model = methods.load_trained(model, model_dir)
    model.eval()
    renderer = Renderer(tokenizer, cfg.model.chat_template, cfg.data.system_prompt)
    renderer.raw_prompts = _trained_kind(run_dir) in ("completion", "text")
    return model, tokenizer, renderer


def _trained_kind(run_dir: Path) -> str:
    try:
        return json.loads((Path(run_dir) / "data.json").read_text()).get("kind", "chat")
    except FileNotFoundError:
        return "chat"


def prompt_ids(tokenizer, renderer, prompt: str | list[dict]) -> list[int]:
    """Token ids a model is given: the chat template with a generation prompt, or raw text for runs trained
    on prompt/completion or plain text."""
    if isinstance(prompt, str):
        if getattr(renderer, "raw_prompts", False):
            return tokenizer(prompt, add_special_tokens=True)["input_ids"]
        prompt = [{"role": "user", "content": prompt}]
    return renderer.prompt_ids(prompt, add_generation_prompt=True)


def _gen_kwargs(tokenizer, renderer, max_new_tokens, temperature, top_p, seed) -> dict:
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": renderer.stop_token_ids,
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if renderer.stop_strings:  # end-of-turn markers that are several tokens in this vocabulary
        kwargs.update(stop_strings=list(renderer.stop_strings), tokenizer=tokenizer)
    return kwargs


def _cut(text: str, stop: list[str] | None) -> str:
    for s in stop or []:
        at = text.find(s)
        if at >= 0:
            text = text[:at]
    return text


@torch.no_grad()
def generate_batch(
    model, tokenizer, renderer, prompts: list, max_new_tokens: int = 256, temperature: float = 0.0,
    top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None, batch_size: int = 8,
) -> list[str]:
    """Answers to many prompts, batched with left padding."""
    device = next(model.parameters()).device
    outputs: list[str] = []
    kwargs = _gen_kwargs(tokenizer, renderer, max_new_tokens, temperature, top_p, seed)
    for start in range(0, len(prompts), batch_size):
        encoded = [prompt_ids(tokenizer, renderer, p) for p in prompts[start : start + batch_size]]
        width = max(len(e) for e in encoded)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for row in out[:, width:]:
            outputs.append(_cut(tokenizer.decode(row, skip_special_tokens=True), stop))
    return outputs


def generate(model, tokenizer, renderer, prompt, **kwargs) -> str:
    return generate_batch(model, tokenizer, renderer, [prompt], **kwargs)[0]


def stream(
    model, tokenizer, renderer, messages, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield text pieces as they are generated (generation runs in a background thread)."""
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, renderer, messages)], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = _gen_kwargs(tokenizer, renderer, max_new_tokens, temperature, top_p, seed)
    thread = threading.Thread(
        target=lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs),
        daemon=True,
    )
    thread.start()
    yield from streamer
    thread.join()
