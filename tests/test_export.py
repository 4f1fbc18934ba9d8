"""tunesmith export: merged HF dirs, GGUF files (tiny Llama and tiny Gemma 3) and peft adapters, each checked.

The runs are tiny models trained a few steps with a high learning rate, so the fine-tuned model really differs
from its base (asserted), and a merge that dropped the adapter would fail these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tunesmith
from conftest import TOKENIZER_DIR
from tunesmith.cli import main
from tunesmith.errors import ModelError

torch.set_num_threads(2)


def write_data(path: Path, n: int = 24) -> Path:
    labels = {"billing": "refund invoice", "shipping": "parcel courier", "technical": "crash error"}
    with open(path, "w") as fh:
        for i in range(n):
            label = list(labels)[i % 3]
            msgs = [
                {"role": "user", "content": f"ticket {i}: {labels[label]}"},
                {"role": "assistant", "content": label},
            ]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


def train_run(model_dir: Path, out: Path, data: Path, method: str = "lora", steps: int = 4, **extra) -> Path:
    config = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(data)},
        "output": str(out),
        "method": method,
        "train": {"max_steps": steps, "lr": 2e-2, "batch_size": 8, "seed": 0, **extra.pop("train", {})},
        **extra,
    }
    tunesmith.train(config, quiet=True, log=lambda *a: None)
    return out


def build_tiny_gemma3(path: Path, seed: int = 0) -> Path:
    """A tiny Gemma 3 text model with the SmolLM2 tokenizer: 6 layers so one is global (llama.cpp's 1-in-6
    pattern), a sliding window of 8 tokens that the check prompts exceed, head_dim = query_pre_attn_scalar."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=8,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # random norms, so a wrong +1 shift or a swapped norm cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("export-data") / "train.jsonl")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, data, tmp_path_factory) -> Path:
    return train_run(tiny_model_dir, tmp_path_factory.mktemp("export-runs") / "lora", data)


@pytest.fixture(scope="module")
def gemma_run(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gemma")
    return train_run(build_tiny_gemma3(root / "tiny-gemma3"), root / "run", data)


def run_logits(run_dir: Path, ids: list[int]) -> torch.Tensor:
    model, _, _ = tunesmith.load(run_dir).load_model(device="cpu")
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def base_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=torch.tensor([ids])).logits[0]


def merged_state(run_dir: Path) -> dict:
    model, _, _ = tunesmith.load(run_dir).load_model(device="cpu")
    return model.merge_and_unload().state_dict()


def gguf_fields(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return reader.fields, {t.name: t for t in reader.tensors}


def no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]


IDS = [1, 9690, 314, 253, 1351, 30, 2]  # a few ordinary SmolLM2 token ids


# ---- merged Hugging Face directory -----------------------------------------------------------------------------


def test_merge_writes_a_dir_transformers_loads_alone(lora_run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = tunesmith.export(lora_run, out, merge=True, log=lambda *a: None)

    files = set(result["files"])
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "equivalence.json",
        "README.md",
    } <= files
    assert "adapter_config.json" not in files and "tunesmith.json" not in files
    assert sorted(p.name for p in out.iterdir()) == sorted(files)

    saved = json.loads((out / "equivalence.json").read_text())
    assert saved["passed"] and saved["kind"] == "merge" and saved["compared_in"] == "float64"
    assert saved["tolerance"] == 4 * saved["float32_floor"] > 0
    assert saved["max_abs_logit_diff"] <= saved["tolerance"] and saved["greedy_identical"]
    assert saved["tokenizer"]["same_ids"] and saved["tokenizer"]["same_chat_template_output"]
    assert len(saved["prompts"]) == 3

    # our own comparison, independent of the check: plain transformers vs the run (and vs the base model)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged).__name__ == "LlamaForCausalLM" and not hasattr(merged, "peft_config")
    with torch.no_grad():
        got = merged(input_ids=torch.tensor([IDS])).logits[0]
    assert (got - run_logits(lora_run, IDS)).abs().max().item() < 1e-4
    assert (got - base_logits(tiny_model_dir, IDS)).abs().max().item() > 1e-2  # the adapter really is in there

    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    card = (out / "README.md").read_text()
    assert "method: lora (r=" in card and "base_model:" in card
    assert "steps: 4; last training loss: " in card and "21 training examples, 3 validation examples" in card
    assert "last validation loss: n/a" not in card and "max |logit difference|" in card


