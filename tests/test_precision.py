"""Training precision (train.precision) and inference dtype: what auto picks, where autocast is on, that the LM head
and the loss stay fp32 under bf16-mixed, that a bf16-mixed run learns and resumes bit-identically, and that the
fused LoRA layer equals peft's under autocast."""

from __future__ import annotations

import copy
import json
import math
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tunesmith
from test_train import write_chat_data
from tunesmith.errors import ConfigError
from tunesmith.methods.lora_fused import fuse_lora
from tunesmith.models import precision
from tunesmith.models.precision import cast_frozen_linears, resolve_training_precision

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return write_chat_data(root / "train.jsonl", 48), write_chat_data(root / "val.jsonl", 12, seed=1)


def _train(tiny_model_dir, data, out, **extra):
    settings = {
        "model.name": str(tiny_model_dir),
        "data.train": str(data[0]),
        "data.validation": str(data[1]),
        "output": str(out),
        "train.max_steps": 6,
        "train.batch_size": 8,
        "train.lr": 5e-3,
        "train.threads": 1,
        "train.seed": 3,
        "lora.r": 4,
        **extra,
    }
    return tunesmith.train(None, quiet=True, log=lambda *_: None, **settings)


# ----------------------------------------------------------------------------------------------------
# What auto picks


def test_auto_is_bf16_mixed_with_native_bf16_and_fp32_without(monkeypatch):
    monkeypatch.delenv("TUNESMITH_CPU_BF16")  # the suite's own override (conftest.py)
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["AMX-BF16"])
    p = resolve_training_precision("auto", CPU)
    assert (p.name, p.autocast, p.compute_dtype) == ("bf16-mixed", True, torch.bfloat16)
    assert "AMX-BF16" in p.reason
    assert precision.inference_dtype(CPU)[0] == torch.bfloat16
    # full fine-tuning on a CPU casts every trained weight each step: auto keeps it fp32 and says why
    p = resolve_training_precision("auto", CPU, "full")
    assert p.name == "fp32" and "slower" in p.reason

    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    p = resolve_training_precision("auto", CPU)
    assert (p.name, p.autocast) == ("fp32", False)
    assert "without AVX512-BF16 or AMX-BF16" in p.reason
    assert precision.inference_dtype(CPU)[0] == torch.float32
    # an explicit choice is kept whatever the hardware
    assert resolve_training_precision("bf16-mixed", CPU).name == "bf16-mixed"
    assert resolve_training_precision("fp32", CPU).reason == "set in the config"


def test_the_environment_overrides_the_cpu_detection(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["AMX-BF16"])
    monkeypatch.setenv("TUNESMITH_CPU_BF16", "0")
    p = resolve_training_precision("auto", CPU)
    assert p.name == "fp32" and "TUNESMITH_CPU_BF16=0" in p.reason
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    monkeypatch.setenv("TUNESMITH_CPU_BF16", "1")
    assert resolve_training_precision("auto", CPU).name == "bf16-mixed"


def test_model_dtype_auto_follows_the_device(monkeypatch):
    from tunesmith.models import pick_dtype

    monkeypatch.delenv("TUNESMITH_CPU_BF16")
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["AVX512-BF16"])
    assert pick_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16  # asked for: given, even where emulated


def test_an_unknown_precision_is_a_config_error(tiny_model_dir, data, tmp_path):
    with pytest.raises(ConfigError, match="precision"):
        _train(tiny_model_dir, data, tmp_path / "r", **{"train.precision": "fp8"})


# ----------------------------------------------------------------------------------------------------
# Inside a bf16-mixed step


def _watch(model):
    """Record, per call, whether autocast was on and the input dtype of every LoRA layer and of the LM head."""
    seen = {"linear": [], "head": []}
    head = model.get_output_embeddings()

    def hook(module, args):
        kind = "head" if module is head else "linear"
        seen[kind].append((torch.is_autocast_enabled("cpu"), args[0].dtype))

    layers = [m for m in model.modules() if hasattr(m, "lora_A")] + [head]
    return seen, [m.register_forward_pre_hook(hook) for m in layers]


