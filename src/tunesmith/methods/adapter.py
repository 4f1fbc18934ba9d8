"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), ours because peft has none for causal LMs.

An adapter is `x + up(act(down(x)))` applied to the output of a block's attention (Houlsby only) and of its
MLP (both styles), before the residual add. `up` starts near zero, so an untrained adapter is (almost) the
identity and the adapted model starts as the base model.

How they are inserted: each adapter is registered as a child of the module whose output it transforms
(`model.layers.3.mlp.adapter`) and runs as a forward hook on that module. The base modules are neither
replaced nor wrapped, so the base model's forward code and its state-dict keys are untouched, and the
adapter keys read as where they act (`model.layers.3.mlp.adapter.down.weight`).
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.errors import ModelError
from tunesmith.methods import _arch

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
CHILD_NAME = "adapter"


class BottleneckAdapter(nn.Module):
    def __init__(self, dim: int, bottleneck: int, activation: str, init_scale: float):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.normal_(self.up.weight, std=init_scale)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(x)))
        if torch.is_autocast_enabled(x.device.type):  # bf16-mixed: a bf16 sum would round a small adapter term away
            return x.float() + delta.float()
        return x + delta

    def hook(self, module: nn.Module, args, output):
        # attention modules return (hidden, attn_weights, ...); MLPs return the hidden states
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


def positions(model: nn.Module, style: str) -> list[str]:
    """Full names of the modules whose outputs get an adapter, in model order."""
    blocks = _arch.find_blocks(model)
    out = []
    for i, block in enumerate(blocks.modules):
        if style == "houlsby":
            out.append(f"{blocks.prefix}.{i}.{_arch.attention_of(block)[0]}")
        out.append(f"{blocks.prefix}.{i}.{_arch.mlp_of(block)[0]}")
    return out


def insert_adapters(model: nn.Module, style: str, bottleneck: int, activation: str, init_scale: float) -> list[str]:
    """Add adapters to `model` in place, freeze everything else; returns the adapted positions."""
    if has_adapters(model):
        raise ModelError("this model already has bottleneck adapters; load a fresh base model")
    dim = _hidden_size(model)
    where = positions(model, style)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in where:
        module = model.get_submodule(name)
        ref = next(module.parameters())
        adapter = BottleneckAdapter(dim, bottleneck, activation, init_scale).to(device=ref.device, dtype=ref.dtype)
        module.add_module(CHILD_NAME, adapter)
        module.register_forward_hook(adapter.hook)
    return where


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, BottleneckAdapter) for m in model.modules())


def _hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise ModelError(f"cannot tell the hidden size of {type(model).__name__} from its config")
    return int(size)
