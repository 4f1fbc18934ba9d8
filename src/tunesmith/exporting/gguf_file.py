"""Write a merged (plain transformers) model as a GGUF file that llama.cpp loads, with the `gguf` library.

What follows llama.cpp's convert_hf_to_gguf.py, per architecture:
- Llama (LlamaForCausalLM, e.g. SmolLM2): the q_proj/k_proj weights are permuted from Hugging Face's
  rotate-half rope layout to the interleaved layout llama.cpp's rope expects (`_permute`); the metadata
  carries the rope dimension and frequency base.
- Mistral (MistralForCausalLM): llama.cpp runs it as the llama architecture (as convert_hf_to_gguf.py writes it),
  which has no sliding window: a model whose window is shorter than its context is refused.
- Qwen2 and Qwen3 (Qwen2ForCausalLM, Qwen3ForCausalLM): no permutation (llama.cpp runs them with NEOX rope, Hugging
  Face's layout); Qwen2's q/k/v biases and Qwen3's per-head q/k RMSNorms are written under their llama.cpp names.
  A model with `use_sliding_window` is refused (llama.cpp's graphs for both attend to the whole context), and so is
  a Qwen3 whose head_dim is not hidden_size / heads (every released one): transformers' GGUF reader, which the
  check uses, ignores that key for Qwen3.
- Phi-3 (Phi3ForCausalLM): the fused qkv_proj and gate_up_proj are written as they are (attn_qkv, and ffn_up,
  which llama.cpp's phi3 graph splits into gate and up), NEOX rope over head_dim x partial_rotary_factor
  dimensions; the long-context rope scalings (longrope, su) and a sliding window are refused.
- Gemma 3 (Gemma3ForCausalLM): the RMSNorm weights are stored +1, since Gemma computes x * (1 + w) and llama.cpp
  x * w; no permutation (llama.cpp runs Gemma with NEOX rope, Hugging Face's layout). Settings that llama.cpp
  fixes for the architecture (one global layer in six, local rope base 10000, attention scale 1/sqrt(head_dim))
  are checked, and a model that differs is refused rather than exported into a file that computes something else.
Tensor names come from gguf-py's own maps (`gguf.get_tensor_name_map`). A tied output layer is not written:
llama.cpp uses the token embedding when `output.weight` is absent.

Quantization: `f32`, `f16` or `q8_0` for the matrices; 1-D tensors (norms, biases) stay f32 as in llama.cpp;
a matrix whose rows are not a multiple of the 32-value Q8_0 block falls back to f16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from tunesmith.errors import ModelError

QUANTS = ("f32", "f16", "q8_0")
SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma3ForCausalLM": "gemma3",
}


def architecture(model) -> str:
    name = type(model).__name__
    if name not in SUPPORTED:
        raise ModelError(
            f"GGUF export supports {', '.join(SUPPORTED)}; this model is {name}. "
            "Export it with --merge (a Hugging Face directory) and convert that with llama.cpp's convert_hf_to_gguf.py"
        )
    return SUPPORTED[name]


def write_gguf(model, vocab, path: Path, quant: str, name: str, log: Callable[[str], None] = print) -> dict:
    """Write `model` (a plain, merged transformers model) with `vocab` (vocab.GGUFVocab) to `path`."""
    import gguf
    import torch

    if quant not in QUANTS:
        raise ModelError(f"unknown GGUF quantization {quant!r}; use one of {', '.join(QUANTS)}")
    arch = architecture(model)
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    {"llama": _llama_metadata, "qwen2": _qwen_metadata, "qwen3": _qwen_metadata, "phi3": _phi3_metadata}.get(
        arch, _gemma3_metadata
    )(writer, config)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[quant]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tied = _is_tied(model)
    counts: dict[str, int] = {}
    with torch.no_grad():
        state = model.state_dict()
        for hf_name, tensor in state.items():
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp reads the tied output layer from token_embd
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ModelError(f"GGUF export: no llama.cpp tensor name for {hf_name!r} ({arch})")
            data = tensor.detach().to(torch.float32).cpu().numpy()
            if arch == "llama":
                data = _llama_tensor(hf_name, data, config)
            elif arch == "gemma3":
                data = _gemma3_tensor(hf_name, data)
            data, qtype = _quantize(data, quant)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    log(f"writing {sum(counts.values())} tensors ({', '.join(f'{n} {k}' for k, n in counts.items())}) to {path.name}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return {"architecture": arch, "quant": quant, "tensors": counts, "bytes": path.stat().st_size}


# ---- architectures -------------------------------------------------------------------------------------------


def _rope(config) -> tuple[float, dict]:
    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params:  # per layer type (Gemma 3)
        return params["full_attention"].get("rope_theta", 10000.0), params
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return theta, params


def _block_metadata(writer, config) -> None:
    """The transformer-shape keys both architectures write the same way."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _llama_metadata(writer, config) -> None:
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise ModelError(
            f"GGUF export: this {type(config).__name__.removesuffix('Config')} model attends within a sliding window "
            f"of {window} tokens (context {config.max_position_embeddings}); llama.cpp runs it as the llama "
            "architecture, without a window, so the file would compute something else beyond it"
        )
    _rope_and_heads(writer, config)


