"""Preference training (train.objective dpo / orpo / simpo) on the tiny model.

- the pair layout (each prompt fed once, both answers on it through a tree mask) gives the log-probabilities of
  the two full sequences, with SDPA and eager attention, raw-text and chat pairs, several pairs per row;
- every loss equals a direct implementation written here from the papers' formulas, in value and gradient;
- a run starts at DPO's log 2 for every method that starts at the identity, the reference is computed once and
  reused after a SIGKILL, and the resumed run ends with the weights of the run never stopped;
- bad input: pair data with sft, chat data with dpo, prefix tuning, a changed objective or data on resume, pairs
  too long for data.max_length.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import _train_args
from tunesmith.cli import main
from tunesmith.config import validate_config
from tunesmith.data.example import Example, Message
from tunesmith.data.pairs import make_pair_batches
from tunesmith.data.templates import IGNORE, Renderer
from tunesmith.models.functional import pair_batch_logits, sequence_logps
from tunesmith.training.objectives import pair_losses

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo"]


def _pairs(n: int, chat: bool, seed: int = 0) -> list[Example]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.sample(WORDS, 3 + i % 4))
        good = "sure " + " ".join(rng.sample(WORDS, 1 + i % 5))  # a rule to learn: chosen answers start with sure
        bad = "never " + " ".join(rng.sample(WORDS, 2 + (i * 3) % 4))
        if chat:
            turns = [Message("user", f"say {q}")]
            if i % 3 == 0:  # multi-turn prompts too
                turns = [Message("user", "hi"), Message("assistant", "hello"), *turns]
            out.append(Example("preference", messages=turns, chosen=good, rejected=bad, source=f"t:{i + 1}"))
        else:
            out.append(Example("preference", prompt=f"Q: {q}\nA:", chosen=" " + good, rejected=" " + bad))
    return out


def write_pairs(path: Path, n: int, seed: int = 0, chat: bool = True) -> Path:
    with open(path, "w") as fh:
        for ex in _pairs(n, chat, seed):
            if chat:
                msgs = [{"role": m.role, "content": m.content} for m in ex.messages]
                row = {"messages": msgs, "chosen": ex.chosen, "rejected": ex.rejected}
            else:
                row = {"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected}
            fh.write(json.dumps(row) + "\n")
    return path


def _model(tiny_model_dir, attn="sdpa"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _full_sequence_logps(model, pairs) -> torch.Tensor:
    """(n, 2): each answer's summed log-prob from its whole sequence prompt + answer, run alone."""
    out = []
    for p in pairs:
        row = []
        for answer, labels in ((p.chosen, p.chosen_labels), (p.rejected, p.rejected_labels)):
            ids = torch.tensor([p.prompt + answer])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            n = len(p.prompt)
            total = sum(logp[n + j - 1, t] for j, t in enumerate(labels) if t != IGNORE)
            row.append(total)
        out.append(torch.stack(row))
    return torch.stack(out)


def _layout_logps(model, pairs, shared, row_tokens=64, micro=3, share_prefix=0, width_multiple=1) -> torch.Tensor:
    parts = []
    batches = make_pair_batches(pairs, micro, 0, row_tokens, shared, share_prefix, width_multiple)
    if width_multiple > 1:  # rows padded so that (common prefix +) width is a multiple of it
        assert all(
            (b.input_ids.shape[1] + (b.prefix_ids.shape[1] if b.prefix_ids is not None else 0)) % 16 == 0
            for b in batches
        )
    assert any(b.prefix_ids is not None for b in batches) == bool(share_prefix and shared)
    for batch in batches:
        parts.append(sequence_logps(pair_batch_logits(model, batch), batch).view(-1, 2))
    return torch.cat(parts)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chat", [True, False])
