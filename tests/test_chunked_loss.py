"""The chunked LM head + cross-entropy must give the loss, hits and gradients of the plain head and loss."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.data.batching import make_batches
from tunesmith.data.templates import Encoded
from tunesmith.models.precision import Precision
from tunesmith.training import chunked_loss, loop


def test_chunked_head_ce_matches_plain_head_and_loss(monkeypatch):
    monkeypatch.setattr(chunked_loss, "CHUNK_VALUES", 1000)  # 3 rows of 300 logits per chunk
    torch.manual_seed(0)
    head = nn.Linear(16, 300, bias=True)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    loss, hits = chunked_loss.chunked_cross_entropy(hidden, head, targets)
    (0.3 * loss).backward()
    got = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = None
    head.zero_grad()
    logits = head(hidden)
    ref = F.cross_entropy(logits, targets, reduction="sum")
    (0.3 * ref).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert hits == int((logits.argmax(-1) == targets).sum())
    for a, b in zip(got, [hidden.grad, head.weight.grad, head.bias.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # validation: same loss, no gradients computed
        assert chunked_loss.chunked_cross_entropy(hidden, head, targets)[0].item() == pytest.approx(
            ref.item(), rel=1e-6
        )


def _lm_examples(n=6, seed=0, prefix=(7, 11, 13, 17, 19, 23), label_prefix=True):
    """Raw-text style examples: every position labelled (or all but a shared unlabelled prefix)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = list(prefix) + [rng.randint(50, 399) for _ in range(rng.randint(10, 30))]
        labels = list(ids) if label_prefix else [-100] * len(prefix) + ids[len(prefix) :]
        out.append(Encoded(ids, labels))
    return out


def _model(tiny_model_dir, lora: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    return model.train()


def _loss_and_grads(model, batches):
    ctx = SimpleNamespace(
        model=model, kl=None, virtual_tokens=0, device=torch.device("cpu"), precision=Precision("fp32", "test")
    )
    total, hits = 0.0, 0
    for b in batches:
        loss, right = loop._forward(ctx, b)
        loss.backward()
        total += loss.item()
        hits += right
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return total, hits, grads


@pytest.mark.parametrize("lora,share", [(False, 0), (True, 0), (True, 4)])
def test_loop_forward_chunked_equals_plain(tiny_model_dir, monkeypatch, lora, share):
    model = _model(tiny_model_dir, lora)
    batches = make_batches(
        _lm_examples(label_prefix=not share),
        "pack",
        6,
        pad_id=0,
        row_tokens=64,
        share_prefix=share,
        shared_row_tokens=64,
    )
    assert any(b.prefix_ids is not None for b in batches) == bool(share)
    monkeypatch.setattr(chunked_loss, "should_chunk", lambda model, n: False)
    ref_loss, ref_hits, ref_grads = _loss_and_grads(model, batches)
    monkeypatch.undo()
    vocab = model.get_output_embeddings().out_features
    monkeypatch.setattr(chunked_loss, "CHUNK_VALUES", vocab * 8)  # 8 rows per chunk: several chunks per batch
    assert chunked_loss.should_chunk(model, sum(b.targets.numel() for b in batches) // len(batches))
    loss, hits, grads = _loss_and_grads(model, batches)
    assert type(model.get_output_embeddings()) is nn.Linear  # the head is back in place
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert hits == ref_hits
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    if not lora:  # tied head: the embedding's gradient has both the input and the head contributions
        assert "model.embed_tokens.weight" in grads


def test_heads_that_are_not_plain_linear_layers_keep_the_plain_path(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = _model(tiny_model_dir, lora=False)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert chunked_loss.linear_head(model) is None
    assert not chunked_loss.should_chunk(model, 10**6)
