"""Encoding a shared prefix once per micro-batch must give the loss and gradients of encoding every example whole."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tunesmith.data.batching import IGNORE, make_batches, shared_prefix_length
from tunesmith.data.templates import Encoded
from tunesmith.training.prefix import forward_shared_prefix, supports_prefix_sharing

PREFIX = [7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]  # a "system prompt" every example starts with


def _examples(n=7, seed=0, vocab=400, prefix=PREFIX):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = [rng.randint(50, vocab - 1) for _ in range(rng.randint(3, 25))]
        ids = list(prefix) + body
        answer = rng.randint(1, 3)
        out.append(Encoded(ids, [IGNORE] * (len(ids) - answer) + ids[len(ids) - answer :]))
    return out


def _reference_loss(model, examples):
    total, n = 0.0, 0
    for e in examples:
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        targets = torch.tensor(e.labels[1:])
        total = total + F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        n += int((targets != IGNORE).sum())
    return total / n


def _shared_loss(model, examples, micro, row_tokens=40, width_multiple=1):
    batches = make_batches(
        examples, "pack", micro, pad_id=0, row_tokens=row_tokens, share_prefix=8, width_multiple=width_multiple
    )
    for b in batches:  # with width_multiple, the prefix (when shared) and the row's width fill whole steps of it
        assert (b.input_ids.shape[1] + (b.prefix_ids.shape[1] if b.prefix_ids is not None else 0)) % width_multiple == 0
    n = sum(b.n_targets for b in batches)
    total = 0.0
    for b in batches:
        assert (b.prefix_ids is not None) == (b.n_examples > 1)  # one example alone has nothing to share
        if b.prefix_ids is None:
            kwargs = {"position_ids": b.position_ids, "use_cache": False}
            logits = model(input_ids=b.input_ids, logits_to_keep=b.keep, **kwargs).logits
        else:
            logits = forward_shared_prefix(model, b)
        total = total + F.cross_entropy(logits, b.targets, reduction="sum")
    return total / n, batches


def _tiny(tiny_model_dir, attn="sdpa", lora=False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
        for name, p in model.named_parameters():  # non-zero B so LoRA gradients reach A too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    return model


@pytest.mark.parametrize("width_multiple", [1, 16])  # rows padded to widths in steps of 16 (bf16 on a CPU)
@pytest.mark.parametrize("row_tokens", [40, 1024])  # several rows per micro-batch (cached prefix), one (prefix in row)
@pytest.mark.parametrize(
    "attn,lora,micro", [("sdpa", False, 7), ("sdpa", False, 3), ("eager", False, 4), ("sdpa", True, 7)]
)
def test_shared_prefix_gives_the_loss_and_gradients_of_whole_examples(
    tiny_model_dir, attn, lora, micro, row_tokens, width_multiple
):
    model = _tiny(tiny_model_dir, attn, lora).train()
    examples = _examples()
    ref = _reference_loss(model, examples)
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss, batches = _shared_loss(model, examples, micro, row_tokens, width_multiple)
    rows = {b.input_ids.shape[0] for b in batches if b.prefix_ids is not None}
    assert rows == {1} if row_tokens == 1024 else max(rows) > 1  # both forms of forward_after_prefix are tested
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ref_grads
    for k, p in model.named_parameters():
        if k in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    # the prefix is held once per micro-batch, every token is still counted as trained data
    shared = [b for b in batches if b.prefix_ids is not None]
    assert all(b.prefix_ids.tolist() == [PREFIX] for b in shared)
    assert sum(b.n_tokens for b in batches) == sum(len(e.input_ids) for e in examples)
    # fed: each example minus the prefix and minus its last token (its last label: nothing is predicted from it)
    assert sum(b.input_ids.ne(0).sum().item() for b in shared) == sum(b.n_tokens - 13 * b.n_examples for b in shared)


def test_prefix_stops_before_the_first_labelled_position():
    a = Encoded([1, 2, 3, 4, 5, 6], [IGNORE, IGNORE, IGNORE, IGNORE, 5, 6])
    b = Encoded([1, 2, 3, 4, 9], [IGNORE, IGNORE, IGNORE, 4, 9])  # labelled from index 3: position 2 predicts it
    assert shared_prefix_length([a, a]) == 3  # a alone: its first label (index 4) is predicted by position 3
    assert shared_prefix_length([a, b]) == 2
    assert shared_prefix_length([a, Encoded([2, 2, 3, 4, 5], [IGNORE] * 4 + [5])]) == 0
    # every example keeps at least one token of its own
    assert shared_prefix_length([Encoded([1, 2, 3], [IGNORE] * 3), Encoded([1, 2, 3, 4], [IGNORE] * 4)]) == 2


def test_the_mask_lets_a_suffix_see_the_prefix_and_its_own_example_only():
    L = len(PREFIX)
    a = Encoded(PREFIX + [100, 101], [IGNORE] * L + [100, 101])
    b = Encoded(PREFIX + [200, 201, 202], [IGNORE] * (L + 1) + [201, 202])
    (batch,) = make_batches([a, b], "pack", 2, pad_id=0, row_tokens=64, share_prefix=8)
    # first-fit decreasing: b (3 tokens) then a (2) in one row; the prefix ends where a's label begins; each
    # example stops at the position that predicts its last label (202, 101 are predicted, never fed)
    assert batch.prefix_ids.tolist() == [PREFIX[:-1]]
    p = L - 1
    assert batch.input_ids.tolist() == [[PREFIX[-1], 200, 201, PREFIX[-1], 100]]
    assert batch.position_ids.tolist() == [[p, p + 1, p + 2, p, p + 1]]
    mask = batch.attention_mask[0, 0]
    assert mask.shape == (5, p + 5)
    assert mask[:, :p].all()  # everyone sees the whole prefix
    own = mask[:, p:].int().tolist()
    assert own == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert batch.keep.tolist() == [[False, True, True, True, True]]
    assert batch.targets.tolist() == [201, 202, 100, 101]


def test_short_or_missing_common_prefix_falls_back_to_plain_packing():
    examples = _examples(prefix=PREFIX[:5])  # 5 shared tokens: below the 8 asked for
    assert all(b.prefix_ids is None and b.attention_mask is None for b in make_batches(examples, "pack", 7, 0, 64, 8))
    mixed = _examples(n=3) + _examples(n=3, prefix=[99] * 12)
    assert all(b.prefix_ids is None for b in make_batches(mixed, "pack", 6, 0, 64, 8))
    assert all(b.prefix_ids is None for b in make_batches(_examples(), "pack", 7, 0, 64, share_prefix=0))


def test_which_models_and_methods_share_prefixes(tiny_model_dir):
    model = _tiny(tiny_model_dir)
    assert supports_prefix_sharing(model, "lora", False) == (True, "")
    assert not supports_prefix_sharing(model, "prompt", False)[0]
    assert not supports_prefix_sharing(model, "full", True)[0]
    model.config.sliding_window = 4
    assert supports_prefix_sharing(model, "full", False)[1] == "the model has sliding-window attention layers"


def test_training_with_a_shared_prefix_learns_exactly_what_unshared_training_learns(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The loop shares the system prompt of chat data; losses, gradient norms and validation loss match a run
    with sharing turned off, step for step."""
    import tunesmith
    from tunesmith.training import prefix

    train, val = _write_chat(tmp_path / "train.jsonl", 24, 0), _write_chat(tmp_path / "val.jsonl", 8, 1)
    runs, calls = {}, []
    real = prefix.forward_shared_prefix
    monkeypatch.setattr(prefix, "forward_shared_prefix", lambda model, batch: calls.append(1) or real(model, batch))
    for share in (8, 0):
        monkeypatch.setattr(prefix, "MIN_PREFIX_TOKENS", share)
        run = tunesmith.train(
            None,
            quiet=True,
            log=lambda *_: None,
            **{
                "model.name": str(tiny_model_dir),
                "data.train": str(train),
                "data.validation": str(val),
                "output": str(tmp_path / f"share{share}"),
                "train.max_steps": 3,
                "train.batch_size": 8,
                "train.micro_batch_size": 4,
                "train.lr": 1e-2,
                "lora.r": 4,
                "train.seed": 3,
            },
        )
        runs[share] = run.metrics
    shared, plain = runs[8], runs[0]
    assert len(calls) >= 3 * 2  # 3 steps of two 4-example micro-batches, plus validation, went through sharing
    assert [r["kind"] for r in shared] == [r["kind"] for r in plain]
    for a, b in zip(shared, plain):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
        if a["kind"] == "train":
            assert a["tokens"] == b["tokens"] and a["label_tokens"] == b["label_tokens"]


