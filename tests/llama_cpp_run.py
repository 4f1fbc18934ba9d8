"""Run a GGUF file in real llama.cpp, through the `xllamacpp` wheel (a prebuilt llama.cpp CPU build, in `[dev]`).

xllamacpp embeds llama.cpp's own server (tools/server) and exposes its OpenAI-style routes as Python methods that
take and return dicts, without a socket round trip: `Server(params).handle_completions({...})`. A completion whose
prompt is a list of token ids feeds exactly those ids (no tokenization, no BOS added); `logprobs: 1` returns the id
and log-probability of every generated token; `temperature: 0` with `top_k: 1` is greedy decoding. A chat
completion renders the messages with the chat template stored in the GGUF and tokenizes with the GGUF's vocabulary,
so it also exercises the tokenizer metadata the exporter wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Completion:
    ids: list[int]  # generated token ids, the stop token included if one was generated
    logprobs: list[float]  # llama.cpp's log-probability of each generated token
    finish_reason: str


class LlamaCpp:
    """One GGUF file loaded in llama.cpp (1 thread, one slot, greedy)."""

    def __init__(self, gguf: Path, n_ctx: int = 512):
        xlc = pytest.importorskip("xllamacpp", reason="llama.cpp's Python wheel (pip install xllamacpp)")
        params = xlc.CommonParams()
        params.model.path = str(gguf)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = 1
        params.cpuparams_batch.n_threads = 1
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
