"""The fused LoRA forward (methods/lora_fused.py) computes what peft computes, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tunesmith.methods.lora_fused import _fused_forward, fuse_lora, lora_linear


@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_the_unfused_formula(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g, requires_grad=True)
    w = torch.randn(20, 12, generator=g, requires_grad=True)
    b = torch.randn(20, generator=g, requires_grad=True) if bias else None
    a = torch.randn(4, 12, generator=g, requires_grad=True)
    lb = torch.randn(20, 4, generator=g, requires_grad=True)
    upstream = torch.randn(3, 5, 20, generator=g)
    leaves = [t for t in (x, w, b, a, lb) if t is not None]

    fused = lora_linear(x, w, b, a, lb, 0.5)
    fused_grads = torch.autograd.grad((fused * upstream).sum(), leaves)
    plain = nn.functional.linear(x, w, b) + nn.functional.linear(nn.functional.linear(x, a), lb) * 0.5
    plain_grads = torch.autograd.grad((plain * upstream).sum(), leaves)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_linear_computes_no_gradient_nobody_asked_for():
    x = torch.randn(4, 6)
    w = torch.randn(8, 6)  # frozen base weight, as in LoRA training
    a = torch.randn(2, 6, requires_grad=True)
    lb = torch.randn(8, 2, requires_grad=True)
    lora_linear(x, w, None, a, lb, 2.0).sum().backward()
    assert a.grad is not None and lb.grad is not None and w.grad is None


def test_a_fused_peft_model_gives_peft_logits_and_gradients(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():  # peft starts B at zero: make the LoRA path count
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    fused = copy.deepcopy(model)
    assert fuse_lora(fused) > 0
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    out = {}
    for key, m in (("peft", model), ("fused", fused)):
        logits = m(input_ids=ids).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        out[key] = (logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    torch.testing.assert_close(out["fused"][0], out["peft"][0], rtol=1e-5, atol=1e-5)
    assert out["fused"][1].keys() == out["peft"][1].keys()
    for name, grad in out["peft"][1].items():
        torch.testing.assert_close(out["fused"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the fused forward is what ran, and peft's own runs whenever the adapter is off
    layer = next(m for m in fused.modules() if hasattr(m, "lora_A"))
    assert layer.forward.__func__ is _fused_forward
    with torch.no_grad(), fused.disable_adapter(), model.disable_adapter():
        off = fused(input_ids=ids).logits
        torch.testing.assert_close(off, model(input_ids=ids).logits)
    assert not torch.allclose(off, out["fused"][0], atol=1e-3)  # off really is off