@pytest.mark.parametrize(
    "method, extra",
    [
        ("dora", {"lora": {"r": 4}}),
        ("ia3", {}),
        ("full", {}),
        ("freeze", {"freeze": {"last_n_blocks": 1}}),
    ],
)
def test_merge_other_mergeable_methods(method, extra, tiny_model_dir, data, tmp_path):
    run = train_run(tiny_model_dir, tmp_path / "run", data, method=method, steps=3, **extra)
    result = tunesmith.export(run, tmp_path / "out", merge=True, log=lambda *a: None)
    assert result["passed"] and result["max_abs_logit_diff"] <= 1e-4 and result["method"] == method
    from transformers import AutoModelForCausalLM

    # our own comparison, independent of the exporter's check: plain transformers vs the run as tunesmith loads it
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        got = merged(input_ids=torch.tensor([IDS])).logits[0]
    assert (got - run_logits(run, IDS)).abs().max().item() < 1e-4
    assert (got - base_logits(tiny_model_dir, IDS)).abs().max().item() > 1e-3  # the training is in there


def test_merge_check_scales_with_the_model_and_still_catches_a_wrong_merge(data, tmp_path, monkeypatch, capsys):
    """A large adapter on a model with large logits (SmolLM2's reach ~40) merges and passes: compared in float32
    against a fixed 1e-4 it was refused (its float32 rounding alone moves these logits by 1.4e-4). One wrong weight
    in the merged model still fails the check."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_model
    from tunesmith.exporting import source

    model_dir = build_tiny_model(tmp_path / "tiny", layers=4, hidden=64)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30.0)  # tied to the head: logits of ~30, like a real model's
    model.save_pretrained(model_dir)
    run = train_run(model_dir, tmp_path / "run", data)
    weights = run / "model" / "adapter_model.safetensors"  # B x100: an adapter trained long and hard
    save_file({k: v * 100 if "lora_B" in k else v for k, v in load_file(weights).items()}, weights)

    result = tunesmith.export(run, tmp_path / "out", merge=True, log=lambda *a: None)
    assert result["passed"] and result["compared_in"] == "float64" and result["greedy_identical"]
    assert result["max_abs_logit"] > 20
    assert 0 < result["max_abs_logit_diff"] <= result["tolerance"] == 4 * result["float32_floor"]

    real_merged = source.merged

    def one_wrong_weight(src):
        model = real_merged(src)
        with torch.no_grad():
            weight = model.model.layers[0].self_attn.q_proj.weight.view(-1)
            weight[weight.abs().argmax()] *= -1
        return model

    monkeypatch.setattr(source, "merged", one_wrong_weight)
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "wrong")]) == 1
    err = capsys.readouterr().err
    assert "the export does not match the run, so nothing was written" in err
    assert not (tmp_path / "wrong").exists() and not no_leftovers(tmp_path)


# ---- GGUF -------------------------------------------------------------------------------------------------------


def test_gguf_f16_llama_layout_and_metadata(lora_run, tmp_path):
    from tunesmith.exporting.gguf_file import _permute

    out = tmp_path / "gguf"
    result = tunesmith.export(lora_run, out, format="gguf", log=lambda *a: None)
    assert result["passed"] and result["quant"] == "f16" and result["greedy_identical"]
    assert result["max_abs_logit_diff"] <= result["tolerance"] == 0.15
    name = result["gguf"]["file"]
    assert name == "lora-f16.gguf" and sorted(result["files"]) == sorted([name, "equivalence.json", "README.md"])

    fields, tensors = gguf_fields(out / name)
    meta = {
        k: fields[k].contents()
        for k in (
            "general.architecture",
            "llama.block_count",
            "llama.attention.head_count",
            "llama.attention.head_count_kv",
            "llama.rope.dimension_count",
            "llama.embedding_length",
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.eos_token_id",
            "general.file_type",
        )
    }
    assert meta == {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 8,
        "llama.embedding_length": 32,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.eos_token_id": 2,
        "general.file_type": 1,
    }
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert len(fields["tokenizer.ggml.tokens"].data) == 49152 and len(fields["tokenizer.ggml.merges"].data) == 48900
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_gate.weight"} <= set(tensors)
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"

    # Q and K are stored in llama.cpp's rope layout: the merged HF weights, permuted
    hf = merged_state(lora_run)
    for hf_name, gguf_name, kv in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        w = hf[f"model.layers.0.self_attn.{hf_name}.weight"].numpy()
        stored = np.asarray(tensors[f"blk.0.{gguf_name}.weight"].data, dtype=np.float32).reshape(w.shape)
        assert np.abs(stored - _permute(w, 4, kv)).max() < 1e-3
        assert np.abs(stored - w).max() > 1e-2  # the permutation is not the identity here


def test_gguf_q8_0_through_the_cli(lora_run, tmp_path, capsys):
    out = tmp_path / "q8"
    code = main(["export", str(lora_run), "--format", "gguf", "--quant", "q8_0", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "equivalence check passed" in captured.out and "tolerance 3" in captured.out
    saved = json.loads((out / "equivalence.json").read_text())
    assert saved["kind"] == "gguf-q8_0" and saved["passed"] and saved["greedy_identical"]
    assert 0 < saved["max_abs_logit_diff"] <= 3.0  # quantized: not bit-exact, within tolerance
    assert saved["tokenizer"]["passed"] and saved["gguf"]["tensors"] == {"Q8_0": 15, "F32": 5}
    _, tensors = gguf_fields(out / "lora-q8_0.gguf")
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0"


def test_gguf_f32_is_compared_in_float64(gemma_run, tmp_path):
    # the same weights as the run (Gemma's norms stored +1 and read back -1, a float32 rounding of its own)
    result = tunesmith.export(gemma_run, tmp_path / "f32", format="gguf", quant="f32", log=lambda *a: None)
    assert result["passed"] and result["compared_in"] == "float64" and result["greedy_identical"]
    assert result["max_abs_logit_diff"] <= result["tolerance"] == 4 * result["float32_floor"]


def test_gguf_gemma3_stores_norms_plus_one(gemma_run, tmp_path):
    # f16, not q8_0: in a random tiny model the top two logits are often nearly tied, and q8_0 rounding can swap
    # them (measured: greedy outputs differed after 14 tokens, max logit diff 0.40); f16 keeps them (0.018)
    out = tmp_path / "gemma-gguf"
    result = tunesmith.export(gemma_run, out, format="gguf", quant="f16", log=lambda *a: None)
    assert result["passed"] and result["greedy_identical"] and result["gguf"]["architecture"] == "gemma3"
    assert result["max_abs_logit_diff"] < 0.1
    fields, tensors = gguf_fields(out / result["gguf"]["file"])
    assert fields["general.architecture"].contents() == "gemma3"
    assert fields["gemma3.attention.sliding_window"].contents() == 8
    assert fields["gemma3.attention.key_length"].contents() == 256
    assert {
        "blk.0.attn_q_norm.weight",
        "blk.0.attn_k_norm.weight",
        "blk.0.post_attention_norm.weight",
        "blk.0.post_ffw_norm.weight",
        "blk.0.ffn_norm.weight",
    } <= set(tensors)

    hf = merged_state(gemma_run)
    for hf_name, gguf_name in (
        ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
        ("model.layers.2.self_attn.q_norm.weight", "blk.2.attn_q_norm.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ):
        stored = np.asarray(tensors[gguf_name].data, dtype=np.float32)
        assert np.allclose(stored, hf[hf_name].numpy() + 1.0, atol=1e-6)


def test_gemma3_settings_llama_cpp_cannot_express_are_refused():
    from transformers import Gemma3TextConfig

    from tunesmith.exporting.gguf_file import _check_gemma3

    ok = Gemma3TextConfig(num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256)
    _check_gemma3(ok, 256)
    with pytest.raises(ModelError, match=r"query_pre_attn_scalar=128 != head_dim=256"):
        _check_gemma3(Gemma3TextConfig(num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=128), 256)
    with pytest.raises(ModelError, match="one global layer in six"):
        _check_gemma3(
            Gemma3TextConfig(
                num_hidden_layers=2,
                head_dim=256,
                query_pre_attn_scalar=256,
                layer_types=["full_attention", "full_attention"],
            ),
            256,
        )


def test_gguf_refuses_what_llama_cpp_would_compute_differently():
    """Sliding windows llama.cpp's graph would not apply, a Qwen3 head_dim the check's reader ignores, and an
    architecture without a writer: each refused with a ModelError naming it, before anything is written."""
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    from tunesmith.exporting.gguf_file import _llama_metadata, _qwen_metadata, architecture

    with pytest.raises(ModelError, match=r"this Mistral model attends within a sliding window of 4096 tokens"):
        _llama_metadata(None, MistralConfig(sliding_window=4096, max_position_embeddings=32768))
    with pytest.raises(ModelError, match=r"this qwen2 model uses a sliding window \(use_sliding_window\)"):
        _qwen_metadata(None, Qwen2Config(use_sliding_window=True, sliding_window=4096))
    with pytest.raises(ModelError, match=r"Qwen3 with head_dim 128 != hidden_size / heads \(1024 / 16\)"):
        _qwen_metadata(None, Qwen3Config(hidden_size=1024, num_attention_heads=16, head_dim=128))
    with pytest.raises(ModelError, match=r"this model is GPT2LMHeadModel\. Export it with --merge"):
        architecture(type("GPT2LMHeadModel", (), {})())


def test_vocab_matches_llama_cpp_conventions(tokenizer):
    from tunesmith.exporting.vocab import _scores_from_merges, build_vocab

    vocab = build_vocab(tokenizer, 49160, "{{ x }}", False, [2])
    assert vocab.model == "gpt2" and vocab.pre == "smollm" and not vocab.warnings
    assert vocab.tokens[-1] == "[PAD49159]" and vocab.types[-1] == 5  # padded to the model's rows, UNUSED
    assert vocab.types[2] == 3 and vocab.types[1000] == 1  # <|im_end|> CONTROL, an ordinary token NORMAL
    assert vocab.special == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    with pytest.raises(ModelError, match="only 100 embedding rows"):
        build_vocab(tokenizer, 100, None, False, [2])
    # SentencePiece-style scores: earlier merges score higher; tokens no merge makes score lowest
    assert _scores_from_merges(["a", "b", "ab", "abb", "<s>"], ["a b", "ab b"]) == [-3.0, -3.0, 0.0, -1.0, -3.0]


# ---- adapter only -----------------------------------------------------------------------------------------------


def test_adapter_only_copies_peft_files_and_checks_them(lora_run, tmp_path):
    out = tmp_path / "adapter"
    result = tunesmith.export(lora_run, out, adapter_only=True, log=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "equivalence.json",
    ]
    assert (out / "adapter_model.safetensors").read_bytes() == (
        lora_run / "model" / "adapter_model.safetensors"
    ).read_bytes()
    assert result["passed"] and result["max_abs_logit_diff"] == 0.0 and result["adapter"] == "LORA"
    assert "library_name: peft" in (out / "README.md").read_text()


# ---- errors: unmergeable methods, bad flags, bad --out; a failed check leaves nothing -----------------------------


@pytest.mark.parametrize(
    "method, flags, message",
    [
        (
            "prefix",
            ["--merge"],
            r"a prefix run cannot be merged: prefix tuning trains virtual key/value tokens.*--adapter-only",
        ),
        ("prompt", ["--format", "gguf"], r"a prompt run cannot be written as GGUF.*--adapter-only"),
        ("adapter", ["--merge"], r"bottleneck adapters add a nonlinear function.*retrain with method=lora"),
        ("adapter", ["--adapter-only"], r"method=adapter, which has no peft adapter"),
        ("full", ["--adapter-only"], r"method=full, which has no peft adapter.*--merge"),
    ],
)
def test_exports_a_method_cannot_make_are_clear_errors(method, flags, message, tiny_model_dir, data, tmp_path, capsys):
    extra = {"train": {"batching": "pad"}} if method in ("prefix", "prompt") else {}
    run = train_run(tiny_model_dir, tmp_path / "run", data, method=method, steps=1, **extra)
    code = main(["export", str(run), *flags, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    import re

    assert re.search(message, err.replace("\n", " ")), err
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_prompt_tuning_exports_as_adapter(tiny_model_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = train_run(tiny_model_dir, tmp_path / "run", data, method="prompt", steps=2, train={"batching": "pad"})
    result = tunesmith.export(run, tmp_path / "out", adapter_only=True, log=lambda *a: None)
    assert result["passed"] and result["adapter"] == "PROMPT_TUNING"

    # our own comparison: peft alone loads the exported adapter on a fresh base, and computes the run's logits
    # (peft prepends the virtual tokens' logits; both models do, so the whole outputs are compared)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    exported = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    assert type(exported).__name__ == "PeftModelForCausalLM" and exported.peft_config["default"].num_virtual_tokens > 0
    with torch.no_grad():
        got = exported(input_ids=torch.tensor([IDS])).logits[0]
    assert got.shape == run_logits(run, IDS).shape
    assert (got - run_logits(run, IDS)).abs().max().item() < 1e-5
    assert (got[-len(IDS) :] - base_logits(tiny_model_dir, IDS)).abs().max().item() > 1e-3  # the prompt acts


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "{tmp}/nope", "--merge", "--out", "{tmp}/o"], "does not exist"),
        (["export", "{run}", "--out", "{tmp}/o"], "say what to export: --merge"),
        (["export", "{run}", "--merge", "--quant", "q8_0", "--out", "{tmp}/o"], "--quant applies to GGUF exports only"),
        (["export", "{run}", "--merge", "--adapter-only", "--out", "{tmp}/o"], "cannot be combined"),
        (["export", "{run}", "--merge", "--out", "{run}"], "would replace the run directory"),
        (["export", "{run}", "--merge", "--llama-cpp", "--out", "{tmp}/o"], "--llama-cpp runs a GGUF file"),
        (
            ["export", "{run}", "--merge", "--out", "{full}"],
            "already exists and is not empty; choose another --out, or pass --force",
        ),
    ],
)
def test_user_errors_exit_2(args, message, lora_run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    argv = [a.format(tmp=tmp_path, run=lora_run, full=tmp_path / "full") for a in args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "o").exists()


def test_llama_cpp_check_without_the_wheel_is_a_user_error(lora_run, tmp_path, capsys, monkeypatch):
    from tunesmith.exporting import llama_cpp

    monkeypatch.setattr(llama_cpp, "available", lambda: None)
    argv = ["export", str(lora_run), "--format", "gguf", "--llama-cpp", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "pip install xllamacpp" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_gguf_export_checked_in_llama_cpp(lora_run, tmp_path, capsys):
    """--llama-cpp: the GGUF file runs in real llama.cpp and its greedy answers to the check prompts are the run's
    (f32 weights: only the order of float operations differs, so a difference is allowed only at a near-tie of
    1e-3), recorded in equivalence.json; against other weights the same check fails, naming the prompts."""
    pytest.importorskip("xllamacpp", reason="llama.cpp's Python wheel (pip install xllamacpp)")
    from tunesmith.exporting import check
    from tunesmith.exporting.llama_cpp import check_in_llama_cpp

    out = tmp_path / "gguf"
    code = main(["export", str(lora_run), "--format", "gguf", "--quant", "f32", "--llama-cpp", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "llama.cpp check passed" in captured.out
    saved = json.loads((out / "equivalence.json").read_text())
    lc = saved["llama_cpp"]
    assert saved["passed"] and lc["passed"] and lc["near_tie"] == 1e-3 and lc["runtime"].startswith("llama.cpp")
    assert len(lc["prompts"]) == len(check.PROMPTS) and all(r["tokens"] > 0 for r in lc["prompts"])
    assert all(r["max_abs_logprob_diff"] <= 1e-3 for r in lc["prompts"])

    # the same file against another model: the run's weights with noise, run by tunesmith
    model, tokenizer, renderer = tunesmith.load(lora_run).load_model(device="cpu")
    model = model.merge_and_unload().eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    from tunesmith.evaluation.generate import prompt_ids

    prompts = [prompt_ids(tokenizer, renderer, p) for p in check.PROMPTS]
    other = check_in_llama_cpp(model, out / saved["gguf"]["file"], prompts, "gguf-f32", check.NEW_TOKENS)
    assert not other["passed"]
    assert any(
        r["max_abs_logprob_diff"] > 1e-3 or (r["first_difference"] is not None and r["margin_there"] > 1e-3)
        for r in other["prompts"]
    ), other


def test_a_failed_llama_cpp_check_writes_nothing(lora_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("xllamacpp", reason="llama.cpp's Python wheel (pip install xllamacpp)")
    from tunesmith.exporting import llama_cpp

    monkeypatch.setattr(llama_cpp, "F32_BOUND", -1.0)  # nothing can pass: the command must fail and write nothing
    out = tmp_path / "gguf"
    code = main(["export", str(lora_run), "--format", "gguf", "--quant", "f32", "--llama-cpp", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "the export does not match the run, so nothing was written" in err
    assert "llama.cpp check FAILED" in err and not out.exists() and not no_leftovers(tmp_path)


def test_force_replaces_and_a_failed_check_writes_nothing(lora_run, tmp_path, capsys, monkeypatch):
    from tunesmith.exporting import check

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setitem(check.TOLERANCES, "adapter", -1.0)  # no export can pass: the check must fail the command
    code = main(["export", str(lora_run), "--adapter-only", "--out", str(out), "--force"])
    err = capsys.readouterr().err
    assert code == 1 and "the export does not match the run, so nothing was written" in err
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and not no_leftovers(tmp_path)

    monkeypatch.setitem(check.TOLERANCES, "adapter", 1e-5)
    assert main(["export", str(lora_run), "--adapter-only", "--out", str(out), "--force"]) == 0
    assert not (out / "old.txt").exists() and (out / "equivalence.json").is_file() and not no_leftovers(tmp_path)


def test_export_does_not_import_torch_until_called():
    import subprocess
    import sys

    code = "import sys, tunesmith.api, tunesmith.exporting, tunesmith.cli.export; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


# ---- the real default model ---------------------------------------------------------------------------------------


# Prompts for llama.cpp against tunesmith: questions the chat model answers in a few words or a few sentences
LLAMA_PROMPTS = [
    "What is the capital of France?",
    "My card was charged twice for the same order. Can you help?",
    "Write one sentence about the sea.",
    "List three primary colours.",
    "How do I reset my password?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a short tip for sleeping better.",
]
LLAMA_TOKENS = 32


def against_llama_cpp(run, gguf: Path, quant: str, answers: dict[str, str]) -> dict:
    """Greedy decoding of LLAMA_PROMPTS in llama.cpp (the GGUF file) against tunesmith's own greedy answers
    (`answers`, from run.generate) and the run's float32 logits along llama.cpp's tokens (teacher-forced, one
    forward per prompt). Returns, per prompt, the first position where llama.cpp chose another token than the run
    would have (None: the same answer), the run's logit margin between its token and llama.cpp's there, the largest
    |log-prob difference| of llama.cpp's tokens before it, and whether llama.cpp's chat route (the GGUF's own chat
    template and vocabulary) gave tunesmith's text."""
    from llama_cpp_run import LlamaCpp
    from tunesmith.evaluation.generate import prompt_ids

    model, tokenizer, renderer = run.load_model()
    stops = renderer.stop_token_ids
    llama = LlamaCpp(gguf)
    rows = []
    try:
        for prompt in LLAMA_PROMPTS:
            ids = prompt_ids(tokenizer, renderer, prompt)
            got = llama.complete(ids, LLAMA_TOKENS)
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids + got.ids])).logits[
                    0, len(ids) - 1 : len(ids) + len(got.ids) - 1
                ]
            ours = out.argmax(-1).tolist()
            diverge = next((i for i, (a, b) in enumerate(zip(ours, got.ids)) if a != b), None)
            agreed = len(got.ids) if diverge is None else diverge
            logprobs = torch.log_softmax(out.double(), -1)[torch.arange(agreed), got.ids[:agreed]]
            text = tokenizer.decode([i for i in got.ids if i not in stops], skip_special_tokens=True)
            rows.append(
                {
                    "diverge": diverge,
                    "margin": None
                    if diverge is None
                    else (out[diverge, ours[diverge]] - out[diverge, got.ids[diverge]]).item(),
                    "logprob_diff": max((abs(a - b) for a, b in zip(logprobs.tolist(), got.logprobs)), default=0.0),
                    "same_text": text == answers[prompt],
                    "chat_same_text": llama.chat([{"role": "user", "content": prompt}], LLAMA_TOKENS)
                    == answers[prompt],
                    "tokens": len(got.ids),
                }
            )
    finally:
        llama.close()
    return {"quant": quant, "rows": rows, "identical": sum(r["diverge"] is None for r in rows)}