def _qwen_metadata(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if config.model_type == "qwen3" and head_dim != config.hidden_size // config.num_attention_heads:
        # llama.cpp reads attention.key_length, but transformers' GGUF reader (5.23), which the export check loads the
        # file with, does not map it for qwen3 and builds head_dim = hidden_size / heads: the check cannot run
        raise ModelError(
            f"GGUF export of Qwen3 with head_dim {head_dim} != hidden_size / heads "
            f"({config.hidden_size} / {config.num_attention_heads}) is not supported: the export check reads the file "
            "back with transformers' GGUF loader, which ignores Qwen3's head_dim. Export it with --merge and convert "
            "that with llama.cpp's convert_hf_to_gguf.py"
        )
    if getattr(config, "use_sliding_window", False):
        raise ModelError(
            f"GGUF export: this {config.model_type} model uses a sliding window (use_sliding_window), which "
            "llama.cpp's graph for it does not apply"
        )
    _rope_and_heads(writer, config)


def _phi3_metadata(writer, config) -> None:
    if getattr(config, "sliding_window", None) is not None and config.sliding_window < config.max_position_embeddings:
        raise ModelError(
            f"GGUF export: this phi3 model attends within a sliding window of {config.sliding_window} tokens; "
            "writing that for llama.cpp is not supported yet"
        )
    params = getattr(config, "rope_parameters", None) or {}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    _rope_and_heads(writer, config, rope_dims=int(head_dim * partial))


def _rope_and_heads(writer, config, rope_dims: int | None = None) -> None:
    """Shape, head and rope keys of the llama-like architectures (llama, qwen2, qwen3, phi3)."""
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_vocab_size(config.vocab_size)
    _block_metadata(writer, config)
    writer.add_rope_dimension_count(rope_dims or head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, params = _rope(config)
    writer.add_rope_freq_base(theta)
    rope_type = params.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(params["factor"])
    elif rope_type != "default":
        raise ModelError(
            f"GGUF export: rope scaling {rope_type!r} of this {config.model_type} model is not supported yet"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ModelError(
            f"GGUF export: llama.cpp's {config.model_type} graph uses SiLU, this model {config.hidden_act}"
        )


def _gemma3_metadata(writer, config) -> None:
    head_dim = config.head_dim
    _check_gemma3(config, head_dim)
    _block_metadata(writer, config)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope(config)[0])
    writer.add_sliding_window(config.sliding_window)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _check_gemma3(config, head_dim: int) -> None:
    """Refuse what llama.cpp's gemma3 graph cannot express (it hard-codes these for the architecture)."""
    problems = []
    if getattr(config, "attn_logit_softcapping", None):
        problems.append("attention logit soft-capping (removed in Gemma 3; llama.cpp ignores it)")
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        problems.append(f"query_pre_attn_scalar={scalar} != head_dim={head_dim} (llama.cpp scales by 1/sqrt(head_dim))")
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    if list(getattr(config, "layer_types", expected)) != expected:
        problems.append("layer_types other than one global layer in six (llama.cpp's fixed Gemma 3 pattern)")
    params = getattr(config, "rope_parameters", None) or {}
    local = params.get("sliding_attention", {})
    if local.get("rope_theta", 10000.0) != 10000.0:
        problems.append(f"local rope base {local.get('rope_theta')} (llama.cpp uses 10000 for sliding layers)")
    for kind in ("full_attention", "sliding_attention"):
        if params.get(kind, {}).get("rope_type", "default") != "default":
            problems.append(f"rope scaling on {kind} layers")
    if problems:
        raise ModelError(
            "GGUF export: this Gemma 3 model has settings llama.cpp cannot represent: " + "; ".join(problems)
        )


def _llama_tensor(name: str, data: np.ndarray, config) -> np.ndarray:
    heads = config.num_attention_heads
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return _permute(data, heads, heads)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return _permute(data, heads, config.num_key_value_heads)
    return data


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """Hugging Face's rope layout -> llama.cpp's (convert_hf_to_gguf.py LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _gemma3_tensor(name: str, data: np.ndarray) -> np.ndarray:
    if name.endswith("norm.weight"):
        return data + 1.0  # Gemma's RMSNorm computes x * (1 + w); llama.cpp's computes x * w
    return data


def _quantize(data: np.ndarray, quant: str):
    import gguf
    from gguf import GGMLQuantizationType as Q

    if data.ndim <= 1 or quant == "f32":
        return np.ascontiguousarray(data, dtype=np.float32), Q.F32
    if quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(data, Q.Q8_0), Q.Q8_0
    return np.ascontiguousarray(data, dtype=np.float16), Q.F16


def _is_tied(model) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and emb is not None and out.weight.data_ptr() == emb.weight.data_ptr()
