"""`check()` statistics and warnings, and the `tunesmith data check` command."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest

from tunesmith.cli import main
from tunesmith.data.validate import check
from tunesmith.errors import DataError

FILES = Path(__file__).parent / "data_files"
TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "smollm2-tokenizer"

DAMAGED = "My package arrived damaged and the box was soaking wet when it came"


def write_chat(path: Path, rows: list[tuple[str, str]], system: str | None = None) -> Path:
    with path.open("w") as f:
        for user, answer in rows:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_duplicates_near_duplicates_and_conflicts(tmp_path):
    path = write_chat(
        tmp_path / "train.jsonl",
        [
            (DAMAGED, "shipping"),  # 1
            ("I was charged twice for my subscription this month", "billing"),  # 2
            (DAMAGED.replace("damaged", "broken"), "shipping"),  # 3: reworded by one word
            ("The app crashes whenever I open the settings page", "tech"),  # 4
            ("My package arrived late and the box was open when it came", "shipping"),  # 5: similar, not a copy
            ("I was charged twice for my subscription this month", "billing"),  # 6: exact copy of 2
            ("i was CHARGED twice for my subscription, this month!", "refund"),  # 7: same input as 2, other answer
            ("How do I change the email address on my account", "account"),  # 8
        ],
        system="You sort customer tickets into queues. " * 5,  # shared by all rows: must not make them alike
    )
    report = check(path)
    assert (report.train.exact_duplicates, report.train.near_duplicates, report.train.conflicts) == (1, 2, 1)
    assert report.warnings == [
        f"{path}:6: warning: exact duplicate of line 2; remove one copy",
        f"{path}:3: warning: near-duplicate of line 1 (87% of words shared); remove one, or make them differ",
        f"{path}:7: warning: near-duplicate of line 2 (82% of words shared); remove one, or make them differ",
        f'{path}:7: warning: same input as line 2 but a different answer ("refund" vs "billing"); keep one '
        "answer, or make the inputs differ",
    ]


def test_templated_rows_differing_in_one_word_are_near_duplicates(tmp_path):
    # 11 distinct words each ("the" twice), 10 shared: 10/12 = 83% >= 80%
    rows = [(f"Please reset the password of user number {i} before the weekend", "done") for i in range(5)]
    path = write_chat(tmp_path / "t.jsonl", rows)
    report = check(path)
    assert report.train.near_duplicates == 4
    assert report.warnings == [
        f"{path}:{line}: warning: near-duplicate of line 1 (83% of words shared); remove one, or make them differ"
        for line in range(2, 6)
    ]


def test_distinct_rows_are_not_flagged(tmp_path):
    rng = random.Random(0)
    words = [f"word{i}" for i in range(500)]
    rows = [(" ".join(rng.sample(words, 12)), rng.choice(["a", "b", "c"])) for _ in range(300)]
    report = check(write_chat(tmp_path / "t.jsonl", rows))
    assert report.warnings == []
    assert report.train.labels == {
        label: n
        for label, n in sorted(
            ((label, sum(1 for _, a in rows if a == label)) for label in "abc"), key=lambda kv: (-kv[1], kv[0])
        )
    }


def test_train_validation_overlap(tmp_path):
    train = write_chat(
        tmp_path / "train.jsonl",
        [
            (DAMAGED, "shipping"),
            ("I was charged twice for my subscription this month", "billing"),
            ("How do I change the email address on my account", "account"),
        ],
    )
    val = write_chat(
        tmp_path / "val.jsonl",
        [
            ("The app crashes whenever I open the settings page", "tech"),
            ("I was charged twice for my subscription this month", "refund"),
            (DAMAGED.replace("soaking", "very"), "shipping"),
        ],
    )
    report = check(train, val)
    assert (report.overlap_exact, report.overlap_near) == (1, 1)
    assert report.validation.examples == 3
    assert report.warnings == [
        f"{val}:2: warning: same input as {train}:2 (the training file); remove it from one of the files so "
        "validation measures unseen examples",
        f"{val}:3: warning: near-duplicate of {train}:1 in the training file (87% of words shared); remove it "
        "from one of the files",
    ]


def test_labels_imbalance_and_unseen_validation_labels(tmp_path):
    train = write_chat(
        tmp_path / "train.jsonl",
        [(f"ticket {i} about money", "billing") for i in range(20)]
        + [("ticket about a parcel", "shipping"), ("ticket about a box", "shipping")],
    )
    val = write_chat(tmp_path / "val.jsonl", [("ticket about a login", "account"), ("a refund ticket", "billing")])
    report = check(train, val)
    assert report.train.labels == {"billing": 20, "shipping": 2}
    assert report.validation.labels == {"billing": 1, "shipping": 0, "(other)": 1}  # the training label set
    assert report.warnings == [
        f'{train}: warning: labels are imbalanced ("billing": 20 examples, "shipping": 2); add examples of the '
        'rare labels, or the model may learn to answer "billing"',
        f'{val}:1: warning: answer "account" is not one of the training file\'s labels; add examples of it to '
        "the training file, or fix the label",
    ]


def test_token_lengths_and_truncation(tmp_path, tokenizer):
    rows = [("hello", "a"), ("hello " * 20, "b"), ("hello " * 50, "a long answer " * 10)]
    path = write_chat(tmp_path / "t.jsonl", rows)
    user = sorted(len(tokenizer(u, add_special_tokens=False)["input_ids"]) for u, _ in rows)
    answers = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in rows]
    totals = sorted(len(tokenizer(u, add_special_tokens=False)["input_ids"]) + n for (u, _), n in zip(rows, answers))
    report = check(path, tokenizer=tokenizer, max_length=totals[1])
    assert report.train.tokens["user"] == {
        "p50": user[1],
        "p90": user[2],
        "p99": user[2],
        "max": user[2],
        "mean": round(sum(user) / 3, 1),
    }
    assert report.train.tokens["total"]["max"] == totals[2]
    assert report.train.over_max_length == 1
    assert report.warnings == [
        f"{path}:3: warning: {totals[2]} tokens, longer than max_length {totals[1]}: train will cut off its last "
        f"{totals[2] - totals[1]} tokens (data.truncation=truncate); raise --max-length, shorten the example, or set "
        "data.truncation=drop to leave it out"
    ]
    rendered = check(path, tokenizer=tokenizer, max_length=99, renderer=lambda ex: [0] * 100)
    assert rendered.train.tokens["total"]["p50"] == 100
    assert rendered.train.over_max_length == 3
    json.dumps(rendered.to_dict())  # JSON-serialisable as is


def test_check_reports_the_problems_of_both_files(tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": ""}\n')
    with pytest.raises(DataError) as info:
        check(FILES / "bad.jsonl", val)
    assert info.value.message == f"{FILES / 'bad.jsonl'} and {val}: 17 problems"
    assert info.value.problems[-1] == f"{val}:1: text is empty; write the text or remove the row"


def test_ten_thousand_rows_without_comparing_every_pair(tmp_path):
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    rows = [
        (" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 30))), rng.choice("abcde")) for _ in range(10_000)
    ]
    copy = [f"x{i}" for i in range(15)]
    rows[123] = (" ".join(copy), "a")
    copy[7] = "changed"
    rows.append((" ".join(copy), "a"))
    path = write_chat(tmp_path / "big.jsonl", rows)
    start = time.perf_counter()
    report = check(path)
    assert time.perf_counter() - start < 30  # ~2 s here; all 50M pairs in Python would take minutes
    assert report.warnings == [
        f"{path}:10001: warning: near-duplicate of line 124 (88% of words shared); remove one, or make them differ"
    ]


# ----------------------------------------------------------------------------------------------------
# The command


def test_cli_prints_every_problem_and_exits_2(capsys):
    path = FILES / "bad.jsonl"
    assert main(["data", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == f"error: {path}: 16 problems"
    assert lines[1] == f'{path}:2: message 2 has role "bot"; expected one of system, user, assistant'
    assert len(lines) == 17


def test_cli_missing_file(capsys):
    assert main(["data", "check", "no/such.jsonl"]) == 2
    assert capsys.readouterr().err == "error: no/such.jsonl: no such file\n"


def test_cli_summary_and_warnings(tmp_path, capsys):
    train = write_chat(tmp_path / "train.jsonl", [("a question", "yes"), ("a question", "yes"), ("other", "no")])
    assert main(["data", "check", str(train), "--validation", str(FILES / "chat.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "Dataset" in out and "chat" in out and "exact duplicates" in out
    assert f"{train}:2: warning: exact duplicate of line 1; remove one copy\n" in out
    assert "pass --model to count tokens" in out
    assert out.endswith("OK: no problems, 1 warning\n")


def test_cli_json_with_model_tokenizer(capsys):
    code = main(
        ["data", "check", str(FILES / "chat.jsonl"), "--model", str(TOKENIZER_DIR), "--max-length", "40", "--json"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["format"] == "chat"
    assert report["train"]["examples"] == 3
    assert report["max_length"] == 40
    # totals come from the chat template (SmolLM2's adds a default system prompt), so exceed the content sum
    assert report["train"]["tokens"]["total"]["max"] > sum(
        report["train"]["tokens"][r]["max"] for r in ("system", "user", "assistant")
    )
    assert report["train"]["over_max_length"] == sum("longer than max_length 40" in w for w in report["warnings"])

    # the counts, row by row: the renderer training uses for each row's total, the tokenizer for each message
    from transformers import AutoTokenizer

    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    examples = read_examples(FILES / "chat.jsonl")
    totals = sorted(len(Renderer(tok).encode(ex).input_ids) for ex in examples)
    rows = [json.loads(line) for line in (FILES / "chat.jsonl").read_text().splitlines() if line.strip()]
    by_role = {}
    for row in rows:
        counts = {}
        for m in row["messages"]:
            counts[m["role"]] = counts.get(m["role"], 0) + len(tok(m["content"], add_special_tokens=False).input_ids)
        for role, n in counts.items():
            by_role.setdefault(role, []).append(n)
    stats = report["train"]["tokens"]
    assert len(totals) == 3 and stats["total"] == {
        "p50": totals[1],  # nearest rank: the 2nd of 3
        "p90": totals[2],
        "p99": totals[2],
        "max": totals[2],
        "mean": round(sum(totals) / 3, 1),
    }
    for role, values in by_role.items():
        assert stats[role]["max"] == max(values) and stats[role]["mean"] == round(sum(values) / len(values), 1), role
    assert set(stats) == {*by_role, "total"}
    assert report["train"]["over_max_length"] == sum(t > 40 for t in totals)


def test_cli_format_flag(capsys):
    assert main(["data", "check", str(FILES / "text.jsonl"), "--format", "chat"]) == 2
    assert 'missing key "messages"' in capsys.readouterr().err


def test_check_with_a_model_counts_tokens_as_training_renders_them(capsys):
    from tunesmith.cli import main

    tok = str(Path(__file__).parent / "fixtures" / "smollm2-tokenizer")
    files = Path(__file__).parent / "data_files"
    for name in ("chat.jsonl", "preference.jsonl", "completion.csv"):
        assert main(["data", "check", str(files / name), "--model", tok, "--json"]) == 0, name
        report = json.loads(capsys.readouterr().out)
        assert report["train"]["tokens"], name  # token statistics were computed


# ----------------------------------------------------------------------------------------------------
# Issue #21: what train will do with long examples; unknown keys


def _warnings_of(args: list[str], capsys) -> list[str]:
    assert main(["data", "check", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["warnings"]


def test_check_with_a_model_warns_of_examples_longer_than_its_context(tmp_path, tiny_model_dir, capsys):
    # tiny_model_dir has a 512-token context: without --max-length, data check uses what train uses
    rows = [("short question", "short answer"), ("a question", "word " * 600), ("word " * 600, "an answer")]
    path = write_chat(tmp_path / "long.jsonl", rows)
    warnings = _warnings_of([str(path), "--model", str(tiny_model_dir)], capsys)
    assert len(warnings) == 2
    cut = re.fullmatch(
        rf"{re.escape(str(path))}:2: warning: (\d+) tokens, longer than max_length 512: train will cut off its last "
        r"(\d+) tokens \(data.truncation=truncate\); raise --max-length, shorten the example, or set "
        r"data.truncation=drop to leave it out",
        warnings[0],
    )
    assert cut and int(cut[1]) - 512 == int(cut[2]) > 0
    assert re.fullmatch(
        rf"{re.escape(str(path))}:3: warning: \d+ tokens, longer than max_length 512: train will drop it, as its "
        r"first 512 tokens hold nothing to learn \(data.truncation=truncate keeps the start\); raise --max-length "
        r"or shorten the prompt",
        warnings[1],
    )
    dropped = _warnings_of([str(path), "--model", str(tiny_model_dir), "--truncation", "drop"], capsys)
    assert [w.split(": ", 3)[3] for w in dropped] == [
        "train will drop it (data.truncation=drop); raise --max-length or shorten the example"
    ] * 2
    stopped = _warnings_of(
        [str(path), "--model", str(tiny_model_dir), "--max-length", "100", "--truncation", "error"], capsys
    )
    assert len(stopped) == 2 and all("train will stop with an error (data.truncation=error)" in w for w in stopped)
    # a max_length train would refuse is refused here too
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--max-length", "4096"]) == 2
    assert "data.max_length=4096 is longer than the model's context (512 tokens)" in capsys.readouterr().err


def test_check_without_a_model_config_assumes_what_train_assumes(tmp_path, capsys):
    # a tokenizer-only directory has no context length: train then assumes 2048, and so does the check
    path = write_chat(tmp_path / "long.jsonl", [("q", "word " * 2100), ("q2", "short")])
    warnings = _warnings_of([str(path), "--model", str(TOKENIZER_DIR)], capsys)
    assert len(warnings) == 1 and "longer than max_length 2048: train will cut off" in warnings[0]


def test_cli_unknown_keys_warn_and_strict_makes_them_errors(tmp_path, capsys):
    path = tmp_path / "extra.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b", "source": "web"}\n{"prompt": "c", "completion": "d", "source": "web"}\n'
    )
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f'{path}:1: warning: unknown key "source" is ignored (lines 1-2); remove it' in out
    assert out.endswith("OK: no problems, 1 warning\n")
    assert main(["data", "check", str(path), "--strict"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: {path}: 2 problems"
    assert err[1].startswith(f'{path}:1: unknown key "source"; remove it')


def test_cli_lone_surrogate_and_deep_nesting_are_file_line_problems(tmp_path, capsys):
    # issue #21: both ended `data check` with "internal error: TypeError/RecursionError", exit 1
    path = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
    path.write_text(good + "\n" + good.replace("Hi", "a\\ud800b") + "\n" + "[" * 100_000 + "\n")
    assert main(["data", "check", str(path), "--model", str(TOKENIZER_DIR)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: {path}: 2 problems"
    assert err[1].startswith(f"{path}:2: messages[0].content holds a lone surrogate \\ud800")
    assert err[2].startswith(f"{path}:3: nested too deeply")


# ----------------------------------------------------------------------------------------------------
# Issue #16: preference pairs: answer lengths, the length-bias warning, long pairs

BIAS = (
    'DPO can learn that longer is better (Park et al. 2024, "Disentangling Length from Quality in Direct Preference '
    'Optimization", arXiv:2403.19159); add pairs whose chosen answer is the shorter one, or trim the chosen answers'
)


def write_pairs(path: Path, pairs: list[tuple[str, str, str]], chat: bool = False) -> Path:
    with path.open("w") as f:
        for prompt, chosen, rejected in pairs:
            row = {"prompt": prompt} if not chat else {"messages": [{"role": "user", "content": prompt}]}
            f.write(json.dumps({**row, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def test_answer_lengths_and_the_length_bias_warning(tmp_path):
    # chosen 20 characters in 8 of 10 pairs, rejected 10: means 18.0 vs 10.0 (1.8x), chosen longer in 80%
    pairs = [(f"question {i}", "a" * 20, "b" * 10) for i in range(8)] + [
        (f"question {i}", "a" * 10, "b" * 10) for i in (8, 9)
    ]
    path = write_pairs(tmp_path / "pairs.jsonl", pairs)
    report = check(path)
    assert report.train.pair_lengths == {
        "unit": "characters",
        "chosen_mean": 18.0,
        "rejected_mean": 10.0,
        "chosen_longer": 0.8,
    }
    assert report.warnings == [
        f"{path}: warning: chosen answers are systematically longer than rejected ones (mean 18.0 vs 10.0 "
        f"characters; chosen longer in 80% of pairs), so {BIAS}"
    ]
    # longer on average, but in only 60% of pairs: no warning (nor for 1.2x in every pair)
    mixed = pairs[:6] + [(f"question {i}", "a" * 10, "b" * 12) for i in range(6, 10)]
    assert check(write_pairs(tmp_path / "mixed.jsonl", mixed)).warnings == []
    mild = [(f"question {i}", "a" * 12, "b" * 10) for i in range(10)]
    assert check(write_pairs(tmp_path / "mild.jsonl", mild)).warnings == []


def test_cli_shows_answer_lengths(tmp_path, capsys):
    path = write_pairs(tmp_path / "p.jsonl", [("q1", "a" * 30, "b" * 10), ("q2", "a" * 10, "b" * 10)])
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"answer length, chosen/rejected \(mean\) +│ +20\.0/10\.0 characters", out)
    assert re.search(r"chosen answer longer +│ +50% of pairs", out)
    assert out.endswith("OK: no problems, 0 warnings\n")  # 2x longer on average, but in only half the pairs


def test_answer_lengths_in_tokens_with_a_tokenizer(tmp_path, tokenizer):
    path = write_pairs(
        tmp_path / "p.jsonl", [("Hi", "Hello there, friend", "No"), ("Yo", "Hey", "Go away now")], chat=True
    )
    report = check(path, tokenizer=tokenizer)
    n = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    chosen, rejected = [n("Hello there, friend"), n("Hey")], [n("No"), n("Go away now")]
    assert report.train.pair_lengths == {
        "unit": "tokens",
        "chosen_mean": sum(chosen) / 2,
        "rejected_mean": sum(rejected) / 2,
        "chosen_longer": 0.5,
    }
    assert report.train.tokens["prompt"]["max"] == max(n("Hi"), n("Yo"))  # the content of the prompt turns


def test_cli_long_pairs_with_a_model(tmp_path, tokenizer, capsys):
    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer

    rows = [("Short question?", "Yes.", "No."), ("A question?", "word " * 60, "Nope."), ("word " * 150, "Yes.", "No.")]
    path = write_pairs(tmp_path / "pairs.jsonl", rows, chat=True)
    encoded = [Renderer(tokenizer).encode_pair(ex) for ex in read_examples(path)]  # what training feeds
    prompts = [len(p.prompt) for p in encoded]
    totals = [len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in encoded]
    max_length = (prompts[1] + totals[1]) // 2  # line 1 fits, line 2's longer answer is cut, line 3 has no room
    assert totals[0] <= max_length and prompts[1] < max_length < totals[1] and prompts[2] >= max_length
    args = [str(path), "--model", str(TOKENIZER_DIR), "--max-length", str(max_length)]
    assert main(["data", "check", *args]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: 1 problem",
        f"{path}:3: the prompt alone is {prompts[2]} tokens, so max_length {max_length} leaves no room for an answer "
        "and the pair cannot be trained; shorten the prompt, raise --max-length, or remove the pair",
    ]
    write_pairs(path, rows[:2], chat=True)
    long = (
        f"{path}:2: warning: {totals[1]} tokens (prompt {prompts[1]} + longer answer {totals[1] - prompts[1]}), "
        f"longer than max_length {max_length}: "
    )
    assert [w for w in _warnings_of(args, capsys) if "max_length" in w] == [
        long + f"the answers would be cut to fit, the longer losing its last {totals[1] - max_length} tokens "
        "(data.truncation=truncate); raise --max-length, shorten the answers, or set data.truncation=drop"
    ]
    assert [w for w in _warnings_of([*args, "--truncation", "drop"], capsys) if "max_length" in w] == [
        long + "train will drop it (data.truncation=drop); raise --max-length or shorten the answers"
    ]
    # without a limit in reach, the totals are what training encodes: the chat-templated prompt + the longer answer
    assert main(["data", "check", str(path), "--model", str(TOKENIZER_DIR), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train"]["tokens"]["total"]["max"] == totals[1]
    assert report["train"]["over_max_length"] == 0
