"""Running an exported GGUF file in real llama.cpp, through the `xllamacpp` wheel (a prebuilt llama.cpp CPU build).

The export check reads a GGUF file back with transformers' GGUF loader, which shares no code with our writer but is
not the runtime people use. `tunesmith export --format gguf --llama-cpp` also loads the file in llama.cpp and
greedy-decodes the check prompts there (`check_in_llama_cpp`).

xllamacpp embeds llama.cpp's own server (tools/server) and exposes its OpenAI-style routes as Python methods that
take and return dicts, without a socket round trip: `Server(params).handle_completions({...})`. A completion whose
prompt is a list of token ids feeds exactly those ids (no tokenization, no BOS added); `logprobs: 1` returns the id
and log-probability of every generated token; `temperature: 0` with `top_k: 1` is greedy decoding. A chat
completion renders the messages with the chat template stored in the GGUF and tokenizes with the GGUF's vocabulary.

What may differ, and why: llama.cpp computes with the file's weights (f32, f16 or q8_0) and its own kernels,
tunesmith in float32, and the export check bounds how far the file's weights move the logits (max |logit diff|
t: 0.15 for f16, 3.0 for q8_0, check.TOLERANCES; f32 files differ only in the order of float operations, bounded
here by 5e-4). Two logits each moved by at most t can swap only where the run's margin between them is under 2t.
So the check passes when, for every prompt, llama.cpp's greedy tokens are the run's, or first differ at such a
near-tie of the run's own logits (teacher-forced along llama.cpp's tokens), and llama.cpp's log-probabilities of
the tokens before that are within 2t of the run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ConfigError

# per-logit bound t for each GGUF kind (see the module docstring); a divergence must be at a margin under 2t
F32_BOUND = 5e-4


def available() -> str | None:
    """xllamacpp's version, or None when it is not installed."""
    try:
        import xllamacpp
    except ImportError:
        return None
    return getattr(xllamacpp, "__version__", "unknown version")


def require() -> str:
    """xllamacpp's version; a ConfigError saying how to install it when it is missing."""
    version = available()
    if version is None:
        raise ConfigError(
            "--llama-cpp runs the GGUF file in llama.cpp through the xllamacpp wheel, which is not installed: "
            "pip install xllamacpp (a prebuilt llama.cpp CPU build, no other dependencies), or leave out --llama-cpp"
        )
    return version


@dataclass
class Completion:
    ids: list[int]  # generated token ids, the stop token included if one was generated
    logprobs: list[float]  # llama.cpp's log-probability of each generated token
    finish_reason: str


class LlamaCpp:
    """One GGUF file loaded in llama.cpp (one slot, greedy)."""

    def __init__(self, gguf: str | Path, n_ctx: int = 512, threads: int = 1):
        require()
        import xllamacpp as xlc

        params = xlc.CommonParams()
        params.model.path = str(gguf)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.warmup = False
        params.verbosity = -1
        self.server = xlc.Server(params)

    def complete(self, ids: list[int], max_tokens: int) -> Completion:
        out = self.server.handle_completions(
            {"prompt": list(ids), "max_tokens": max_tokens, "temperature": 0, "top_k": 1, "logprobs": 1}
        )
        if "error" in out:
            raise RuntimeError(f"llama.cpp: {out['error']}")
        choice = out["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        return Completion([c["id"] for c in content], [c["logprob"] for c in content], choice["finish_reason"])

    def chat(self, messages: list[dict], max_tokens: int) -> str:
        out = self.server.handle_chat_completions(
            {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "top_k": 1}
        )
        if "error" in out:
            raise RuntimeError(f"llama.cpp: {out['error']}")
        return out["choices"][0]["message"]["content"]

    def close(self) -> None:
        del self.server  # the server's destructor stops its loop and frees the model


def bound(kind: str) -> float:
    """The per-logit bound t for a GGUF export kind (gguf-f32, gguf-f16, gguf-q8_0)."""
    from tunesmith.exporting.check import TOLERANCES

    return F32_BOUND if kind == "gguf-f32" else TOLERANCES[kind]


def check_in_llama_cpp(model, gguf: str | Path, prompts: list[list[int]], kind: str, new_tokens: int) -> dict:
    """llama.cpp's greedy continuation of each prompt (token ids) against `model` (the run's weights in float32, a
    plain transformers model) along llama.cpp's tokens, one teacher-forced forward per prompt. Per prompt: where
    llama.cpp first chose another token than the model would have (None: the same tokens), the model's logit margin
    between the two there, and the largest |log-prob difference| of llama.cpp's tokens before it. `passed` as in the
    module docstring."""
    import torch

    t = bound(kind)
    llama = LlamaCpp(gguf, n_ctx=max(len(p) for p in prompts) + new_tokens + 8)  # a clear error without the wheel
    rows = []
    try:
        for ids in prompts:
            got = llama.complete(ids, new_tokens)
            with torch.no_grad():
                x = torch.tensor([ids + got.ids])
                out = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
            out = out[len(ids) - 1 : len(ids) + len(got.ids) - 1]
            ours = out.argmax(-1).tolist()
            diverge = next((i for i, (a, b) in enumerate(zip(ours, got.ids)) if a != b), None)
            agreed = len(got.ids) if diverge is None else diverge
            logprobs = torch.log_softmax(out.double(), -1)[torch.arange(agreed), got.ids[:agreed]].tolist()
            margin = None if diverge is None else (out[diverge, ours[diverge]] - out[diverge, got.ids[diverge]]).item()
            rows.append(
                {
                    "prompt_tokens": len(ids),
                    "tokens": len(got.ids),
                    "first_difference": diverge,
                    "margin_there": margin,
                    "max_abs_logprob_diff": max((abs(a - b) for a, b in zip(logprobs, got.logprobs)), default=0.0),
                }
            )
    finally:
        llama.close()
    ok = [
        r["tokens"] > 0
        and r["max_abs_logprob_diff"] <= 2 * t
        and (r["first_difference"] is None or r["margin_there"] <= 2 * t)
        for r in rows
    ]
    return {
        "runtime": f"llama.cpp (xllamacpp {available()})",
        "greedy_new_tokens": new_tokens,
        "near_tie": 2 * t,
        "identical": sum(r["first_difference"] is None for r in rows),
        "prompts": rows,
        "passed": all(ok),
    }


def summary(result: dict) -> str:
    n = len(result["prompts"])
    firsts = [r["first_difference"] for r in result["prompts"] if r["first_difference"] is not None]
    worst = max(r["max_abs_logprob_diff"] for r in result["prompts"])
    return (
        f"llama.cpp check {'passed' if result['passed'] else 'FAILED'}: {result['identical']} of {n} greedy answers "
        f"({result['greedy_new_tokens']} tokens) identical to the run's"
        + (f", the others first differ at tokens {firsts}" if firsts else "")
        + f"; max |log-prob diff| {worst:.3g} (near-tie bound {result['near_tie']:.3g}) in {result['runtime']}"
    )