def _write_chat(path, n, seed):
    import json

    rng = random.Random(seed)
    system = "Classify the support ticket as billing, shipping or technical. Answer with the label only."
    with open(path, "w") as fh:
        for i in range(n):
            label = rng.choice(["billing", "shipping", "technical"])
            user = f"ticket {i}: " + " ".join(
                rng.choice(["refund", "parcel", "crash", "please", "today"]) for _ in range(rng.randint(2, 9))
            )
            msgs = [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
                {"role": "assistant", "content": label},
            ]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


def test_shared_batches_use_their_own_row_width():
    """Shared-prefix micro-batches are cut into rows of shared_row_tokens (prefix included), other micro-batches
    into rows of row_tokens."""
    examples = _examples(n=7, seed=2)
    (wide,) = make_batches(examples, "pack", 7, 0, row_tokens=40, share_prefix=8, shared_row_tokens=1024)
    L = wide.prefix_ids.shape[1]
    # every suffix in one row (each without its last token, from which nothing is predicted)
    assert wide.input_ids.shape == (1, sum(len(e.input_ids) - L - 1 for e in examples))
    (narrow,) = make_batches(examples, "pack", 7, 0, row_tokens=40, share_prefix=8)
    assert narrow.input_ids.shape[0] > 1 and narrow.input_ids.shape[1] <= 40 - L
    plain = make_batches(
        _examples(prefix=PREFIX[:5]), "pack", 7, 0, row_tokens=40, share_prefix=8, shared_row_tokens=1024
    )
    assert all(b.prefix_ids is None and b.input_ids.shape[1] <= 40 for b in plain)
