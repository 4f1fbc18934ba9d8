"""The architectures people fine-tune, each as a tiny randomly initialised model (no download) with the SmolLM2
tokenizer: Llama, Qwen2, Qwen3, Mistral, Phi-3 and Gemma 3 go through LoRA and full training, a resume that ends
where an uninterrupted run ends, a merged export that plain transformers reloads with the run's logits, a GGUF
export run in real llama.cpp (xllamacpp) against tunesmith's own greedy decoding, an evaluation, and serving.

The configs keep what distinguishes each family (Qwen2's q/k/v biases, Qwen3's per-head q/k norms and explicit
head_dim, Phi-3's fused qkv and gate_up projections, Gemma 3's sliding-window layers, norm offset and scaled
embeddings, untied output layers where the family has them) and shrink the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunesmith
from conftest import TOKENIZER_DIR, build_tiny_model
from test_train import write_chat_data
from tunesmith.errors import ModelError
from tunesmith.training.loop import TrainHooks

torch.set_num_threads(1)

PROMPT = [{"role": "user", "content": "ticket 7: refund invoice please"}]


def _tiny(arch: str, path: Path) -> Path:
    """A tiny model of the family `arch`, saved with the SmolLM2 tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    if arch == "llama":
        return build_tiny_model(path)
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config, cls = {
        "qwen2": (lambda: transformers.Qwen2Config(**common), "Qwen2ForCausalLM"),
        "qwen3": (lambda: transformers.Qwen3Config(**common, head_dim=16), "Qwen3ForCausalLM"),
        "mistral": (
            lambda: transformers.MistralConfig(**common, head_dim=8, sliding_window=None),
            "MistralForCausalLM",
        ),
        "phi3": (lambda: transformers.Phi3Config(**common), "Phi3ForCausalLM"),
        # 6 layers so one is global (llama.cpp's fixed 1-in-6 pattern); a window of 8 tokens the prompts exceed
        "gemma3": (
            lambda: transformers.Gemma3TextConfig(
                **{**common, "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1},
                head_dim=256,  # = query_pre_attn_scalar, as in every Gemma 3 (llama.cpp scales by 1/sqrt(head_dim))
                query_pre_attn_scalar=256,
                sliding_window=8,
            ),
            "Gemma3ForCausalLM",
        ),
    }[arch]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config())
    with torch.no_grad():  # random norms and biases, so a dropped or misplaced one cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0 if arch == "gemma3" else 1.0, 0.3)  # Gemma's norms compute x * (1 + w)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class StopAt(TrainHooks):
    def __init__(self, step: int):
        self.step = step

    def stop_reason(self, step, plan):
        return "stopped by the test" if step == self.step else None


def _train(model_dir: Path, data: Path, out: Path, method: str, resume_at: int | None = None) -> tunesmith.Run:
    overrides = {
        "model.name": str(model_dir),
        "data.train": str(data),
        "data.max_length": 64,
        "output": str(out),
        "method": method,
        "train.max_steps": 4,
        "train.save_every": 2,
        "train.batch_size": 4,
        "train.lr": 2e-2,
        "train.seed": 0,
        "train.threads": 1,
        "lora.r": 4,
    }
    quiet = {"quiet": True, "log": lambda *_: None}
    if resume_at is None:
        return tunesmith.train(None, **quiet, **overrides)
    from tunesmith.errors import Stopped

    with pytest.raises(Stopped):
        tunesmith.train(None, **quiet, hooks=StopAt(resume_at), **overrides)
    assert not (out / "model").exists() and (out / "checkpoints" / f"step-{resume_at}").is_dir()
    return tunesmith.train(resume=out, **quiet)