@pytest.mark.slow
@pytest.mark.long  # ~130 s; test_gguf_export_checked_in_llama_cpp runs the same route on a tiny model
def test_real_model_gguf_runs_in_llama_cpp(tmp_path, capsys):
    """SmolLM2-135M-Instruct + LoRA (2 steps) exported to GGUF f16 and q8_0 by the CLI, then run in real llama.cpp
    (xllamacpp) with greedy decoding on 8 prompts (32 tokens), against tunesmith's own greedy answers.

    What may differ, and why: llama.cpp computes with the file's f16 / q8_0 weights (and its own kernels), tunesmith
    in float32, and the export check bounds how far that moves the logits (max |logit diff| 0.15 for f16, 3.0 for
    q8_0; check.TOLERANCES). Two logits each moved by at most t can swap only where the run's margin between them is
    under 2t. So: every prompt where llama.cpp's answer differs must differ first at such a near-tie of the run's
    own logits, llama.cpp's log-probabilities of the tokens before it must be within 2t of the run's, and where the
    tokens agree the text must be tunesmith's text, through llama.cpp's chat route too (GGUF chat template and
    tokenizer). Measured 2026-12-07 (xllamacpp 2026.10.11549, 1 thread, 2-core Xeon): f16 and q8_0 both gave 8 of 8
    answers identical to tunesmith's (max |log-prob diff| 0.010 for f16, 0.57 for q8_0); another 2-step adapter
    (trained with 1 thread) gave f16 7 of 8 (the 8th first differs at token 5) and q8_0 4 of 8 (first differences
    at tokens 1, 2, 5 and 19). f16 must give at least 6 of 8 identical answers."""
    import time

    data = write_data(tmp_path / "train.jsonl", 8)
    run = train_run(
        "smollm2-135m-instruct", tmp_path / "run", data, steps=2, train={"batch_size": 4, "lr": 1e-3}, lora={"r": 8}
    )
    files = {}
    for quant in ("f16", "q8_0"):
        code = main(["export", str(run), "--format", "gguf", "--quant", quant, "--out", str(tmp_path / quant)])
        assert code == 0, capsys.readouterr().err
        saved = json.loads((tmp_path / quant / "equivalence.json").read_text())
        assert saved["passed"] and saved["greedy_identical"] and saved["tokenizer"]["passed"]
        files[quant] = tmp_path / quant / saved["gguf"]["file"]
    fields, tensors = gguf_fields(files["q8_0"])
    assert fields["llama.block_count"].contents() == 30 and fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(tensors) == 272  # as many as the official SmolLM2 GGUF (tied output layer not stored)

    from tunesmith.exporting.check import TOLERANCES

    tuned = tunesmith.load(run)
    answers = {p: tuned.generate(p, max_new_tokens=LLAMA_TOKENS) for p in LLAMA_PROMPTS}
    assert len({a for a in answers.values() if a}) >= 6  # real answers, not one string repeated
    results = {}
    for quant in ("f16", "q8_0"):
        started = time.perf_counter()
        result = against_llama_cpp(tuned, files[quant], quant, answers)
        with capsys.disabled():
            print(
                f"\nllama.cpp {quant}: {result['identical']}/{len(LLAMA_PROMPTS)} greedy answers identical to "
                f"tunesmith's; first divergences {[r['diverge'] for r in result['rows']]}, run's margins there "
                f"{[None if r['margin'] is None else round(r['margin'], 3) for r in result['rows']]}, max |log-prob "
                f"diff| {max(r['logprob_diff'] for r in result['rows']):.3g} ({time.perf_counter() - started:.0f} s)"
            )
        bound = 2 * TOLERANCES[f"gguf-{quant}"]
        for row in result["rows"]:
            assert row["tokens"] > 0 and row["logprob_diff"] <= bound, row
            if row["diverge"] is None:
                assert row["same_text"] and row["chat_same_text"], row
            else:
                assert 0 < row["margin"] <= bound, row
        results[quant] = result
    assert results["f16"]["identical"] >= 6