@pytest.mark.parametrize("name", ["bf16-mixed", "fp32"])
def test_autocast_is_on_for_the_body_and_off_for_the_head_and_loss(tiny_model_dir, data, tmp_path, name, monkeypatch):
    from tunesmith.training import loop

    seen = {}
    real_run_steps = loop._run_steps

    def run_steps(ctx, state, progress):
        seen.update(ctx=ctx)
        watched, handles = _watch(ctx.model)
        seen.update(watched)
        losses = []
        real_ce = torch.nn.functional.cross_entropy
        monkeypatch.setattr(
            loop.F,
            "cross_entropy",
            lambda logits, *a, **k: (
                losses.append((logits.dtype, torch.is_autocast_enabled("cpu"))) or real_ce(logits, *a, **k)
            ),
        )
        try:
            real_run_steps(ctx, state, progress)
        finally:
            for h in handles:
                h.remove()
        seen["loss"] = losses

    monkeypatch.setattr(loop, "_run_steps", run_steps)
    run = _train(tiny_model_dir, data, tmp_path / name, **{"train.precision": name, "train.max_steps": 2})
    assert seen["ctx"].precision.name == name
    body = set(seen["linear"])
    assert body
    if name == "bf16-mixed":
        # every layer under autocast, reading fp32: the residual stream, the fused LoRA layers' outputs and (on a
        # CPU) attention's output are fp32; the layers cast to bf16 for their products
        assert body == {(True, torch.float32)}
    else:
        assert body == {(False, torch.float32)}
    assert seen["head"] and set(seen["head"]) == {(False, torch.float32)}  # the head: fp32, autocast off
    assert set(seen["loss"]) == {(torch.float32, False)}
    assert run.config.train.precision == name  # config.yaml records what ran
    summary = json.loads((run.path / "data.json").read_text())
    assert summary["precision"] == name and summary["precision_reason"] == "set in the config"


@pytest.mark.parametrize("name", ["bf16-mixed", "fp32"])
def test_attention_runs_in_fp32_under_cpu_autocast_only_within_the_context(
    tiny_model_dir, data, tmp_path, name, monkeypatch
):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    from tunesmith.training import loop

    widths = []
    real_batches = loop.make_batches
    monkeypatch.setattr(
        loop,
        "make_batches",
        lambda *a, **k: [
            widths.append(b.input_ids.shape[1] + (0 if b.prefix_ids is None else b.prefix_ids.shape[1])) or b
            for b in real_batches(*a, **k)
        ],
    )
    _train(tiny_model_dir, data, tmp_path / name, **{"train.precision": name, "train.max_steps": 2})
    assert seen and set(seen) == {(torch.float32, torch.float32, torch.float32, False)}
    # bf16 on a CPU: rows in widths of 16 tokens (oneDNN keeps kernels per shape; data.batching.round_width)
    assert widths and (all(w % 16 == 0 for w in widths) if name == "bf16-mixed" else any(w % 16 for w in widths))
    if name == "bf16-mixed":  # outside a bf16-mixed forward, attention under autocast is left to autocast
        module = types.SimpleNamespace(is_causal=True)
        q = torch.randn(1, 2, 4, 8)

        def attention_autocast_enabled() -> bool:
            seen.clear()
            ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, q, q, None)
            return seen[-1][3]

        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert attention_autocast_enabled()
        ctx = precision.Precision("bf16-mixed", "test").autocast_context(torch.device("cpu"))
        with ctx:  # nested use (the head-outside-autocast path enters it again)
            with ctx:
                assert not attention_autocast_enabled() and torch.is_autocast_enabled("cpu")
            assert not attention_autocast_enabled() and torch.is_autocast_enabled("cpu")
        assert not torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert attention_autocast_enabled()


def test_bf16_mixed_keeps_fp32_master_weights_and_stores_frozen_linears_in_bf16(tiny_model_dir, data, tmp_path):
    from tunesmith.training import loop

    seen = {}
    real = loop._run_steps
    loop._run_steps = lambda ctx, state, progress: (
        seen.update(model=ctx.model, opt=ctx.optimizer) or real(ctx, state, progress)
    )
    try:
        _train(tiny_model_dir, data, tmp_path / "r", **{"train.precision": "bf16-mixed", "train.max_steps": 1})
    finally:
        loop._run_steps = real
    model = seen["model"]
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trainable == {torch.float32}
    moments = {v.dtype for s in seen["opt"].state.values() for v in s.values() if v.ndim > 0}
    assert moments == {torch.float32}
    frozen_linear = {
        m.base_layer.weight.dtype for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")
    }
    assert frozen_linear == {torch.bfloat16}
    head = model.get_output_embeddings().weight
    assert head.dtype == torch.float32  # tied to the embedding: left fp32
    norms = {p.dtype for n, p in model.named_parameters() if "norm" in n}
    assert norms == {torch.float32}