def _weights(run: tunesmith.Run) -> dict:
    model_dir = run.path / "model"
    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no weights in {model_dir}"
    return {k: v for f in files for k, v in load_file(f).items()}


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"]
# what the GGUF export refuses, and the reason its message gives
GGUF_REFUSED = {"qwen3": r"Qwen3 with head_dim 16 != hidden_size / heads \(32 / 4\) is not supported"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("arch-data")
    return write_chat_data(root / "train.jsonl", 16), write_chat_data(root / "test.jsonl", 4, seed=1)


# llama (the default model's layout), qwen3 and gemma3 (the other built-in model) in the default suite; the rest,
# ~25 s each on 2 cores, marked long (`make test-long`, run by CI)
LONG_ARCHS = {"qwen2", "mistral", "phi3"}


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.long) if a in LONG_ARCHS else a for a in ARCHS])
def test_architecture_trains_resumes_exports_evaluates_and_serves(arch, data, tmp_path):
    from transformers import AutoModelForCausalLM

    train, test = data
    model_dir = _tiny(arch, tmp_path / "tiny")
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = base.config.bos_token_id, *range(100, 120)
    ids = [i for i in ids if i is not None]

    # LoRA: an uninterrupted run, and one stopped after its step-2 checkpoint and resumed, end with the same weights
    lora = _train(model_dir, train, tmp_path / "lora", "lora")
    resumed = _train(model_dir, train, tmp_path / "resumed", "lora", resume_at=2)
    straight, again = _weights(lora), _weights(resumed)
    assert straight.keys() == again.keys() and any("lora_A" in k for k in straight)
    for k in straight:
        assert torch.equal(straight[k], again[k]), f"{arch}: {k} differs after resume"
    tuned = _logits(lora.load_model(device="cpu")[0], ids)
    assert (tuned - _logits(base, ids)).abs().max() > 1e-2  # the adapter changed the model

    # full fine-tuning: model/ is a complete model that transformers loads alone, with the run's logits
    full = _train(model_dir, train, tmp_path / "full", "full")
    reloaded = AutoModelForCausalLM.from_pretrained(full.path / "model").eval()
    assert type(reloaded) is type(base)
    assert (_logits(reloaded, ids) - _logits(base, ids)).abs().max() > 1e-2

    # merged export: plain transformers reloads it with the LoRA run's logits
    merged = tunesmith.export(lora, tmp_path / "merged", merge=True, log=lambda *_: None)
    assert merged["passed"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(plain) is type(base) and not hasattr(plain, "peft_config")
    assert (_logits(plain, ids) - tuned).abs().max() < 1e-4

    # GGUF (f32) in real llama.cpp: greedy tokens equal tunesmith's, or first differ at a near-tie of its logits
    if arch in GGUF_REFUSED:
        with pytest.raises(ModelError, match=GGUF_REFUSED[arch]):
            tunesmith.export(lora, tmp_path / "gguf", format="gguf", quant="f32", log=lambda *_: None)
        assert not (tmp_path / "gguf").exists()
    else:
        gguf = tunesmith.export(lora, tmp_path / "gguf", format="gguf", quant="f32", log=lambda *_: None)
        assert gguf["passed"] and gguf["greedy_identical"]
        _same_in_llama_cpp(lora, tmp_path / "gguf" / gguf["gguf"]["file"], arch)

    # evaluation: base zero-shot and the tuned model on 4 held-out tickets, as the eval file records them
    result = tunesmith.evaluate(lora, data=str(test), shots=0, forgetting=False, quiet=True, log=lambda *_: None)
    assert result["task"] == "classification" and result["data"]["examples"] == 4
    systems = {s["key"]: s["metrics"]["accuracy"] for s in result["systems"]}
    assert {"base_zero_shot", "fine_tuned"} <= set(systems) and all(0 <= v <= 1 for v in systems.values())
    assert json.loads((lora.path / "eval" / "task.json").read_text())["systems"] == result["systems"]

    # serving: the run's adapter on the base, greedy, answers as run.generate does
    _serves_like_generate(lora)


def _same_in_llama_cpp(run: tunesmith.Run, gguf: Path, arch: str) -> None:
    """llama.cpp's greedy continuation of the check prompts against the run's own float32 logits along it (one
    teacher-forced forward): where llama.cpp first picks another token, the run's two candidates must be a near-tie
    (within 1e-3; f32 weights, so only the order of float operations differs), and there must be such agreement
    on at least the first tokens of every prompt."""
    from llama_cpp_run import LlamaCpp
    from tunesmith.evaluation.generate import prompt_ids
    from tunesmith.exporting.check import PROMPTS

    model, tokenizer, renderer = run.load_model(device="cpu")
    llama = LlamaCpp(gguf)
    try:
        for prompt in PROMPTS:
            ids = prompt_ids(tokenizer, renderer, prompt)
            got = llama.complete(ids, 12)
            assert got.ids, f"{arch}: llama.cpp generated nothing"
            out = _logits(model, ids + got.ids)[len(ids) - 1 : len(ids) + len(got.ids) - 1]
            ours = out.argmax(-1).tolist()
            diverge = next((i for i, (a, b) in enumerate(zip(ours, got.ids)) if a != b), None)
            if diverge is not None:
                margin = (out[diverge, ours[diverge]] - out[diverge, got.ids[diverge]]).item()
                assert margin < 1e-3, f"{arch}: llama.cpp differs at token {diverge} of {prompt!r} (margin {margin})"
            agreed = len(got.ids) if diverge is None else diverge
            logprobs = torch.log_softmax(out[:agreed].double(), -1)[torch.arange(agreed), got.ids[:agreed]]
            # llama.cpp normalises in float32: a sum of V exponentials in float32 is off by up to (V - 1) * 2^-24 of
            # itself, which moves a log-probability by as much (2.9e-3 for this 49,152-token vocabulary; this
            # near-uniform tiny Gemma's log-probabilities of ~-10 were seen 1.3e-3 apart, most under 1e-4)
            tol = 1e-3 + out.shape[-1] * 2.0**-24
            for a, b in zip(logprobs.tolist(), got.logprobs):
                assert abs(a - b) < tol, f"{arch}: llama.cpp's log-probabilities differ: {a} vs {b}"
    finally:
        llama.close()


def _serves_like_generate(run: tunesmith.Run) -> None:
    import httpx

    from test_serve import Server
    from tunesmith.serving import build

    app, registry = build([run.path], log=lambda *_: None, max_tokens=16)
    server = Server(app)
    try:
        models = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]]
        assert len(models) == 2 and models[0] == registry.base_id and models[1].startswith("ft:")
        r = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": models[1], "messages": PROMPT, "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == run.generate(PROMPT, max_new_tokens=8)
    finally:
        server.close()
