"""`tunesmith eval` on tiny model runs: every task kind, the file format of docs/eval-format.md, the prefix cache,
label scoring against full-sequence likelihoods, flipped lists and CLI errors."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

import tunesmith
from tunesmith.cli import main
from tunesmith.evaluation import aggregate, task_eval, tasks
from tunesmith.evaluation import systems as S
from tunesmith.evaluation.shots import pick_shots

WORDS = {
    "billing": ["invoice", "refund", "charge", "price"],
    "shipping": ["parcel", "courier", "delivery", "tracking"],
    "technical": ["crash", "error", "bug", "freeze"],
}
NAMES = ["alice", "bob", "carol", "dave"]
ITEMS = ["apples", "pears", "plums"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(user: str, answer: str, system: str | None = "Classify the ticket.") -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": msgs}


def classification_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    labels = list(WORDS)
    return [chat(f"ticket {i}: " + " ".join(rng.sample(WORDS[labels[i % 3]], 2)), labels[i % 3]) for i in range(n)]


def extraction_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _i in range(n):
        name, item, qty = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(1, 9)
        answer = {"name": name, "order": {"item": item, "qty": qty}}
        rows.append(chat(f"{name} wants {qty} {item}", json.dumps(answer), system="Extract the order as JSON."))
    return rows


def text_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        chat(
            f"describe {rng.choice(ITEMS)}",
            f"they are {rng.choice(['sweet', 'round', 'green'])} fruit, {i} of them",
            None,
        )
        for i in range(n)
    ]


def train_run(tiny_model_dir, root: Path, name: str, train_rows, test_rows, **extra) -> Path:
    train = write_jsonl(root / f"{name}-train.jsonl", train_rows)
    test = write_jsonl(root / f"{name}-test.jsonl", test_rows)
    run = tunesmith.train(
        None,
        quiet=True,
        log=lambda *_: None,
        **{
            "model.name": str(tiny_model_dir),
            "data.train": str(train),
            "data.test": str(test),
            "output": str(root / name),
            "train.max_steps": 2,
            "train.batch_size": 4,
            "train.batching": "pad",
            "data.max_length": 96,
            "train.lr": 5e-2,
            "lora.r": 4,
            "train.seed": 1,
            "data.val_fraction": 0.0,
            "train.threads": 2,
            **extra,
        },
    )
    return run.path


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-runs")
    return {
        "cls": train_run(tiny_model_dir, root, "cls", classification_rows(30, 0), classification_rows(9, 1)),
        "ext": train_run(tiny_model_dir, root, "ext", extraction_rows(24, 0), extraction_rows(6, 1)),
        "lm": train_run(
            tiny_model_dir,
            root,
            "lm",
            [{"text": f"plums and pears number {i}."} for i in range(16)],
            [{"text": "apples are round."}, {"text": "a pear, a plum and apples."}],
        ),
        "completion": train_run(
            tiny_model_dir,
            root,
            "completion",
            [
                {
                    "prompt": f"Ticket: {r['messages'][1]['content']}\nCategory:",
                    "completion": " " + r["messages"][2]["content"],
                }
                for r in classification_rows(24, 2)
            ],
            [
                {
                    "prompt": f"Ticket: {r['messages'][1]['content']}\nCategory:",
                    "completion": r["messages"][2]["content"],
                }
                for r in classification_rows(6, 3)
            ],
        ),
        "root": root,
    }


def quiet(**kw):
    return {"log": lambda *_: None, "quiet": True, "forgetting": False, **kw}


def read_examples_file(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval" / "task_examples.jsonl").read_text().splitlines()]


# ---- the engine: prefix cache, label scoring, greedy decoding ---------------------------------------------------


def _systems(run_dir: Path, shots: int = 3):
    """The fine-tuned system and a few-shot system on the same tuned model (its prompts are longer)."""
    from tunesmith.data.formats import read_examples

    run = tunesmith.load(run_dir)
    model, tok, renderer = run.load_model()
    train = read_examples(run.config.data.train)
    test = read_examples(run.config.data.test)
    few = S.System("base_few_shot", "few", model, tok, renderer, shots=pick_shots(train, shots, list(WORDS), 0))
    return S.System("fine_tuned", "tuned", model, tok, renderer), few, test


def test_label_scores_with_prefix_cache_equal_full_sequence_likelihoods(runs):
    from tunesmith.evaluation.classify import full_sequence_logprobs, score_continuations
    from tunesmith.evaluation.generate import common_prefix_length, encode_prefix

    labels = sorted(WORDS)
    *systems, test = _systems(runs["cls"])
    for system in systems:
        prompts = [system.prompt(ex) for ex in test]
        conts = [[system.pair(ex, label)[1] for label in labels] for ex in test]
        prefix_len = common_prefix_length(prompts)
        assert prefix_len > 5  # the system prompt (and shots) are shared
        cached = score_continuations(
            system.model,
            prompts,
            conts,
            pad=system.pad,
            prefix_len=prefix_len,
            prefix_cache=encode_prefix(system.model, prompts[0][:prefix_len]),
        )
        plain = score_continuations(system.model, prompts, conts, pad=system.pad)
        for p, c, row_cached, row_plain in zip(prompts, conts, cached, plain):
            full = full_sequence_logprobs(system.model, p, c, pad=system.pad)
            assert [n for _, n in row_cached] == [len(x) for x in c]
            assert [s for s, _ in row_cached] == pytest.approx([s for s, _ in full], abs=2e-5)
            assert [s for s, _ in row_plain] == pytest.approx([s for s, _ in full], abs=2e-5)
            # the predicted label is the argmax of the full-sequence log-likelihoods
            assert max(range(len(labels)), key=lambda k: row_cached[k][0]) == max(
                range(len(labels)), key=lambda k: full[k][0]
            )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_side_prompts_share_their_beginning_and_score_as_if_alone(tiny_model_dir, attn):
    """A side prompt (calibration's content-free input after the same shots) laid out as a branch of its row scores
    what it scores as a prompt of its own: branching mid-prompt, right after the shared prefix, and at the
    prompt's last token; in both mask paths."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.evaluation.classify import full_sequence_logprobs, score_rows
    from tunesmith.evaluation.generate import encode_prefix

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    rng = random.Random(5)
    shared = [rng.randrange(5, 500) for _ in range(6)]
    prompts = [shared + [rng.randrange(5, 500) for _ in range(n)] for n in (8, 3, 5)]
    conts = [[[rng.randrange(5, 500) for _ in range(n)] for n in (1, 3, 2)] for _ in prompts]
    side = [
        [(prompts[0][:10] + [7, 8], [[9, 10], [11]])],  # differs after 4 tokens of the tail
        [(shared + [33], [[12, 13, 14]]), (prompts[1][:-1] + [44, 45], [[15]])],  # right after the prefix; at the end
        [],
    ]
    with torch.no_grad():
        for prefix_len in (0, len(shared)):
            cache = encode_prefix(model, shared[:prefix_len])
            got = score_rows(model, prompts, conts, pad=0, prefix_len=prefix_len, prefix_cache=cache, side=side)
            for p, c, row in zip(prompts, conts, got.scores):
                full = full_sequence_logprobs(model, p, c, pad=0)
                assert [s for s, _ in row] == pytest.approx([s for s, _ in full], abs=2e-5)
            assert [len(r) for r in got.side] == [1, 2, 0]
            for row_side, row_got in zip(side, got.side):
                for (sp, sc), scored in zip(row_side, row_got):
                    full = full_sequence_logprobs(model, sp, sc, pad=0)
                    assert [n for _, n in scored] == [len(x) for x in sc]
                    assert [s for s, _ in scored] == pytest.approx([s for s, _ in full], abs=2e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_from_the_label_scoring_forward_equals_generation_alone(runs, attn):
    """Label scoring keeps the prompts' cache (keep_state); greedy decoding from it gives the answers greedy_batch
    gives when it encodes the prompts itself, on both mask paths (custom 4D masks, and cache copies)."""
    from unittest import mock

    import torch

    from tunesmith.evaluation.classify import score_rows
    from tunesmith.evaluation.generate import (
        common_prefix_length,
        decode_greedy,
        encode_prefix,
        encode_prompts,
        greedy_batch,
    )

    def next_step(state):  # logits of one decoding step from a state (the cache is copied, not extended)
        import copy

        ids = state.next_logits.argmax(-1)[:, None]
        mask = torch.cat([state.mask, torch.ones_like(ids)], 1)
        cache = copy.deepcopy(state.cache)
        out = few.model(input_ids=ids, attention_mask=mask, position_ids=state.lengths[:, None], past_key_values=cache)
        return state.next_logits, out.logits[:, -1]

    _, few, test = _systems(runs["cls"])
    before = few.model.config._attn_implementation
    few.model.config._attn_implementation = attn
    prompts = [few.prompt(ex) for ex in test[:5]]
    conts = [[few.pair(ex, label)[1] for label in sorted(WORDS)] for ex in test[:5]]
    n = common_prefix_length(prompts)
    kwargs = dict(stop_ids=few.renderer.stop_token_ids, stop_strings=few.renderer.stop_strings, max_new_tokens=6)
    cache = encode_prefix(few.model, prompts[0][:n])
    alone = greedy_batch(few.model, few.tokenizer, prompts, prefix_len=n, prefix_cache=cache, **kwargs)
    try:
        with torch.no_grad():
            reference = next_step(encode_prompts(few.model, prompts, pad=few.pad, prefix_len=n, prefix_cache=cache))
            for custom in (True, False):
                with mock.patch("tunesmith.models.functional.takes_custom_masks", return_value=(custom, "")):
                    got = score_rows(
                        few.model, prompts, conts, pad=few.pad, prefix_len=n, prefix_cache=cache, keep_state=True
                    )
                for ours, theirs in zip(next_step(got.state), reference):
                    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
                assert decode_greedy(few.model, few.tokenizer, got.state, **kwargs) == alone
    finally:
        few.model.config._attn_implementation = before


def test_eval_batch_size_flag_and_config(capsys):
    """eval.batch_size auto (the default) sizes batches by tokens; a number fixes them; --batch-size overrides the
    run's value either way, and a bad flag value is a usage error (exit 2)."""
    from tunesmith.cli import main
    from tunesmith.config import validate_config
    from tunesmith.evaluation.prompting import MeasureSettings

    auto = validate_config({"data": {"train": "t.jsonl"}})
    fixed = validate_config({"data": {"train": "t.jsonl"}, "eval": {"batch_size": 8}})
    assert auto.eval.batch_size == "auto"
    assert MeasureSettings.of(auto).batch_size is None and MeasureSettings.of(fixed).batch_size == 8
    assert MeasureSettings.of(fixed, "auto").batch_size is None and MeasureSettings.of(auto, 4).batch_size == 4
    for bad in ("0", "x", "-3"):
        assert main(["eval", "runs/none", "--batch-size", bad]) == 2
        assert "--batch-size" in capsys.readouterr().err


def test_cache_with_room_decodes_exactly_as_the_growing_cache(tiny_model_dir):
    """Decoding into reserved room gives bit-identical logits to transformers' growing cache, writes in place
    while there is room, and grows as before once the room is used up."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.evaluation.generate import with_room

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(5, 500, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True).past_key_values
        plain, roomy = copy.deepcopy(first), with_room(copy.deepcopy(first), 2)
        buffer = roomy.layers[0]._k.data_ptr()
        step = ids[:, -1:]
        for n in range(4):  # 2 steps in the room, then 2 beyond it
            a = model(input_ids=step, past_key_values=plain, use_cache=True).logits
            b = model(input_ids=step, past_key_values=roomy, use_cache=True).logits
            assert torch.equal(a, b)
            assert (roomy.layers[0].keys.data_ptr() == buffer) == (n < 2)
            assert roomy.get_seq_length() == plain.get_seq_length() == 8 + n
            step = a[:, -1].argmax(-1)[:, None]


def test_batches_follow_the_token_budget_or_the_given_size():
    from tunesmith.evaluation.generate import MAX_ROWS, plan_batches

    widths = [10] * 5 + [40] * 5 + [400] * 3
    assert [list(b) for b in plan_batches(widths, 4, 100)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12]]
    got = plan_batches(widths, None, 100)
    assert [i for b in got for i in b] == list(range(13))  # every row once, in order
    for b in got:
        assert len(b) == 1 or len(b) * max(widths[i] for i in b) <= 100
    assert [len(b) for b in got] == [5, 2, 2, 1, 1, 1, 1]
    assert max(len(b) for b in plan_batches([1] * 200, None, 10_000)) == MAX_ROWS


def test_few_shot_prompt_has_shots_after_the_system_prompt(runs):
    tuned, few, test = _systems(runs["cls"])
    msgs = few.messages(test[0])
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert {m.content for m in msgs if m.role == "assistant"} == set(WORDS)  # stratified: one shot per label
    assert msgs[-1].content == test[0].messages[1].content
    assert len(few.prompt(test[0])) > len(tuned.prompt(test[0]))


def test_pick_shots_is_seeded_and_stratified():
    from tunesmith.data.example import Example, Message
    from tunesmith.data.formats import read_examples  # noqa: F401  (the Example type comes from data)

    train = [Example("chat", [Message("user", f"u{i}"), Message("assistant", "ab"[i % 2])]) for i in range(20)]
    a = pick_shots(train, 4, ["a", "b"], seed=7)
    assert [e.messages[0].content for e in a] == [e.messages[0].content for e in pick_shots(train, 4, ["a", "b"], 7)]
    assert sorted(e.answer() for e in a) == ["a", "a", "b", "b"]
    assert pick_shots(train, 0, None, 7) == []
    assert len(pick_shots(train, 50, None, 7)) == 20


def test_greedy_batch_with_prefix_cache_matches_model_generate(runs):
    import torch

    from tunesmith.evaluation.generate import common_prefix_length, encode_prefix, greedy_batch

    _, few, test = _systems(runs["cls"])
    prompts = [few.prompt(ex) for ex in test[:4]]
    n = common_prefix_length(prompts)
    ours = greedy_batch(
        few.model,
        few.tokenizer,
        prompts,
        stop_ids=few.renderer.stop_token_ids,
        stop_strings=few.renderer.stop_strings,
        max_new_tokens=6,
        prefix_len=n,
        prefix_cache=encode_prefix(few.model, prompts[0][:n]),
    )
    for p, answer in zip(prompts, ours):
        out = few.model.generate(
            input_ids=torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=few.renderer.stop_token_ids,
            pad_token_id=few.pad,
        )
        assert answer == few.tokenizer.decode(out[0, len(p) :], skip_special_tokens=True)


def test_decoding_drops_finished_rows_and_answers_as_if_it_kept_them(tmp_path, monkeypatch):
    """Rows that stop early leave the batch (generate.COMPACT_AT); the others' answers do not change, with or without
    a shared prefix cache."""
    import copy
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import build_tiny_model
    from tunesmith.evaluation import generate as G

    path = build_tiny_model(tmp_path / "untied", seed=3, tied=False)  # untied: answers depend on the prompt
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)
    shared = [rng.randrange(100, 5000) for _ in range(4)]
    prompts = [shared + [rng.randrange(100, 5000) for _ in range(rng.randrange(2, 9))] for _ in range(8)]
    tokens: dict[int, list[int]] = {}
    G.greedy_batch(
        model, tok, prompts, stop_ids=[], max_new_tokens=8, on_token=lambda row, t: tokens.setdefault(row, []).append(t)
    )
    # stop at tokens that end some rows early and not others
    stops = [t for t in dict.fromkeys(row[1] for row in tokens.values())][:2]
    ends = [next((k for k, t in enumerate(row) if t in stops), 8) for row in tokens.values()]
    assert min(ends) < 3 and max(ends) >= 6, (tokens, stops)
    widths = []
    real_forward = model.forward

    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[0])
        return real_forward(*args, **kwargs)

    for prefix in (0, len(shared)):
        cache = G.encode_prefix(model, shared) if prefix else None
        answers, batch_rows = {}, {}
        for compact_at in (4, 0):  # 0: never drop a row
            monkeypatch.setattr(G, "COMPACT_AT", compact_at)
            monkeypatch.setattr(model, "forward", spy)
            widths.clear()
            answers[compact_at] = G.greedy_batch(
                model,
                tok,
                prompts,
                stop_ids=stops,
                max_new_tokens=8,
                prefix_len=prefix,
                prefix_cache=cache and copy.deepcopy(cache),
            )
            monkeypatch.undo()
            batch_rows[compact_at] = list(widths)
        assert answers[4] == answers[0]
        assert min(batch_rows[4]) < len(prompts) == min(batch_rows[0])


def test_memo_key_is_the_weights_content_and_is_off_for_peft_models_and_when_disabled(tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.evaluation import memo

    monkeypatch.setenv("TUNESMITH_EVAL_CACHE", "1")
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    b = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert memo.key(a, {"x": 1}) == memo.key(b, {"x": 1}) != memo.key(a, {"x": 2})
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-6  # one weight changed in place, a rounding error's worth
    assert memo.key(a, {"x": 1}) != memo.key(b, {"x": 1})
    assert memo.key(a.to(torch.bfloat16), {"x": 1}) != memo.key(b, {"x": 1})
    from peft import LoraConfig, get_peft_model

    assert memo.key(get_peft_model(b, LoraConfig(r=2, target_modules=["q_proj"])), {"x": 1}) is None
    monkeypatch.setenv("TUNESMITH_EVAL_CACHE", "0")
    assert memo.key(a, {"x": 1}) is None


def test_memo_folder_follows_the_environment_and_the_jobs_service_gives_each_tenant_its_own(tmp_path, monkeypatch):
    from tunesmith.evaluation import memo
    from tunesmith.jobs.worker import Worker

    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNESMITH_EVAL_CACHE_DIR", raising=False)
    assert memo.folder() == tmp_path / "home" / "eval-cache"
    monkeypatch.setenv("TUNESMITH_EVAL_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert memo.folder() == tmp_path / "elsewhere"
    worker = Worker.__new__(Worker)  # only its jobs folder matters here
    worker.jobs_dir = tmp_path / "jobs"
    a, b = worker._eval_cache({"tenant": "acme"}), worker._eval_cache({"tenant": "../other"})
    assert a != b and a == worker._eval_cache({"tenant": "acme"})
    assert all(Path(x).parent == tmp_path / "jobs" / "eval-cache" for x in (a, b))


def test_a_second_evaluation_reuses_identical_measurements_and_only_those(runs, tmp_path, monkeypatch):
    """Evaluating the same run on the same data again measures nothing (every system and the probe's base half are
    reused, and say so), with the same numbers; other test data is measured."""
    from tunesmith.evaluation import measure as M

    monkeypatch.setenv("TUNESMITH_EVAL_CACHE", "1")
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    calls = []
    real = M._score_labels
    monkeypatch.setattr(M, "_score_labels", lambda *a, **k: calls.append(a[0].key) or real(*a, **k))
    kw = {**quiet(forgetting=True), "shots": 3, "knn_shots": 2, "select_limit": 4, "probe_limit": 8}
    first = tunesmith.evaluate(runs["cls"], **kw)
    measured = list(calls)
    assert "fine_tuned" in measured and len(measured) >= 5  # 4 variants' prompts on validation, then the test split
    assert not any("reused" in s for s in first["systems"]) and "base_reused" not in first["forgetting"]
    calls.clear()
    second = tunesmith.evaluate(runs["cls"], **kw)
    assert calls == []
    assert all(s["reused"] for s in second["systems"]) and second["forgetting"]["base_reused"]
    assert [s["metrics"] for s in second["systems"]] == [s["metrics"] for s in first["systems"]]
    assert second["forgetting"]["questions"] == first["forgetting"]["questions"]
    # one test answer changed: the test-split measurements are new, the validation ones are still reused
    rows = [json.loads(line) for line in Path(runs["cls"], "..", "cls-test.jsonl").read_text().splitlines()]
    answer = rows[0]["messages"][-1]
    answer["content"] = next(w for w in sorted(WORDS) if w != answer["content"])
    other = write_jsonl(tmp_path / "other-test.jsonl", rows)
    calls.clear()
    third = tunesmith.evaluate(runs["cls"], data=str(other), **{**kw, "forgetting": False})
    assert {"zero_shot", "fine_tuned"} <= set(calls) and len(calls) == len(set(calls))
    assert not any("reused" in s for s in third["systems"])
    assert all(v.get("reused") for v in third["prompt_selection"]["variants"])
    # --fresh measures everything again
    calls.clear()
    flags = ["--shots", "3", "--knn-shots", "2", "--select-limit", "4", "--no-forgetting", "--quiet"]
    assert main(["eval", str(runs["cls"]), *flags, "--fresh"]) == 0
    fresh = json.loads((runs["cls"] / "eval" / "task.json").read_text())
    assert len(calls) >= 5 and not any("reused" in s for s in fresh["systems"])
    assert [s["metrics"] for s in fresh["systems"]] == [s["metrics"] for s in first["systems"]]


# ---- task detection ------------------------------------------------------------------------------------------


def _examples(rows):
    import tempfile

    from tunesmith.data.formats import read_examples

    with tempfile.TemporaryDirectory() as d:
        return read_examples(str(write_jsonl(Path(d) / "x.jsonl", rows)))


def test_plan_task_detects_each_kind_and_metric_overrides():
    cls, ext, txt = _examples(classification_rows(30, 0)), _examples(extraction_rows(6, 0)), _examples(text_rows(6, 0))
    lm = _examples([{"text": "some words"}])
    assert tasks.plan_task(cls, cls[:6], None, None) == tasks.TaskPlan(
        "classification", "accuracy", sorted(WORDS), ("score", "generate")
    )
    assert tasks.plan_task(cls, ext, None, None).task == "extraction"  # test answers are not the training labels
    assert tasks.plan_task(ext, ext, None, None).primary == "field_f1"
    assert tasks.plan_task(txt, txt, None, None).task == "text"
    assert tasks.plan_task(lm, lm, None, None) == tasks.TaskPlan("lm", "perplexity")
    assert tasks.plan_task(cls, cls, None, "generate").primary == "accuracy_generated"
    assert tasks.plan_task(ext, ext, "text", None).task == "text"
    assert tasks.plan_task(ext, ext, "exact_match", None) == tasks.TaskPlan("extraction", "exact_match")
    assert tasks.plan_task(txt, txt, "rouge_l", None) == tasks.TaskPlan("text", "rouge_l")
    with pytest.raises(tunesmith.errors.ConfigError, match="--metric 'bleu' is not known"):
        tasks.plan_task(txt, txt, "bleu", None)
    with pytest.raises(tunesmith.errors.DataError, match="extraction needs every reference answer to be a JSON object"):
        tasks.plan_task(txt, txt, "extraction", None)
    with pytest.raises(tunesmith.errors.ConfigError, match="needs generation"):
        tasks.plan_task(cls, cls, "invalid_rate", "score")


def test_example_ids_come_from_the_rows_or_their_lines(tmp_path):
    from tunesmith.data.formats import read_examples

    rows = classification_rows(2, 0)
    rows[0]["id"] = "t-017"
    path = write_jsonl(tmp_path / "ids.jsonl", rows)
    assert task_eval.example_ids(str(path), read_examples(str(path))) == ["t-017", "line-2"]


def test_flipped_lists_follow_the_per_example_scores():
    records = [
        {
            "id": "a",
            "input": "i",
            "reference": "r",
            "outputs": {"base_zero_shot": "x", "fine_tuned": "r"},
            "scores": {"base_zero_shot": 0.0, "fine_tuned": 1.0},
        },
        {
            "id": "b",
            "input": "i",
            "reference": "r",
            "outputs": {"base_zero_shot": "r", "fine_tuned": "x"},
            "scores": {"base_zero_shot": 0.9, "fine_tuned": 0.2},
        },
        {
            "id": "c",
            "input": "i",
            "reference": "r",
            "outputs": {"base_zero_shot": "r", "fine_tuned": "r"},
            "scores": {"base_zero_shot": 0.6, "fine_tuned": 0.9},
        },  # passes both times: not flipped
    ]
    out = aggregate.flipped(None, records, "chrf")
    assert [x["id"] for x in out["improved"]] == ["a"] and out["improved"][0]["tuned"] == "r"
    assert [x["id"] for x in out["regressed"]] == ["b"] and out["regressed"][0]["base"] == "r"
    assert aggregate.flipped(None, records, "perplexity") == {"improved": [], "regressed": []}


# ---- whole evaluations per task kind ---------------------------------------------------------------------------


def test_classification_eval_writes_the_documented_files(runs, capsys):
    run_dir = runs["cls"]
    assert main(["eval", str(run_dir), "--quiet", "--no-forgetting", "--shots", "3", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "base, zero-shot" in printed and "fine-tuned" in printed and "macro-F1" in printed

    result = json.loads((run_dir / "eval" / "task.json").read_text())
    assert result["version"] == 1 and result["task"] == "classification" and result["primary"] == "accuracy"
    assert result["labels"] == sorted(WORDS)
    assert result["data"]["examples"] == 9 and len(result["data"]["sha256"]) == 64
    assert [s["key"] for s in result["systems"]] == [
        "base_zero_shot",
        "base_few_shot",
        "base_best_prompt",
        "fine_tuned",
    ]
    assert result["examples_file"] == "task_examples.jsonl"
    # the best prompt was chosen on validation examples among every variant, and is the best of them there
    selection = result["prompt_selection"]
    assert selection["examples"] >= 1 and selection["metric"] == "accuracy" and len(selection["variants"]) == 16
    best = max(v["value"] for v in selection["variants"])
    chosen = next(v for v in selection["variants"] if v["key"] == selection["chosen"])
    assert chosen["value"] == best and chosen == next(v for v in selection["variants"] if v["value"] == best)
    assert result["systems"][2]["prompt"]["key"] == selection["chosen"]
    examples = read_examples_file(run_dir)
    assert len(examples) == 9 and examples[0]["id"] == "line-1" and examples[0]["input"].startswith("ticket 0")
    for s in result["systems"]:
        m = s["metrics"]
        assert set(m) == {"accuracy", "macro_f1", "accuracy_generated", "macro_f1_generated", "invalid_rate"}
        assert set(m) <= set(result["metrics_info"])
        assert all(0 <= v <= 1 for v in m.values())
        assert sum(map(sum, s["confusion"])) == 9 and len(s["confusion"]) == 3
        assert sum(v["support"] for v in s["per_label"].values()) == 9
        # the metrics agree with the per-example records
        assert m["accuracy"] == pytest.approx(sum(e["scores"][s["key"]] for e in examples) / 9)
        assert m["accuracy"] == pytest.approx(sum(e["outputs"][s["key"]] == e["reference"] for e in examples) / 9)
        assert s["seconds"] > 0 and s["seconds_per_example"] == pytest.approx(s["seconds"] / 9)
        assert {"score", "generate"} <= set(s["seconds_by_mode"]) <= {"score", "generate", "calibration"}
    tokens = {s["key"]: s["prompt_tokens_per_example"] for s in result["systems"]}
    assert tokens["base_few_shot"] > tokens["base_zero_shot"] == tokens["fine_tuned"]
    assert result["systems"][1]["shots"] == 3
    assert all(
        set(e["generated"]) == {"base_zero_shot", "base_few_shot", "base_best_prompt", "fine_tuned"} for e in examples
    )
    # flipped: exactly the examples whose base and tuned outcome differ
    changed = {
        e["id"]: e["scores"]["fine_tuned"] > e["scores"]["base_zero_shot"]
        for e in examples
        if e["scores"]["fine_tuned"] != e["scores"]["base_zero_shot"]
    }
    assert {x["id"] for x in result["flipped"]["improved"]} == {k for k, up in changed.items() if up}
    assert {x["id"] for x in result["flipped"]["regressed"]} == {k for k, up in changed.items() if not up}


def test_label_scoring_prediction_is_the_most_likely_label(runs):
    """The eval's fine-tuned predictions equal the argmax of full-sequence likelihoods, label by label."""
    from tunesmith.evaluation.classify import full_sequence_logprobs

    run_dir = runs["cls"]
    tunesmith.evaluate(run_dir, shots=0, by="score", **quiet())
    examples = read_examples_file(run_dir)
    tuned, _, test = _systems(run_dir)
    labels = sorted(WORDS)
    for ex, rec in zip(test, examples):
        p = tuned.prompt(ex)
        full = full_sequence_logprobs(tuned.model, p, [tuned.pair(ex, label)[1] for label in labels], pad=tuned.pad)
        assert rec["outputs"]["fine_tuned"] == labels[max(range(3), key=lambda k: full[k][0])]
    assert "generated" not in examples[0]


def test_extraction_eval(runs, monkeypatch):
    """The eval's extraction metrics, for answers we choose, against values computed by hand (not by the metrics
    module the eval calls). The model's generation is replaced by fixed answers to the 3 test inputs: one exact, one
    in a code fence with the name's case changed and a wrong quantity, one not JSON."""
    import re

    from tunesmith.evaluation import measure

    answers = {
        "bob wants 2 plums": '{"name": "bob", "order": {"item": "plums", "qty": 2}}',
        "carol wants 8 apples": '```json\n{"name": "Carol", "order": {"item": "apples", "qty": 9}}\n```',
        "dave wants 7 pears": "dave wants pears",
    }

    def fixed_answers(system, prompts, *args, **kwargs):
        texts = [system.tokenizer.decode(p) for p in prompts]
        # the last order in a prompt is its input (few-shot prompts show others first); inputs that are not among
        # the 3 test examples (validation examples for choosing the best prompt) get a non-answer
        return [answers.get(re.findall(r"\w+ wants \d \w+", t)[-1], "no answer") for t in texts]

    monkeypatch.setattr(measure, "_generate", fixed_answers)
    result = tunesmith.evaluate(runs["ext"], shots=1, limit=3, max_new_tokens=24, **quiet())
    assert result["task"] == "extraction" and result["primary"] == "field_f1"
    examples = read_examples_file(runs["ext"])
    assert [json.loads(e["reference"])["name"] for e in examples] == ["bob", "carol", "dave"]
    # (key, value) pairs per reference: name, order.item, order.qty. bob: 3 right; carol: name (case is normalised)
    # and item right, qty 9 for 8 (1 false positive, 1 missed); dave: nothing parsed (3 missed).
    # tp 5, fp 1, fn 4: precision 5/6, recall 5/9, F1 2PR/(P+R) = (50/54) / (25/18) = 2/3
    expected = {
        "parse_rate": 2 / 3,
        "schema_match_rate": 2 / 3,  # carol's object has every key, with the references' types
        "exact_match": 1 / 3,
        "field_precision": 5 / 6,
        "field_recall": 5 / 9,
        "field_f1": 2 / 3,
    }
    for s in result["systems"]:
        assert {k: s["metrics"][k] for k in expected} == pytest.approx(expected), s["key"]
        assert [e["outputs"][s["key"]] for e in examples] == [a.strip() for a in answers.values()]
        assert s["metrics"]["perplexity"] == pytest.approx(math.exp(s["metrics"]["loss"]))
        assert s["metrics"]["loss"] > 0


def test_text_eval_on_another_test_file(runs):
    data = write_jsonl(runs["root"] / "free-text.jsonl", text_rows(5, 3))
    result = tunesmith.evaluate(runs["ext"], data=str(data), shots=0, max_new_tokens=12, **quiet())
    assert result["task"] == "text" and result["primary"] == "chrf"
    assert result["data"]["path"] == str(data)
    assert [s["key"] for s in result["systems"]] == ["base_zero_shot", "base_best_prompt", "fine_tuned"]
    assert result["prompt_selection"]["metric"] == "chrf"  # chosen on the run's validation split, not on `data`
    for s in result["systems"]:
        assert {"chrf", "rouge_l", "token_f1", "exact_match", "loss", "perplexity"} == set(s["metrics"])
        assert s["metrics"]["perplexity"] == pytest.approx(math.exp(s["metrics"]["loss"]))


def test_format_rate_is_the_share_of_answers_matching_the_format(runs):
    from tunesmith.evaluation import metrics as M

    data = write_jsonl(runs["root"] / "free-text-format.jsonl", text_rows(5, 4))
    pattern = r"[a-z ,0-9]+"
    result = tunesmith.evaluate(
        runs["ext"], data=str(data), shots=1, max_new_tokens=12, answer_format=pattern, **quiet()
    )
    assert result["primary"] == "chrf"
    examples = read_examples_file(runs["ext"])
    for s in result["systems"]:
        outputs = [e["outputs"][s["key"]] for e in examples]
        expected = sum(re.fullmatch(pattern, o.strip()) is not None for o in outputs) / len(outputs)
        assert s["metrics"]["format_rate"] == pytest.approx(expected)
    assert M.format_matches(
        [
            "Answer: yes\nWhy: it is\nConfidence: high  ",
            "Answer: yes\nConfidence: high",
            "Answer: yes\nWhy: it is\nConfidence: sure",
        ],
        r"Answer: .+\nWhy: .+\nConfidence: (high|medium|low)",
    ) == [1.0, 0.0, 0.0]
    as_primary = tunesmith.evaluate(
        runs["ext"], data=str(data), shots=0, max_new_tokens=12, metric="format_rate", answer_format=pattern, **quiet()
    )
    assert as_primary["primary"] == "format_rate"


def test_reference_loss_equals_the_models_own_loss(runs):
    """The extraction/text loss of one example is the mean NLL of its answer tokens: what the model's forward
    with labels (-100 on the prompt) gives."""
    import torch

    result = tunesmith.evaluate(runs["ext"], shots=0, limit=1, **quiet())
    tuned, _, test = _systems(runs["ext"])
    prompt, cont = tuned.pair(test[0], test[0].answer())
    ids = torch.tensor([prompt + cont])
    labels = torch.tensor([[-100] * len(prompt) + cont])
    with torch.no_grad():
        loss = float(tuned.model(input_ids=ids, labels=labels).loss)
    assert result["systems"][-1]["metrics"]["loss"] == pytest.approx(loss, abs=1e-4)


def test_lm_eval_perplexity_of_held_out_text(runs):
    import torch

    result = tunesmith.evaluate(runs["lm"], **quiet())
    assert result["task"] == "lm" and result["primary"] == "perplexity"
    assert [s["key"] for s in result["systems"]] == ["base_zero_shot", "fine_tuned"]  # no few-shot for raw text
    assert result["flipped"] == {"improved": [], "regressed": []}
    model, tok, renderer = tunesmith.load(runs["lm"]).load_model()
    nll = count = 0
    for text in ("apples are round.", "a pear, a plum and apples."):
        ids = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id]])
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids).loss)
        nll, count = nll + loss * (ids.shape[1] - 1), count + ids.shape[1] - 1
    tuned = result["systems"][-1]["metrics"]
    assert tuned["loss"] == pytest.approx(nll / count, abs=1e-4)
    assert tuned["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_completion_run_is_prompted_raw_when_fine_tuned_and_as_chat_for_base(runs):
    result = tunesmith.evaluate(runs["completion"], shots=3, **quiet())
    assert result["task"] == "classification"
    tokens = {s["key"]: s["prompt_tokens_per_example"] for s in result["systems"]}
    # the fine-tuned model sees the raw prompt only; the base model sees it inside the chat template
    assert tokens["fine_tuned"] < tokens["base_zero_shot"] < tokens["base_few_shot"]
    examples = read_examples_file(runs["completion"])
    assert examples[0]["input"].startswith("Ticket: ticket 0")


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_cli_errors_exit_2_with_a_clear_message(runs, tmp_path, capsys):
    run_dir = runs["cls"]
    assert main(["eval", str(run_dir), "--metric", "bleu", "--quiet", "--no-forgetting"]) == 2
    assert "--metric 'bleu' is not known" in capsys.readouterr().err

    assert main(["eval", str(run_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "test data file not found" in capsys.readouterr().err

    no_test = tmp_path / "no-test"
    no_test.mkdir()
    cfg = (run_dir / "config.yaml").read_text().replace(f"test: {runs['root'] / 'cls-test.jsonl'}", "test: null")
    (no_test / "config.yaml").write_text(cfg)
    (no_test / "model").symlink_to(run_dir / "model")
    assert main(["eval", str(no_test)]) == 2
    assert "no test data to evaluate on; pass --data test.jsonl" in capsys.readouterr().err

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main(["eval", str(unfinished)]) == 2
    assert "no model/ folder" in capsys.readouterr().err

    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err

    assert main(["eval", str(run_dir), "--limit", "0"]) == 2
    assert "--limit 0" in capsys.readouterr().err

    assert main(["eval", str(run_dir), "--format", "Answer: (", "--no-forgetting"]) == 2
    assert "--format 'Answer: (': not a valid regular expression" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--metric", "format_rate", "--no-forgetting"]) == 2
    assert "--metric format_rate needs the format: pass --format REGEX" in capsys.readouterr().err


# ---- the real default model ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.long  # ~90 s; test_end_to_end trains and evaluates the real model in the default suite
def test_real_model_ticket_triage_eval(tmp_path):
    """A short LoRA run of the default model, then the eval on 16 test tickets: the fine-tuned model's label
    scoring picks the label that greedy generation names wherever generation names one. (Speed is measured by
    bench/eval_speed.py, never asserted in a test.)"""
    from tunesmith.evaluation.classify import parse_label

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(root / "recipes" / "ticket-triage-lora.yaml"),
                "--output",
                str(out),
                "--quiet",
                "--max-steps",
                "4",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    # a small prompt selection keeps the real-model path covered (6 validation tickets, 3 retrieved shots)
    result = tunesmith.evaluate(out, limit=16, shots=5, knn_shots=3, select_limit=6, **quiet())
    assert result["prompt_selection"]["examples"] == 6 and len(result["prompt_selection"]["variants"]) == 16
    assert result["labels"] == ["account", "billing", "other", "shipping", "technical"]
    examples = read_examples_file(out)
    for s in result["systems"]:
        key = s["key"]
        pairs = [(e["outputs"][key], parse_label(e["generated"][key], result["labels"])) for e in examples]
        valid = [(a, b) for a, b in pairs if b is not None]
        if key == "fine_tuned":  # a prompted base model may say "Billing." and still prefer another label's turn
            assert valid and all(a == b for a, b in valid), valid
        assert s["seconds_by_mode"]["score"] > 0 and s["seconds_by_mode"]["generate"] > 0
    # four steps teach the answer format (a label), not yet the task: the base model answers 16/16 in prose
    base, tuned = result["systems"][0]["metrics"], result["systems"][-1]["metrics"]
    assert base["invalid_rate"] == 1.0 and tuned["invalid_rate"] <= 0.5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_scoring_equals_full_sequences_and_the_copying_path(tiny_model_dir, attn):
    """One forward with every continuation side by side (4D mask) gives the log-likelihoods of scoring each
    prompt + continuation whole, for prompts and continuations of different lengths (1-token continuations,
    which feed nothing, included), with and without a shared prefix, and equals the cache-copying path."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.evaluation.classify import _score_with_copies, full_sequence_logprobs, score_continuations
    from tunesmith.evaluation.generate import encode_prefix

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    rng = random.Random(3)
    shared = [rng.randrange(5, 500) for _ in range(7)]
    prompts = [shared + [rng.randrange(5, 500) for _ in range(n)] for n in (1, 6, 3, 9)]
    conts = [
        [[rng.randrange(5, 500) for _ in range(n)] for n in lens] for lens in ([1, 3, 2], [4, 1], [2, 2, 5, 1], [1])
    ]
    with torch.no_grad():
        for prefix_len in (0, len(shared)):
            cache = encode_prefix(model, shared[:prefix_len])
            tree = score_continuations(model, prompts, conts, pad=0, prefix_len=prefix_len, prefix_cache=cache)
            copies, _ = _score_with_copies(
                model,
                prompts,
                conts,
                pad=0,
                prefix_len=prefix_len,
                prefix_cache=encode_prefix(model, shared[:prefix_len]),
            )
            for p, c, row_tree, row_copies in zip(prompts, conts, tree, copies):
                full = full_sequence_logprobs(model, p, c, pad=0)
                assert [n for _, n in row_tree] == [len(x) for x in c]
                assert [s for s, _ in row_tree] == pytest.approx([s for s, _ in full], abs=2e-5)
                assert [s for s, _ in row_copies] == pytest.approx([s for s, _ in full], abs=2e-5)
