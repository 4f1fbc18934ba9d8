"""Where things are inside a decoder-only transformer: its blocks, their attention and MLP, its linear layers.

Hugging Face architectures name these differently (Llama `model.layers.N.self_attn.q_proj`, GPT-2
`transformer.h.N.attn.c_attn`, Falcon `transformer.h.N.self_attention.query_key_value`), so the methods
find them by structure rather than from a per-architecture table: the blocks are the ModuleList with one
entry per hidden layer, and attention / MLP are the block's children with the usual names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from tunesmith.errors import ConfigError

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


@dataclass(frozen=True)
class Blocks:
    prefix: str  # e.g. "model.layers": block i is f"{prefix}.{i}"
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)


def base_of(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a peft-wrapped one (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def num_layers(model: nn.Module) -> int | None:
    config = getattr(base_of(model), "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)


def find_blocks(model: nn.Module) -> Blocks:
    """The decoder blocks: the ModuleList whose length is the config's layer count (else the longest one)."""
    model = base_of(model)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"cannot find the transformer blocks of {type(model).__name__}: it has no ModuleList")
    n = num_layers(model)
    exact = [(name, m) for name, m in lists if len(m) == n]
    name, blocks = (exact or sorted(lists, key=lambda nm: -len(nm[1])))[0]
    return Blocks(prefix=name, modules=blocks)


def is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family) is a linear layer with a transposed weight; peft adapts it too
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers, in model order, each once (q_proj, k_proj, ..., lm_head)."""
    names: dict[str, None] = {}
    for full_name, module in base_of(model).named_modules():
        if is_linear(module):
            names.setdefault(full_name.rsplit(".", 1)[-1], None)
    return list(names)


def matches(module_name: str, target: str) -> bool:
    """peft's rule for a list of target names: the full name, or a suffix after a dot."""
    return module_name == target or module_name.endswith("." + target)


def check_targets(model: nn.Module, targets: list[str], key: str) -> None:
    """Raise ConfigError naming every entry of `targets` that matches no linear layer of the model."""
    linear = [n for n, m in base_of(model).named_modules() if is_linear(m)]
    bad = [t for t in targets if not any(matches(n, t) for n in linear)]
    if bad:
        shown = ", ".join(repr(t) for t in bad)
        raise ConfigError(
            f"{key}: {shown} match{'es' if len(bad) == 1 else ''} no linear module of this model; "
            f"its linear modules are: {', '.join(linear_names(model))}"
        )


def child(block: nn.Module, names: tuple[str, ...], kind: str, class_hint: str) -> tuple[str, nn.Module]:
    """A block's attention or MLP submodule, by usual name, else by class name."""
    for name in names:
        if isinstance(getattr(block, name, None), nn.Module):
            return name, getattr(block, name)
    for name, module in block.named_children():
        if class_hint in type(module).__name__.lower():
            return name, module
    found = ", ".join(name for name, _ in block.named_children())
    raise ConfigError(f"cannot find the {kind} of {type(block).__name__} (its children: {found})")


def attention_of(block: nn.Module) -> tuple[str, nn.Module]:
    return child(block, ATTENTION_NAMES, "attention", "attention")


def mlp_of(block: nn.Module) -> tuple[str, nn.Module]:
    return child(block, MLP_NAMES, "MLP", "mlp")


def attention_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers inside the first block's attention (q_proj, k_proj, v_proj, o_proj)."""
    _, attention = attention_of(find_blocks(model).modules[0])
    names: dict[str, None] = {}
    for name, module in attention.named_modules():
        if is_linear(module):
            names.setdefault(name.rsplit(".", 1)[-1], None)
    if not names:
        raise ConfigError("lora.target=attention: the attention of this model has no linear layers; list them")
    return list(names)
