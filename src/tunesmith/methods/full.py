"""Full fine-tuning and partial freezing: no extra parameters, only a choice of which base weights train."""

from __future__ import annotations

import re

from torch import nn

from tunesmith.config import FreezeConfig
from tunesmith.errors import ConfigError
from tunesmith.methods import _arch


def apply_full(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def apply_freeze(model: nn.Module, freeze: FreezeConfig) -> nn.Module:
    """Train the last `freeze.last_n_blocks` blocks and every parameter whose name contains one of `freeze.modules`."""
    blocks = _arch.find_blocks(model)
    n = freeze.last_n_blocks or 0
    if n > len(blocks):
        raise ConfigError(
            f"freeze.last_n_blocks={n} but this model has {len(blocks)} blocks; "
            f"use at most {len(blocks)} (or method=full to train everything)"
        )
    # remove_duplicate=False so a tied weight can be named by either name (`lm_head` finds the tied embedding)
    named = list(model.named_parameters(remove_duplicate=False))
    unmatched = [m for m in freeze.modules if not any(m in name for name, _ in named)]
    if unmatched:
        raise ConfigError(
            f"freeze.modules: {', '.join(map(repr, unmatched))} match{'es' if len(unmatched) == 1 else ''} no "
            f"parameter name; the parameters are: {', '.join(parameter_patterns(model))}"
        )
    if n == 0 and not freeze.modules:
        raise ConfigError("method=freeze trains nothing: set freeze.last_n_blocks > 0 or list freeze.modules")

    block_prefixes = tuple(f"{blocks.prefix}.{i}." for i in range(len(blocks) - n, len(blocks)))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in named:
        if name.startswith(block_prefixes) or any(m in name for m in freeze.modules):
            p.requires_grad_(True)
    return model


def parameter_patterns(model: nn.Module) -> list[str]:
    """Parameter names with block numbers written N, each once: model.layers.N.mlp.up_proj.weight, ..."""
    seen: dict[str, None] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        seen.setdefault(re.sub(r"\.\d+\.", ".N.", name), None)
    return list(seen)


def tied_note(model: nn.Module) -> str:
    """' (lm_head is tied to embed_tokens: both train)' when a trainable output layer shares its weight."""
    base = _arch.base_of(model)
    out, inp = base.get_output_embeddings(), base.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight or not out.weight.requires_grad:
        return ""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in base.named_modules()}
    return f" ({names[id(out)]} is tied to {names[id(inp)]}: both train)"
