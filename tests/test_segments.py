"""Attention per packed example (models/segments.py) must equal masked attention over the whole row."""

from __future__ import annotations

import random
import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tunesmith.models import segments as seg
from tunesmith.models.segments import Segment, SegmentLayout


def _dense_mask(segments: list[Segment], B: int, T: int, past: int):
    """The 4D mask (B, 1, T, past + T) the segments stand for, and which query positions they cover."""
    mask = torch.zeros(B, 1, T, past + T, dtype=torch.bool)
    for s in segments:
        for i in range(s.length):
            row = mask[s.row, 0, s.start + i]
            if s.sees_past:
                row[:past] = True
            for start, length in s.context:
                row[past + start : past + start + length] = True
            row[past + s.start : past + s.start + i + 1] = True
    covered = mask.any(-1)[:, 0]
    for b, t in (~covered).nonzero().tolist():  # uncovered (padding) sees only itself, as data/batching.py does
        mask[b, 0, t, past + t] = True
    return mask, covered


def _layout(form: str, rng: random.Random):
    rows = [[rng.randint(1, 30) for _ in range(rng.randint(1, 6))] for _ in range(1 if form == "in_row" else 3)]
    T = max(sum(r) for r in rows) + rng.randint(0, 4)  # a padded tail on some rows
    L = rng.randint(1, 12)
    packed = seg.consecutive(rows)
    if form == "in_row":
        return seg.behind_prefix_in_row(packed, L), len(rows), T + L, 0
    if form == "cached":
        return seg.behind_cached_prefix(packed), len(rows), T, L
    return packed, len(rows), T, 0


@pytest.mark.parametrize("form", ["packed", "in_row", "cached"])
def test_segment_attention_equals_masked_attention_over_the_row_with_its_gradients(form):
    module = types.SimpleNamespace(num_key_value_groups=3, is_causal=True)  # grouped-query attention, as SmolLM2
    for trial in range(8):
        rng = random.Random(f"{form}:{trial}")
        segments, B, T, past = _layout(form, rng)
        torch.manual_seed(trial)
        q = torch.randn(B, 6, T, 16, requires_grad=True)
        k = torch.randn(B, 2, past + T, 16, requires_grad=True)
        v = torch.randn(B, 2, past + T, 16, requires_grad=True)
        mask, covered = _dense_mask(segments, B, T, past)
        ref, _ = sdpa_attention_forward(module, q, k, v, mask)
        out, _ = seg.attend(sdpa_attention_forward, module, q, k, v, SegmentLayout(segments))
        assert out.shape == ref.shape
        torch.testing.assert_close(out[covered], ref[covered], atol=2e-6, rtol=1e-5)
        assert not out[~covered].any()  # padding: a zero output, seen by no one
        grad = torch.randn_like(ref) * covered[..., None, None]
        for a, b in zip(torch.autograd.grad(ref, (q, k, v), grad), torch.autograd.grad(out, (q, k, v), grad)):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_segments_are_grouped_by_length_so_one_long_example_does_not_pad_the_others():
    segments = seg.consecutive([[120] + [10] * 12])
    plan = SegmentLayout(segments).plan(1, 240, 240, "cpu")
    assert [g.n for g in plan.groups] == [120, 10]  # not 13 segments padded to 120 rows each
    same = SegmentLayout(seg.consecutive([[20] * 6])).plan(1, 120, 120, "cpu")
    assert [(g.n, g.size) for g in same.groups] == [(20, 6)]  # equal lengths: one call


def test_overlapping_or_outside_segments_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        SegmentLayout([Segment(0, 0, 5), Segment(0, 3, 4)]).plan(1, 10, 10, "cpu")
    with pytest.raises(ValueError, match="outside"):
        SegmentLayout([Segment(0, 8, 5)]).plan(1, 10, 10, "cpu")
    with pytest.raises(ValueError, match="one row"):
        seg.behind_prefix_in_row([Segment(1, 0, 3)], 4)


def test_only_sdpa_models_without_sliding_windows_get_the_keyword(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    segments = seg.consecutive([[3, 4]])
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert list(seg.keyword(sdpa, segments)) == ["tunesmith_segments"]
    assert seg.keyword(eager, segments) == {} and seg.keyword(sdpa, None) == {}
    from peft import PromptTuningConfig, get_peft_model

    prompt_tuned = get_peft_model(sdpa, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert seg.keyword(prompt_tuned, segments) == {}  # virtual tokens in front of every row
    sdpa.config.sliding_window = 4
    assert seg.keyword(sdpa, segments) == {}


def test_training_with_segment_attention_matches_whole_row_attention(tiny_model_dir, tmp_path, monkeypatch):
    """Two short runs on the tiny model, packed rows with and without a shared prefix: same losses and weights,
    to float rounding, whether attention runs per example or over the whole row under its mask."""
    import tunesmith
    from test_train import write_chat_data

    train = write_chat_data(tmp_path / "train.jsonl", 24)
    calls = []
    real = seg.attend
    monkeypatch.setattr(seg, "attend", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(name, share: bool):
        from tunesmith.training import prefix

        monkeypatch.setattr(prefix, "MIN_PREFIX_TOKENS", 8 if share else 0)
        out = tunesmith.train(
            None,
            quiet=True,
            log=lambda *_: None,
            **{
                "model.name": str(tiny_model_dir),
                "data.train": str(train),
                "output": str(tmp_path / name),
                "train.max_steps": 3,
                "train.batch_size": 8,
                "train.lr": 5e-3,
                "train.threads": 1,
                "lora.r": 4,
            },
        )
        losses = [r["loss"] for r in out.metrics if r["kind"] == "train"]
        return losses, out

    for share in (False, True):
        calls.clear()
        with_segments, _ = run(f"seg-{share}", share)
        assert calls  # the attention layers did take the per-example path
        monkeypatch.setattr(seg, "usable", lambda model: False)
        calls.clear()
        whole_rows, _ = run(f"rows-{share}", share)
        assert not calls
        monkeypatch.undo()
        monkeypatch.setattr(seg, "attend", lambda *a, **k: calls.append(1) or real(*a, **k))
        assert len(with_segments) == 3
        for a, b in zip(with_segments, whole_rows):
            assert a == pytest.approx(b, rel=1e-5)
