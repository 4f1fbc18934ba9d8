"""Packing, padding and grouping must all compute the same loss and gradients as one example at a time."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tunesmith.data.batching import IGNORE, make_batches, pack_rows, step_indices
from tunesmith.data.templates import Encoded


def _examples(n=7, seed=0, vocab=400):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(6, 30)
        ids = [rng.randint(5, vocab - 1) for _ in range(length)]
        answer = rng.randint(1, 4)  # the last `answer` tokens carry labels, like an assistant reply
        labels = [IGNORE] * (length - answer) + ids[length - answer :]
        out.append(Encoded(ids, labels))
    return out


def _reference_loss(model, examples):
    """Each example alone through the stock forward: mean CE over all labelled tokens."""
    total, n = 0.0, 0
    for e in examples:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(e.labels[1:])
        total = total + F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
        n += int((targets != IGNORE).sum())
    return total / n


def _batched_loss(model, examples, mode, micro):
    batches = make_batches(examples, mode, micro, pad_id=0, row_tokens=64)
    n = sum(b.n_targets for b in batches)
    total = 0.0
    for b in batches:
        kwargs = {
            "input_ids": b.input_ids,
            "logits_to_keep": b.keep,
            "use_cache": False,
        }  # a cache disables packed-mask detection
        if b.attention_mask is None:
            kwargs["position_ids"] = b.position_ids
        else:
            kwargs["attention_mask"] = b.attention_mask
        logits = model(**kwargs).logits
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.targets, reduction="sum")
    return total / n, batches


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return m.eval()


@pytest.mark.parametrize("mode,micro", [("pack", 7), ("pack", 3), ("pad", 7), ("pad", 2), ("group", 3)])
def test_same_loss_and_gradients_as_one_example_at_a_time(model, mode, micro):
    examples = _examples()
    model.zero_grad()
    ref = _reference_loss(model, examples)
    ref.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss, batches = _batched_loss(model, examples, mode, micro)
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for k, p in model.named_parameters():
        if k in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-4, atol=1e-6)
    if mode == "pack":
        # no padding inside rows except the tail that fills a row up to the longest
        assert sum(b.n_tokens for b in batches) == sum(len(e.input_ids) for e in examples)
        assert all(b.attention_mask is None for b in batches)


def test_packed_rows_restart_positions_and_mask_the_first_token():
    examples = [Encoded([1, 2, 3], [IGNORE, 2, 3]), Encoded([4, 5], [4, 5])]
    (batch,) = make_batches(examples, "pack", 2, pad_id=0, row_tokens=16)
    # each example is fed up to the position that predicts its last label: 3 and 5 are targets, never inputs
    assert batch.input_ids.tolist() == [[1, 2, 4]]
    assert batch.position_ids.tolist() == [[0, 1, 0]]
    # position p predicts token p+1 of its own example; token 4 (first of example 2) is never a target
    assert batch.keep.tolist() == [[True, True, True]]
    assert batch.targets.tolist() == [2, 3, 5]
    assert batch.n_tokens == 5  # every token of the data counts as trained


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert all(sum([5, 3, 4, 2][i] for i in row) <= 7 for row in pack_rows([5, 3, 4, 2], 7))


def test_step_indices_are_deterministic_and_cover_every_example():
    lengths = [random.Random(i).randint(1, 50) for i in range(53)]
    for mode in ("pack", "group"):
        a = step_indices(lengths, 8, seed=1, epoch=0, mode=mode)
        assert a == step_indices(lengths, 8, seed=1, epoch=0, mode=mode)
        assert sorted(i for step in a for i in step) == list(range(53))
        assert a != step_indices(lengths, 8, seed=1, epoch=1, mode=mode)


def test_round_width_pads_to_the_next_multiple_after_the_offset():
    from tunesmith.data.batching import round_width

    assert [round_width(w, 1) for w in (1, 17, 33)] == [1, 17, 33]
    assert [round_width(w, 16) for w in (1, 16, 17, 31, 32)] == [16, 16, 32, 32, 32]
    assert [round_width(w, 16, offset=37) for w in (1, 11, 12)] == [11, 11, 27]  # 37 + w: 48, 48, 64