def test_casting_frozen_linears_changes_nothing_under_autocast(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
        n = cast_frozen_linears(model)
        after = model(input_ids=ids).logits
    assert n > 0
    assert torch.equal(before, after)  # autocast's own cast, made once: bit-identical


def test_fused_lora_equals_peft_under_autocast(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import tunesmith.methods.lora_fused as lf

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    fused = copy.deepcopy(model)
    assert fuse_lora(fused) > 0
    cast_frozen_linears(fused)  # as training does under bf16-mixed
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    calls = []
    real = lf.lora_linear_mixed
    lf.lora_linear_mixed = lambda *a: calls.append(a[-1]) or real(*a)
    out = {}
    try:
        for key, m in (("peft", model), ("fused", fused)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = m(input_ids=ids).logits
            loss = nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
            loss.backward()
            out[key] = (logits.detach().float(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    finally:
        lf.lora_linear_mixed = real
    assert calls and set(calls) == {torch.bfloat16}  # the fused layer ran, its products in bf16
    # the same computation up to bf16 rounding (the fused layer sums the base and LoRA terms in fp32, peft in bf16)
    torch.testing.assert_close(out["fused"][0], out["peft"][0], rtol=0.02, atol=0.05)
    for name, grad in out["peft"][1].items():
        got = out["fused"][1][name]
        assert got.dtype == torch.float32  # gradients reach the fp32 master weights in fp32
        cos = nn.functional.cosine_similarity(got.flatten(), grad.flatten(), dim=0)
        assert cos > 0.99, name


def test_the_fused_layer_keeps_a_small_lora_term_that_a_bf16_sum_rounds_away():
    """Under bf16-mixed the LoRA term early in training is far below the base output's bf16 step (~0.4% of it):
    the fused layer adds it in fp32, so its effect on the output is the fp32 one; autocast's bf16 sum (peft's
    forward) loses most of it. The same holds for the input gradient."""
    from tunesmith.methods.lora_fused import lora_linear_mixed

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g).requires_grad_()
    w = torch.randn(128, 96, generator=g) / 10
    a = torch.randn(8, 96, generator=g) / 10
    b0 = torch.zeros(128, 8)
    b = torch.randn(128, 8, generator=g) * 2e-4  # one AdamW step of lr 2e-4 from B = 0
    scale = 2.0

    def fp32(bm):
        return x @ w.t() + scale * (x @ a.t()) @ bm.t()

    def mixed(bm):
        return lora_linear_mixed(x, w.bfloat16(), None, a, bm, scale, torch.bfloat16)

    def bf16_sum(bm):  # what autocast does with peft's forward: each product, and their sum, in bf16
        xb = x.bfloat16()
        return (xb @ w.bfloat16().t() + ((xb @ a.bfloat16().t()) @ bm.bfloat16().t()) * scale).float()

    want = fp32(b) - fp32(b0)
    got = mixed(b) - mixed(b0)
    lost = bf16_sum(b) - bf16_sum(b0)
    err = lambda d: ((d - want).norm() / want.norm()).item()  # noqa: E731
    assert err(got) < 0.01  # the adapter's effect as fp32 computes it, to bf16 rounding of the LoRA products
    assert err(lost) > 0.5  # most of it rounded away by a bf16 sum: the test tells the two apart
    assert got.dtype == torch.float32
    # backward: the LoRA gradients in fp32, close to fp32's
    grad = torch.randn(64, 128, generator=g)
    am, bm = a.clone().requires_grad_(), b.clone().requires_grad_()
    lora_linear_mixed(x, w.bfloat16(), None, am, bm, scale, torch.bfloat16).backward(grad)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    (x @ w.t() + scale * (x @ ar.t()) @ br.t()).backward(grad)
    for mine, ref in ((am.grad, ar.grad), (bm.grad, br.grad)):
        assert mine.dtype == torch.float32
        assert nn.functional.cosine_similarity(mine.flatten(), ref.flatten(), dim=0) > 0.999


def test_lora_with_dropout_under_autocast_also_keeps_a_small_lora_term(tiny_model_dir):
    """LoRA with dropout runs peft's terms, but under autocast their sum is fp32 as in the fused layer: the effect of
    a one-step-sized B on a layer's output matches fp32's (dropout off in eval mode, so the comparison is exact)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, config).eval()
    assert fuse_lora(model) > 0
    layer = next(
        m for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.lora_dropout["default"], nn.Dropout)
    )
    x = torch.randn(2, 9, layer.in_features, generator=torch.Generator().manual_seed(1))

    def set_term(small):
        layer.lora_B["default"].weight.data.fill_(2e-4 if small else 0.0)

    want = _small_term_effect(layer, x, set_term, False)
    got = _small_term_effect(layer, x, set_term, True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.float32
    assert want.abs().max() > 0
    assert ((got - want).norm() / want.norm()).item() < 0.05  # a bf16 sum of the two terms loses most of it


def _small_term_effect(layer, x, set_term, autocast: bool) -> torch.Tensor:
    """How much a small adapter term changes the layer's output: out(term) - out(no term), in fp32."""

    def out(small: bool):
        set_term(small)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return layer(x).float()

    return out(True) - out(False)


def test_dora_under_autocast_keeps_a_small_term(tiny_model_dir):
    """DoRA (peft's forward, with the base output in fp32 under autocast): the effect of a one-step-sized B on a
    layer's output matches fp32's; peft alone adds it to the bf16 base output and casts the sum back to bf16."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.config import Config
    from tunesmith.methods import apply_method

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = apply_method(copy.deepcopy(base), Config.model_validate({"method": "dora", "lora": {"r": 4}})).eval()
    plain = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    ).eval()
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))

    def effects(net):
        layer = next(m for n, m in net.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_B"))
        x_ = x[..., : layer.in_features]

        def set_term(small):
            layer.lora_B["default"].weight.data.fill_(5e-5 if small else 0.0)

        return _small_term_effect(layer, x_, set_term, False), _small_term_effect(layer, x_, set_term, True)

    want, got = effects(model)
    assert want.abs().max() > 0
    assert ((got - want).norm() / want.norm()).item() < 0.05
    want, got = effects(plain)  # peft's own forward: the bf16 sum loses much of the term
    assert ((got - want).norm() / want.norm()).item() > 0.3


def test_a_bottleneck_adapter_under_autocast_keeps_a_small_term():
    """A bottleneck adapter's output is x + up(act(down(x))); under autocast x (a bf16 layer output) and the small
    adapter term are summed in fp32."""
    from tunesmith.methods.adapter import BottleneckAdapter

    torch.manual_seed(0)
    adapter = BottleneckAdapter(64, 8, "gelu", 1e-4)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def set_term(small):
        adapter.up.weight.data.fill_(2e-4 if small else 0.0)

    want = _small_term_effect(adapter.float(), x.float(), set_term, False)
    got = _small_term_effect(adapter, x, set_term, True)
    assert want.abs().max() > 0
    assert ((got - want).norm() / want.norm()).item() < 0.05
    old = BottleneckAdapter.forward
    try:  # the bf16 sum this replaced loses most of the term
        BottleneckAdapter.forward = lambda self, x: x + self.up(self.act(self.down(x)))
        lost = _small_term_effect(adapter, x, set_term, True)
    finally:
        BottleneckAdapter.forward = old
    assert ((lost - want).norm() / want.norm()).item() > 0.3


# ----------------------------------------------------------------------------------------------------
# Whole runs


@pytest.mark.parametrize("method", ["dora", "adapter"])
def test_dora_and_bottleneck_adapter_runs_learn_in_bf16_mixed(method, tiny_model_dir, data, tmp_path):
    run = _train(tiny_model_dir, data, tmp_path / method, method=method, **{"train.precision": "bf16-mixed"})
    assert run.config.method == method
    losses = [r["loss"] for r in run.metrics if r["kind"] == "train"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_a_bf16_mixed_run_learns_and_resumes_bit_identically(tiny_model_dir, data, tmp_path):
    common = {"train.precision": "bf16-mixed", "train.save_every": 3, "train.eval_every": 3, "lora.dropout": 0.1}
    straight = _train(tiny_model_dir, data, tmp_path / "straight", **common)
    losses = [r["loss"] for r in straight.metrics if r["kind"] == "train"]
    evals = [r["val_loss"] for r in straight.metrics if r["kind"] == "eval"]
    assert losses[-1] < losses[0] and evals[-1] < evals[0]

    # a run killed after its step-3 checkpoint: the same run with what came after step 3 removed
    killed = tmp_path / "killed"
    shutil.copytree(straight.path, killed)
    shutil.rmtree(killed / "model")
    shutil.rmtree(killed / "checkpoints" / "step-6")
    tunesmith.train(resume=killed, quiet=True, log=lambda *_: None)
    a = load_file(straight.path / "model" / "adapter_model.safetensors")
    b = load_file(killed / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float32
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_bf16_mixed_full_fine_tuning_with_kl_to_base(tiny_model_dir, data, tmp_path):
    """Full fine-tuning keeps every weight fp32 (its saved model is fp32) and the KL reference runs in bf16."""
    run = _train(
        tiny_model_dir,
        data,
        tmp_path / "full",
        **{"method": "full", "train.precision": "bf16-mixed", "train.kl_to_base": 0.5, "train.lr": 1e-3},
    )
    records = [r for r in run.metrics if r["kind"] == "train"]
    assert all(r["kl_to_base"] >= 0 for r in records) and records[-1]["loss"] < records[0]["loss"]
    weights = load_file(run.path / "model" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_the_chunked_head_under_bf16_mixed_gives_the_plain_heads_loss(tiny_model_dir, data, tmp_path, monkeypatch):
    from tunesmith.training import chunked_loss

    first = {}
    for chunked in (False, True):
        if chunked:  # a few hundred logits per chunk: every batch of this data goes through ChunkedHeadCE
            monkeypatch.setattr(chunked_loss, "CHUNK_VALUES", 4 * 49152)
        calls = []
        real = chunked_loss.ChunkedHeadCE.apply
        monkeypatch.setattr(
            chunked_loss.ChunkedHeadCE, "apply", lambda *a, calls=calls, real=real: calls.append(a[0].dtype) or real(*a)
        )
        run = _train(
            tiny_model_dir, data, tmp_path / f"c{chunked}", **{"train.precision": "bf16-mixed", "train.max_steps": 1}
        )
        assert bool(calls) == chunked and set(calls) <= {torch.float32}  # hidden states reach the head in fp32
        first[chunked] = next(r for r in run.metrics if r["kind"] == "train")["loss"]
        monkeypatch.setattr(chunked_loss.ChunkedHeadCE, "apply", real)
    assert first[True] == pytest.approx(first[False], rel=1e-5)


def test_pure_bf16_puts_every_weight_in_bf16_and_still_learns(tiny_model_dir, data, tmp_path):
    from tunesmith.training import loop

    seen = {}
    real = loop._run_steps
    loop._run_steps = lambda ctx, state, progress: seen.update(model=ctx.model) or real(ctx, state, progress)
    try:
        run = _train(tiny_model_dir, data, tmp_path / "bf16", **{"train.precision": "bf16", "train.lr": 2e-2})
    finally:
        loop._run_steps = real
    assert {p.dtype for p in seen["model"].parameters()} == {torch.bfloat16}
    losses = [r["loss"] for r in run.metrics if r["kind"] == "train"]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["dora", "ia3", "prefix", "prompt", "adapter", "freeze"])
def test_every_method_trains_under_bf16_mixed(tiny_model_dir, data, tmp_path, method):
    """The head-outside-autocast path and the frozen-weight casts hold for every method, not only LoRA: a few steps
    give finite losses, validation runs, and the saved model loads back."""
    run = _train(
        tiny_model_dir,
        data,
        tmp_path / method,
        **{"method": method, "train.precision": "bf16-mixed", "train.max_steps": 3, "train.eval_every": 3},
    )
    losses = [r["loss"] for r in run.metrics if r["kind"] == "train"]
    evals = [r["val_loss"] for r in run.metrics if r["kind"] == "eval"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses + evals) and evals
    model, _, _ = run.load_model(dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
