"""Mitigations of forgetting: replay of general data and the KL penalty toward the base model (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.config import validate_config
from tunesmith.errors import ConfigError, DataError
from tunesmith.training.mitigations import REPLAY_DEFAULT, mix_replay, replay_count

QUIET = lambda *a, **k: None  # noqa: E731
SYSTEM = "Classify the ticket."


def _write_chat(path: Path, n: int) -> Path:
    labels = ["billing", "shipping", "technical"]
    with open(path, "w") as fh:
        for i in range(n):
            msgs = [
                {"role": "user", "content": f"ticket {i}: parcel {i * 7} late"},
                {"role": "assistant", "content": labels[i % 3]},
            ]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


# ---- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("replay", 0.95, "train.replay: expected less than or equal to 0.9 (got 0.95)"),
        ("replay", -0.1, "train.replay: expected greater than or equal to 0 (got -0.1)"),
        ("kl_to_base", -1, "train.kl_to_base: expected greater than or equal to 0 (got -1)"),
        ("kl_to_base", 11, "train.kl_to_base: expected less than or equal to 10 (got 11)"),
    ],
)
def test_config_rejects_out_of_range_values(key, value, message):
    with pytest.raises(ConfigError) as e:
        validate_config({"train": {key: value}})
    assert message in str(e.value)


def test_config_defaults_are_off_and_typos_are_caught():
    cfg = validate_config({})
    assert cfg.train.replay == 0.0 and cfg.train.kl_to_base == 0.0 and cfg.train.replay_data is None
    with pytest.raises(ConfigError, match="did you mean 'train.replay'"):
        validate_config({"train": {"replays": 0.1}})


# ---- replay --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,share,expected", [(90, 0.1, 10), (100, 0.1, 11), (40, 0.5, 40), (10, 0.0, 0), (3, 0.05, 1)])
def test_replay_count_makes_the_share_of_the_mixed_set(n, share, expected):
    assert replay_count(n, share) == expected


def test_mix_replay_is_deterministic_given_the_seed_and_skips_the_task_prompt(tokenizer):
    assert REPLAY_DEFAULT.is_file()
    task = [object()] * 45
    cfg = validate_config({"data": {"system_prompt": SYSTEM, "max_length": 256}, "train": {"replay": 0.1, "seed": 3}})
    mixed, summary = mix_replay(task, cfg, tokenizer, QUIET)
    again, _ = mix_replay(task, cfg, tokenizer, QUIET)
    other, _ = mix_replay(
        task, validate_config({**cfg.model_dump(), "train": {"replay": 0.1, "seed": 4}}), tokenizer, QUIET
    )
    assert len(mixed) == 50 and mixed[:45] == task and summary["examples"] == 5
    assert summary["share"] == 0.1 and len(summary["sha256"]) == 64 and summary["pool"] > 200
    replayed = [tuple(e.input_ids) for e in mixed[45:]]
    assert replayed == [tuple(e.input_ids) for e in again[45:]]
    assert replayed != [tuple(e.input_ids) for e in other[45:]]
    assert len(set(replayed)) == 5  # drawn without repetition while the pool lasts
    for e in mixed[45:]:
        text = tokenizer.decode(e.input_ids)
        assert SYSTEM not in text and e.n_label_tokens > 0 and len(e.input_ids) <= 256


def test_mix_replay_repeats_a_small_pool_and_names_a_missing_file(tokenizer, tmp_path):
    small = _write_chat(tmp_path / "general.jsonl", 3)
    cfg = validate_config({"train": {"replay": 0.5, "replay_data": str(small)}})
    mixed, summary = mix_replay([object()] * 8, cfg, tokenizer, QUIET)
    assert summary["examples"] == 8 and summary["pool"] == 3 and len(mixed) == 16
    cfg = validate_config({"train": {"replay": 0.5, "replay_data": str(tmp_path / "nope.jsonl")}})
    with pytest.raises(DataError, match=r"train.replay_data: .*nope.jsonl: no such file"):
        mix_replay([object()] * 8, cfg, tokenizer, QUIET)


# ---- training runs ------------------------------------------------------------------------------------------------


def _train(tiny_model_dir, root: Path, name: str, **extra):
    import tunesmith

    data = root / "train.jsonl"
    if not data.exists():
        _write_chat(data, 24)
    return tunesmith.train(
        None,
        quiet=True,
        log=QUIET,
        **{
            "model.name": str(tiny_model_dir),
            "data.train": str(data),
            "output": str(root / name),
            "method": "lora",
            "train.max_steps": 6,
            "train.batch_size": 4,
            "train.lr": 5e-2,
            "lora.r": 4,
            "train.seed": 1,
            "data.val_fraction": 0.0,
            "data.system_prompt": SYSTEM,
            "data.max_length": 128,
            "train.threads": 2,
            **extra,
        },
    )


def test_replay_run_records_its_mixture(tiny_model_dir, tmp_path):
    run = _train(tiny_model_dir, tmp_path, "replay", **{"train.replay": 0.2})
    summary = run.data_summary
    assert summary["train"]["examples"] == 24  # task examples only
    assert summary["replay"]["examples"] == replay_count(24, 0.2) == 6
    assert summary["plan"]["steps_per_epoch"] == 8  # 30 examples in steps of 4
    assert run.config.train.replay == 0.2


def test_kl_to_base_changes_the_loss_and_logs_the_term(tiny_model_dir, tmp_path):
    plain = _train(tiny_model_dir, tmp_path, "plain")
    kl = _train(tiny_model_dir, tmp_path, "kl", **{"train.kl_to_base": 2.0})
    plain_rec = [r for r in plain.metrics if r["kind"] == "train"]
    kl_rec = [r for r in kl.metrics if r["kind"] == "train"]
    # step 1: LoRA's B is 0, the model is the base, the penalty is exactly 0 and the loss is the same
    assert kl_rec[0]["kl_to_base"] == 0.0 and kl_rec[0]["loss"] == pytest.approx(plain_rec[0]["loss"], abs=1e-6)
    assert "kl_to_base" not in plain_rec[0]
    later = kl_rec[1:]
    assert all(r["kl_to_base"] > 0 for r in later)
    assert all(r["objective"] == pytest.approx(r["loss"] + 2.0 * r["kl_to_base"], abs=1e-5) for r in later)
    assert any(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(plain_rec[1:], later))
    assert kl.config.train.kl_to_base == 2.0


def test_kl_penalty_pulls_the_model_toward_the_base(tiny_model_dir, tokenizer):
    """Same start (a model moved away from the base), same seed and steps: with the penalty the KL to the base at
    the labelled positions ends lower than without. (A tiny random model trained from the base stays near-uniform
    for many steps, where the penalty's gradient, q - p_base, is second order; so the start is moved first.)"""
    import copy

    import torch
    import torch.nn.functional as F

    from tunesmith import models
    from tunesmith.data.batching import make_batches
    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer
    from tunesmith.training.mitigations import KLToBase

    torch.manual_seed(0)
    base, tok = models.load(str(tiny_model_dir))
    start = copy.deepcopy(base)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    root = Path(tiny_model_dir).parent
    examples = read_examples(_write_chat(root / "kl-unit.jsonl", 8))
    encoded = [Renderer(tokenizer, None, SYSTEM).encode(e) for e in examples]
    batch = make_batches(encoded, "pad", 8, tokenizer.pad_token_id, 256)[0]
    kwargs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "logits_to_keep": batch.keep,
        "use_cache": False,
    }

    def train(weight: float) -> float:
        model = copy.deepcopy(start).train()
        penalty = KLToBase(weight, model, base=base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(15):
            logits = model(**kwargs).logits.reshape(-1, model.config.vocab_size)
            loss = F.cross_entropy(logits, batch.targets, reduction="sum")
            if weight:
                loss = loss + penalty.penalty(batch, kwargs, logits)
            opt.zero_grad()
            (loss / batch.n_targets).backward()
            opt.step()
        probe = KLToBase(1.0, model, base=base)
        with torch.no_grad():
            logits = model(**kwargs).logits.reshape(-1, model.config.vocab_size)
            probe.penalty(batch, kwargs, logits)
        return probe.pop(batch.n_targets, 0.0)["kl_to_base"]

    without, with_penalty = train(0.0), train(2.0)
    assert without > 0.3  # from 0.05 at the start: the task loss alone drives the model away (measured 0.91)
    assert with_penalty < 0.6 * without  # measured 0.35


def test_kl_to_base_with_full_finetuning_uses_a_frozen_copy(tiny_model_dir, tmp_path):
    run = _train(tiny_model_dir, tmp_path, "full", **{"method": "full", "train.kl_to_base": 0.5, "train.max_steps": 3})
    records = [r for r in run.metrics if r["kind"] == "train"]
    assert records[0]["kl_to_base"] == 0.0  # the copy equals the model before the first update
    assert records[1]["kl_to_base"] > 0 and records[2]["kl_to_base"] > 0
