"""Dequantize a GGUF file once into a float32 safetensors Hugging Face directory, and prove the copy right.

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`) but the model it returns is marked as
quantized and refuses `save_pretrained`. So we build a plain model from the same config (without its
`quantization_config`), copy the weights in, and save that with the tokenizer (which carries the chat
template) and a generation config. Before the directory is published we reload it and check that tied
embeddings are still tied and that greedy decoding matches the GGUF-loaded model token for token.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from tunesmith.atomic import atomic_dir
from tunesmith.errors import ModelError
from tunesmith.models.cache import remove_stale_tmp, write_marker
from tunesmith.models.util import Report, force_offline, progress_bars, step

PROBE_QUESTION = "What is the capital of France?"
PROBE_TEXT = "The capital of France is"
PROBE_NEW_TOKENS = 8


def convert_gguf(gguf_path: Path, target: Path, provenance: dict, report: Report, bars: bool = True) -> Path:
    """Write the dequantized model of `gguf_path` to `target` atomically; return `target`."""
    force_offline()
    import torch

    remove_stale_tmp(target)
    with progress_bars(bars), torch.no_grad():
        with step(report, f"dequantizing {gguf_path.name} (transformers)"):
            quantized, tokenizer = _read_gguf(gguf_path)
        probe = _probe_ids(tokenizer)
        reference = _greedy(quantized, probe)
        model = _plain_copy(quantized)
        del quantized  # one float32 copy at a time: gemma3-270m is 1 GB per copy

        with step(report, f"saving and checking the float32 copy in {target}"), atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del model
            _check_copy(tmp, tokenizer, probe, reference)
            write_marker(tmp, provenance)  # last: its presence is what marks the directory complete
    return target


def _read_gguf(gguf_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as e:
        import transformers

        raise ModelError(
            f"{gguf_path}: transformers {transformers.__version__} cannot load this GGUF file: {e}"
        ) from None
    return model.eval(), tokenizer


def _plain_copy(quantized):
    """The same weights in an ordinary (not "quantized") model that save_pretrained accepts."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # every weight is overwritten by the strict load below, so skip the random init (7 s for gemma3-270m)
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # skipped along with the init; the check below proves it took
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = GenerationConfig.from_model_config(model.config)
    _check_tied(model, "the converted model")
    return model.eval()


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # moved between versions; random init is only slower
        return contextlib.nullcontext()
    return no_init_weights()


def _check_copy(folder: Path, tokenizer, probe: list[int], reference: list[int]) -> None:
    """Reload the saved directory and compare with the GGUF-loaded model; raise rather than publish a bad copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    _check_tied(reloaded, "the saved copy")
    text = _probe_text(tokenizer)
    if (
        AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
        != tokenizer(text, add_special_tokens=False)["input_ids"]
    ):
        raise ModelError(f"the tokenizer saved in {folder} tokenizes differently from the GGUF's; not caching it")
    got = _greedy(reloaded, probe)
    if got != reference:
        raise ModelError(
            f"the converted model generates {got} where the GGUF-loaded model generates {reference}; not caching it"
        )


def _check_tied(model, what: str) -> None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(config, "tie_word_embeddings", False):
        return
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
        raise ModelError(f"{what} lost its tied embeddings (lm_head is no longer embed_tokens)")


def _probe_text(tokenizer) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": PROBE_QUESTION}], tokenize=False, add_generation_prompt=True
        )
    return PROBE_TEXT


def _probe_ids(tokenizer) -> list[int]:
    # a chat template writes its own BOS where the model wants one; raw text gets the tokenizer's specials
    return tokenizer(_probe_text(tokenizer), add_special_tokens=not tokenizer.chat_template)["input_ids"]


def _greedy(model, ids: list[int]) -> list[int]:
    import torch

    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=PROBE_NEW_TOKENS,
        min_new_tokens=PROBE_NEW_TOKENS,  # compare a full 8 tokens even if one model would stop early
        do_sample=False,
        pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id,
    )
    return out[0, len(ids) :].tolist()