def test_shared_prompt_scoring_equals_the_two_full_sequences(tiny_model_dir, attn, chat, monkeypatch):
    from tunesmith.models import segments

    calls = []
    real = segments.attend
    monkeypatch.setattr(segments, "attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, tok = _model(tiny_model_dir, attn)
    renderer = Renderer(tok, system_prompt="Answer in a few words." if chat else None)
    examples = _pairs(7, chat)
    if not chat:  # a raw-text prefix every prompt starts with, fed once per micro-batch
        examples = [
            Example("preference", prompt="Task: answer.\n" + e.prompt, chosen=e.chosen, rejected=e.rejected)
            for e in examples
        ]
    pairs = [renderer.encode_pair(e) for e in examples]
    assert all(p.prompt and p.chosen and p.rejected for p in pairs)
    with torch.no_grad():
        want = _full_sequence_logps(model, pairs)
        for shared, share_prefix in ((True, 0), (False, 0), (True, 4)):
            # rows of 64 tokens: several pairs per row, several rows; with share_prefix the common prefix apart;
            # and the same with rows padded to widths in steps of 16 (bf16 on a CPU)
            for multiple in (1, 16):
                got = _layout_logps(model, pairs, shared, share_prefix=share_prefix, width_multiple=multiple)
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert bool(calls) == (attn == "sdpa")  # SDPA: attention per prompt and answer (models/segments.py)
    shared_batch = make_pair_batches(pairs, 7, 0, 64, True)[0]
    assert shared_batch.input_ids.ne(0).sum() < sum(p.tokens for p in pairs)  # the prompts are fed once


def test_pair_encoding_matches_the_sft_encoding_of_each_answer(tokenizer):
    renderer = Renderer(tokenizer)
    ex = _pairs(4, chat=True)[0]
    pair = renderer.encode_pair(ex)
    for answer, ids, labels in (
        (ex.chosen, pair.chosen, pair.chosen_labels),
        (ex.rejected, pair.rejected, pair.rejected_labels),
    ):
        context = [Message(m.role, m.content, 0 if m.role == "assistant" else None) for m in ex.messages]
        sft = renderer.encode(Example("chat", messages=[*context, Message("assistant", answer)]))
        last = max(i for i, t in enumerate(sft.labels) if t != IGNORE)
        assert pair.prompt + ids == sft.input_ids[: last + 1]
        assert [IGNORE] * len(pair.prompt) + labels == sft.labels[: last + 1]
    assert tokenizer.decode(pair.chosen).startswith(ex.chosen)
    assert tokenizer.decode(pair.chosen).rstrip().endswith("<|im_end|>")  # the model learns to stop


def _cfg(objective, **options):
    raw = {"train": {"objective": objective}}
    for section, values in options.items():
        raw[section] = values
    return validate_config(raw, source="test")


def _direct(cfg, model, pairs, ref):
    """The papers' formulas on log-probs of the full sequences, written out here, mean over pairs."""
    logps = _full_sequence_logps(model, pairs)
    counts = torch.tensor(
        [[sum(t != IGNORE for t in p.chosen_labels), sum(t != IGNORE for t in p.rejected_labels)] for p in pairs],
        dtype=torch.float32,
    )
    pc, pr = logps[:, 0], logps[:, 1]
    objective = cfg.train.objective
    if objective == "dpo" and cfg.dpo.loss == "sigmoid":
        z = cfg.dpo.beta * ((pc - ref[:, 0]) - (pr - ref[:, 1]))
        loss = torch.log1p(torch.exp(-z))  # -log sigmoid(z)
        loss = loss + cfg.dpo.sft_weight * (-pc / counts[:, 0])
    elif objective == "dpo":  # IPO on token-averaged log-ratios
        h = (pc - ref[:, 0]) / counts[:, 0] - (pr - ref[:, 1]) / counts[:, 1]
        loss = (h - 1 / (2 * cfg.dpo.beta)) ** 2
    elif objective == "orpo":
        mc, mr = pc / counts[:, 0], pr / counts[:, 1]
        odds = lambda m: torch.exp(m) / (1 - torch.exp(m))  # noqa: E731
        loss = -mc - cfg.orpo.lambda_ * torch.log(torch.sigmoid(torch.log(odds(mc) / odds(mr))))
    else:  # simpo
        z = cfg.simpo.beta * (pc / counts[:, 0] - pr / counts[:, 1]) - cfg.simpo.gamma
        loss = -torch.log(torch.sigmoid(z))
    return loss.mean()


def _ours(cfg, model, pairs, ref):
    total = 0.0
    at = 0
    for batch in make_pair_batches(pairs, 3, 0, 64, True):
        logps = sequence_logps(pair_batch_logits(model, batch), batch).view(-1, 2)
        counts = batch.tokens_per_seq.view(-1, 2)
        part = ref[at : at + batch.n_pairs]
        out = pair_losses(cfg, logps[:, 0], logps[:, 1], counts[:, 0], counts[:, 1], part[:, 0], part[:, 1])
        total = total + out.loss.sum()
        at += batch.n_pairs
    return total / len(pairs)


@pytest.mark.parametrize(
    "objective,options",
    [
        ("dpo", {}),
        ("dpo", {"dpo": {"beta": 0.5}}),
        ("dpo", {"dpo": {"loss": "ipo", "beta": 0.2}}),
        ("dpo", {"dpo": {"sft_weight": 1.0}}),
        ("orpo", {}),
        ("orpo", {"orpo": {"lambda": 0.5}}),
        ("simpo", {}),
        ("simpo", {"simpo": {"beta": 2.5, "gamma": 0.5}}),
    ],
)
def test_losses_equal_a_direct_implementation(tiny_model_dir, objective, options):
    model, tok = _model(tiny_model_dir)
    renderer = Renderer(tok)
    pairs = [renderer.encode_pair(e) for e in _pairs(6, chat=True, seed=2)]
    cfg = _cfg(objective, **options)
    with torch.no_grad():  # a reference that differs from the policy, so the DPO/IPO terms are not at their start
        ref = _full_sequence_logps(model, pairs) + torch.linspace(-1.5, 1.0, 12).view(6, 2)
    params = [p for p in model.parameters()]

    def grads(fn):
        model.zero_grad()
        loss = fn(cfg, model, pairs, ref)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    want, want_grads = grads(_direct)
    got, got_grads = grads(_ours)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(want) > 0.01
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return write_pairs(root / "train.jsonl", 40, chat=False), write_pairs(root / "val.jsonl", 8, seed=1, chat=False)


def _args(tiny_model_dir, data, out, *extra, objective="dpo"):
    return _train_args(tiny_model_dir, data, out, "--objective", objective, *extra)


RUN_ARGS = [
    "--max-steps",
    "6",
    "--batch-size",
    "8",
    "--lr",
    "5e-3",
    "--train.save_every",
    "2",
    "--train.eval_every",
    "3",
]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adapter", "freeze", "full"])
def test_dpo_starts_at_log_2_and_learns_with_every_weight_method(tiny_model_dir, pair_data, tmp_path, method):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, pair_data, out, *RUN_ARGS, "--method", method)) == 0
    records = _records(out)
    train = [r for r in records if r["kind"] == "train"]
    # the policy starts as the reference (adapters at the identity; the bottleneck adapter nearly), so z = 0
    tol = 1e-3 if method == "adapter" else 1e-5
    assert abs(train[0]["loss"] - math.log(2)) < tol
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < math.log(2) and evals[-1]["val_reward_margin"] > 0
    assert {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"} <= set(train[-1])
    summary = json.loads((out / "data.json").read_text())
    assert summary["objective"] == "dpo" and summary["kind"] == "preference"
    assert (out / "reference_logps.safetensors").is_file()


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_orpo_and_simpo_need_no_reference(tiny_model_dir, pair_data, tmp_path, objective):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, pair_data, out, *RUN_ARGS, objective=objective)) == 0
    assert not (out / "reference_logps.safetensors").exists()
    evals = [r for r in _records(out) if r["kind"] == "eval"]
    assert evals[-1]["val_reward_margin"] > evals[0]["val_reward_margin"]


