"""Shared fixtures: tiny randomly initialised models with the real SmolLM2 tokenizer.

A tiny model is a real Hugging Face model directory (config + safetensors + tokenizer), so every code path
that loads a user's local model directory is exercised, in well under a second per load.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "smollm2-tokenizer"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# every test measures for itself: no evaluation reuses another test's stored base-model results (evaluation/memo.py;
# tests/test_eval.py turns it on where it tests it)
os.environ.setdefault("TUNESMITH_EVAL_CACHE", "0")
# precision auto means fp32 in the suite whatever the CPU (tests/test_precision.py sets bf16 where it tests it), so
# that exact comparisons hold on every machine; subprocesses inherit it
os.environ.setdefault("TUNESMITH_CPU_BF16", "0")


def build_tiny_model(path: Path, seed: int = 0, layers: int = 2, hidden: int = 32, tied: bool = True) -> Path:
    """Write a tiny Llama-architecture model with the SmolLM2 tokenizer and chat template to `path`. Tied (the
    default, as SmolLM2), its greedy answers mostly repeat the prompt's last token; untied, they depend on the
    prompt."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