def _killed_at(point: str, args: list[str]) -> str:
    env = {**os.environ, "TUNESMITH_THREADS": "1", "TUNESMITH_TEST_KILL_AT": point}
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _resume(out: Path) -> str:
    env = {**os.environ, "TUNESMITH_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tunesmith", "train", "--resume", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_reference_is_computed_once_and_reused_after_sigkill(tiny_model_dir, pair_data, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_THREADS", "1")
    straight = tmp_path / "straight"
    assert main(_args(tiny_model_dir, pair_data, straight, *RUN_ARGS)) == 0

    out = tmp_path / "killed"
    first = _killed_at("after-reference", _args(tiny_model_dir, pair_data, out, *RUN_ARGS))
    assert "reference log-probabilities: 48 pairs" in first
    stored = (out / "reference_logps.safetensors").stat().st_mtime_ns
    second = _killed_at("after-step-3", _args(tiny_model_dir, pair_data, out, *RUN_ARGS))  # no checkpoint yet: afresh
    assert "reference log-probabilities: reused" in second and "48 pairs in" not in second
    assert (out / "checkpoints" / "step-2").is_dir()
    third = _resume(out)
    assert "resuming from" in third and "reference log-probabilities: reused" in third
    assert (out / "reference_logps.safetensors").stat().st_mtime_ns == stored

    want = load_file(straight / "model" / "adapter_model.safetensors")
    got = load_file(out / "model" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert [r["step"] for r in _records(out) if r["kind"] == "train"] == list(range(1, 7))


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_pair_data_with_sft_and_chat_data_with_dpo_stop_with_the_fix(tiny_model_dir, pair_data, tmp_path, capsys):
    train, _ = pair_data
    args = ["train", "--model", str(tiny_model_dir), "--data", str(train), "--output", str(tmp_path / "a"), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(train) in err and "preference pairs" in err and "--objective dpo" in err

    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
    )
    assert main([*args[:4], str(chat), "--output", str(tmp_path / "b"), "-q", "--objective", "dpo"]) == 2
    err = capsys.readouterr().err
    assert str(chat) in err and "holds chat examples" in err and "--objective sft" in err

    assert main([*args, "--objective", "dpo", "--method", "prefix"]) == 2
    assert "method prefix cannot be trained with train.objective dpo" in capsys.readouterr().err


def test_resume_refuses_a_changed_objective_or_changed_data(tiny_model_dir, pair_data, tmp_path, capsys):
    out = tmp_path / "run"
    train, val = write_pairs(tmp_path / "t.jsonl", 40, chat=False), pair_data[1]
    assert _killed_at("after-step-3", _args(tiny_model_dir, (train, val), out, *RUN_ARGS))

    config = out / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("objective: dpo", "objective: simpo"))
    assert main(["train", "--resume", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "trained with train.objective dpo" in err and "simpo" in err
    config.write_text(original)

    write_pairs(train, 40, seed=7, chat=False)  # the data changed under the run: its reference no longer fits
    assert main(["train", "--resume", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "reference_logps.safetensors was computed for other data" in err


def test_long_pairs_are_named_cut_or_dropped_never_silently(tiny_model_dir, tmp_path, capsys):
    rows = [{"prompt": "short question " + str(i), "chosen": " yes", "rejected": " no"} for i in range(12)]
    rows[3]["chosen"] = " " + " ".join(["word"] * 80)  # the answer does not fit: cut, and named
    rows[7]["prompt"] = " ".join(["long"] * 80)  # the prompt alone fills max_length: dropped, and named
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--objective", "dpo", "--max-steps", "1"]
    assert main([*base, "--output", str(tmp_path / "a"), "--data.max_length", "40", "--data.val_fraction", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{data}:4" in out and "answers cut to fit" in out
    assert f"{data}:8" in out and "prompt leaves no room" in out and "1 pair dropped" in out

    code = main([*base, "--output", str(tmp_path / "b"), "--data.max_length", "40", "--data.truncation", "error"])
    assert code == 2
    assert f"{data}:4" in capsys.readouterr().err


def test_pairs_need_a_prompt(tokenizer):
    from tunesmith.errors import DataError

    renderer = Renderer(tokenizer)
    with pytest.raises(DataError, match="empty prompt"):
        renderer.encode_pair(Example("preference", prompt="", chosen="a", rejected="b", source="f:3"))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def test_eval_ranks_by_the_objective_reward_and_matches_training_validation(tiny_model_dir, pair_data, tmp_path):
    """The tuned model's preference accuracy on the validation pairs is what training logged for them: the same
    pairs, model and reference (the base model on the same prompts)."""
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, pair_data, out, *RUN_ARGS)) == 0
    assert main(["eval", str(out), "--data", str(pair_data[1]), "--no-forgetting", "--shots", "2"]) == 0
    task = json.loads((out / "eval" / "task.json").read_text())
    assert task["task"] == "preference" and task["primary"] == "preference_accuracy"
    systems = {s["key"]: s for s in task["systems"]}
    assert list(systems) == ["base_zero_shot", "base_few_shot", "fine_tuned"]
    assert systems["base_few_shot"]["shots"] == 2
    assert (
        systems["base_few_shot"]["prompt_tokens_per_example"] > systems["base_zero_shot"]["prompt_tokens_per_example"]
    )
    last_eval = [r for r in _records(out) if r["kind"] == "eval"][-1]
    tuned = systems["fine_tuned"]["metrics"]
    assert tuned["preference_accuracy"] == pytest.approx(last_eval["val_reward_accuracy"])
    assert tuned["reward_margin"] == pytest.approx(last_eval["val_reward_margin"], rel=1e-4)
    examples = [json.loads(line) for line in (out / "eval" / "task_examples.jsonl").read_text().splitlines()]
    assert len(examples) == 8 and all(set(e["scores"].values()) <= {0.0, 1.0} for e in examples)
    assert sum(e["scores"]["fine_tuned"] for e in examples) / 8 == pytest.approx(tuned["preference_accuracy"])
    assert "refusal_rate_harmful" not in tuned  # these pairs carry no categories: no generation metrics
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "preference_accuracy" in html and "preference rewards and accuracy" in html  # the rewards plot
    assert "validation preference (last)" in html


def test_few_shot_pairs_put_chosen_answers_as_earlier_turns():
    from tunesmith.evaluation.preference_eval import few_shot_example

    shots = _pairs(2, chat=True, seed=5)
    ex = Example("preference", messages=[Message("system", "S"), Message("user", "Q")], chosen="a", rejected="b")
    got = few_shot_example(ex, shots[:1])
    roles = [m.role for m in got.messages]
    assert roles[0] == "system" and roles[-1] == "user" and got.messages[-1].content == "Q"
    assert Message("assistant", shots[0].chosen) in got.messages and (got.chosen, got.rejected) == ("a", "b")
    assert all(m.content != shots[0].rejected for m in got.messages)
    raw = few_shot_example(Example("preference", prompt="Q:", chosen=" a", rejected=" b"), _pairs(2, chat=False))
    assert raw.prompt.endswith("\n\nQ:") and _pairs(2, chat=False)[0].chosen in raw.prompt


def test_eval_of_a_preference_run_on_chat_rows_says_what_to_give(tiny_model_dir, pair_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, pair_data, out, "--max-steps", "1")) == 0
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
    )
    assert main(["eval", str(out), "--data", str(chat), "--no-forgetting"]) == 2
    assert "trained with train.objective dpo on preference pairs" in capsys.readouterr().err
