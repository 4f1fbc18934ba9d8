"""Reading data files: every format and extension, every problem with its exact message, splitting."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tunesmith.data.example import Example, Message
from tunesmith.data.formats import read_examples, read_file
from tunesmith.data.split import split_train_val
from tunesmith.data.validate import is_classification
from tunesmith.errors import DataError

FILES = Path(__file__).parent / "data_files"


def problems_of(path, **kw) -> list[str]:
    with pytest.raises(DataError) as info:
        read_examples(path, **kw)
    return info.value.problems


def chat(user: str, answer: str, source: str = "") -> Example:
    return Example("chat", [Message("user", user), Message("assistant", answer)], source=source)


# ----------------------------------------------------------------------------------------------------
# Good files: one table of cases, one test

GOOD = [
    # file, detected format, sources of the examples, (first example's fields)
    (
        "chat.jsonl",
        "chat",
        ["1", "2", "4"],
        {
            "messages": [
                ("system", "You sort support tickets.", None),
                ("user", "My card was charged twice.", None),
                ("assistant", "billing", None),
            ]
        },
    ),
    (
        "alpaca.json",
        "alpaca",
        ["2", "7", "8"],
        {"messages": [("user", "Translate to French.\n\nGood morning", None), ("assistant", "Bonjour", None)]},
    ),
    (
        "alpaca_data.json",
        "alpaca",
        ["2", "3"],
        {"messages": [("user", "Translate to French.\n\nGood night", None), ("assistant", "Bonne nuit", None)]},
    ),
    ("completion.csv", "completion", ["2", "4"], {"prompt": "Q: capital of France?\nA:", "completion": " Paris"}),
    ("chat.csv", "chat", ["2", "3"], {"messages": [("user", "Hi", None), ("assistant", "Hello!", None)]}),
    ("text.jsonl", "text", ["1", "2"], {"text": "The first document."}),
    ("notes.txt", "text", ["1", "5", "7"], {"text": "The first paragraph\nspans two lines."}),
    (
        "preference.jsonl",
        "preference",
        ["1", "2"],
        {
            "prompt": "Summarise: the cat sat on the mat.",
            "chosen": "A cat sat on a mat.",
            "rejected": "Dogs are great.",
            "messages": [],
            "metadata": None,
        },
    ),
    (
        "preference_chat.jsonl",
        "preference",
        ["1", "2", "3"],
        {
            "messages": [("system", "Answer in one sentence.", None), ("user", "What is the capital of France?", None)],
            "prompt": None,
            "chosen": "Paris.",
            "rejected": "I think it may be Lyon.",
            "metadata": {"topic": "geography"},
        },
    ),
    (
        "preference_openai.jsonl",
        "preference",
        ["1", "2"],
        {
            "messages": [("user", "Is it cold in Oslo in January?", None)],
            "prompt": None,
            "chosen": "Yes: January in Oslo averages around -4 °C, with snow most days.",
            "rejected": "It depends.",
            "metadata": None,
        },
    ),
]


@pytest.mark.parametrize("name, fmt, lines, first", GOOD, ids=[case[0] for case in GOOD])
def test_good_files(name, fmt, lines, first):
    path = FILES / name
    data = read_file(path)
    assert data.format == fmt
    assert [ex.source for ex in data.examples] == [f"{path}:{line}" for line in lines]
    ex = data.examples[0]
    for key, expected in first.items():
        if key == "messages":
            assert [(m.role, m.content, m.weight) for m in ex.messages] == expected
        else:
            assert getattr(ex, key) == expected


def test_chat_weights_and_ignored_keys():
    examples = read_examples(FILES / "chat.jsonl")
    assert [(m.role, m.weight, m.trained) for m in examples[1].messages] == [
        ("user", None, False),
        ("assistant", 0, False),
        ("user", None, False),
        ("assistant", 1, True),
    ]
    assert examples[2].answer() == "Bonjour !"  # its "id" key was read and dropped


def test_txt_without_blank_lines_is_one_example(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("line one\nline two\n")
    assert [ex.text for ex in read_examples(path)] == ["line one\nline two"]


@pytest.mark.parametrize("messages_as_json", [False, True])
def test_parquet(tmp_path, messages_as_json):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    messages = [json.dumps(convo)] if messages_as_json else [convo]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": messages}), path)
    data = read_file(path)
    assert data.format == "chat"
    assert [(m.role, m.content) for m in data.examples[0].messages] == [("user", "Hi"), ("assistant", "Hello!")]
    assert data.examples[0].source == f"{path}:row 1"


def test_parquet_alpaca_with_null_input(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "alpaca.parquet"
    table = pa.table({"instruction": ["Add 1 and 2", "Name a colour"], "input": [None, "warm"], "output": ["3", "red"]})
    pq.write_table(table, path)
    examples = read_examples(path)
    assert [ex.messages[0].content for ex in examples] == ["Add 1 and 2", "Name a colour\n\nwarm"]


# ----------------------------------------------------------------------------------------------------
# Bad files: the exact messages


def test_bad_jsonl_lists_every_problem_exactly():
    path = FILES / "bad.jsonl"
    with pytest.raises(DataError) as info:
        read_examples(path)
    assert info.value.message == f"{path}: 16 problems"
    expected = [
        '2: message 2 has role "bot"; expected one of system, user, assistant',
        "3: invalid JSON at column 97: Expecting ',' delimiter; write one complete JSON object per line",
        '4: unknown key "mesages"; did you mean "messages"?',
        "5: row looks like alpaca (keys instruction, output) but most rows are chat (first at line 1); "
        "use one format per file",
        '6: row is a list, not an object; write each row as a JSON object such as {"messages": [...]}',
        "8: message 1 has empty content; write the text or remove the message",
        "9: no assistant message; add the assistant reply the model should learn",
        "10: last message is from user; end the conversation with the assistant reply, or remove the trailing message",
        "11: message 1 content is a list; expected a string",
        '12: messages is a string; expected a list of {"role": ..., "content": ...} objects',
        "13: message 2 has weight 2; expected 0 (do not train on this reply) or 1",
        "14: message 1 is from user but has a weight; only assistant messages take a weight, remove it",
        '15: unknown key "labels"; remove it (chat rows have messages; id and metadata are allowed and ignored)',
        '15: message 2 has unknown key "contnet"; did you mean "content"?',
        "16: messages is empty; add a user message and the assistant reply",
        "17: every assistant message has weight 0; set weight 1 (or remove weight) on the replies to learn",
    ]
    assert info.value.problems == [f"{path}:{line}" for line in expected]


def test_non_utf8_line_is_reported_and_other_lines_still_checked(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        b'{"text": "fine"}\n'
        b'{"text": "caf\xe9"}\n'  # Latin-1 e-acute: byte 13 of the line (from 0), 17 + 13 into the file
        b'{"txt": "typo"}\n'
    )
    assert problems_of(path) == [
        f"{path}:2: invalid UTF-8 byte 0xE9 at byte offset 30; save the file with UTF-8 encoding",
        f'{path}:3: unknown key "txt"; did you mean "text"?',
    ]


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_examples(path)
    assert str(info.value) == (
        f"{path}: 1 problem\n"
        f'{path}: the file is empty; write one JSON object per line, e.g. {{"messages": [{{"role": "user", '
        '"content": "..."}, {"role": "assistant", "content": "..."}]}'
    )


def test_committed_empty_file_and_empty_csv(tmp_path):
    assert problems_of(FILES / "empty.jsonl")[0].startswith(f"{FILES / 'empty.jsonl'}: the file is empty;")
    path = tmp_path / "e.csv"
    path.write_text("")
    assert problems_of(path) == [
        f"{path}: the file is empty; write a header row (e.g. instruction,input,output) and one row per example"
    ]


def test_json_file_problems_carry_the_line_of_the_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c",\n   "completion": 7},\n  "x"\n]\n')
    assert problems_of(path) == [
        f"{path}:3: completion is a number (7); expected a string",
        f'{path}:5: row is a string, not an object; write each row as a JSON object such as {{"messages": [...]}}',
    ]


def test_json_rows_on_one_line_are_numbered(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"data": [{"text": "a"}, {"text": ""}]}')
    assert problems_of(path) == [f"{path}:row 2: text is empty; write the text or remove the row"]


def test_invalid_json_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    assert problems_of(path) == [
        f"{path}:4: invalid JSON at column 1: Expecting ',' delimiter; fix the JSON syntax there"
    ]


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"rows": []}')
    assert problems_of(path) == [f'{path}: the file holds an object; write a JSON list of rows, or {{"data": [rows]}}']


def test_csv_problems(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text(
        "messages,note\n"
        '"[{""role"": ""user"", ""content"": ""Hi""}]",x\n'
        '"[{""role"": ""user"" ""content"": ""Hi""}]",x\n'
        "only one field\n"
        "\n"
        '"[{""role"": ""user"", ""content"": ""Hi""}, {""role"": ""assistant"", ""content"": """"}]",\n'
    )
    assert problems_of(path) == [
        f'{path}:2: unknown key "note"; remove it (chat rows have messages; id and metadata are allowed and ignored)',
        f"{path}:2: no assistant message; add the assistant reply the model should learn",
        f"{path}:3: the messages cell is not valid JSON (column 18: Expecting ',' delimiter); write the conversation "
        'as a JSON list, e.g. [{"role": "user", "content": "..."}]',
        f"{path}:4: row has 1 fields but the header has 2; quote fields that contain commas, quotes or line breaks",
        f'{path}:6: unknown key "note"; remove it (chat rows have messages; id and metadata are allowed and ignored)',
        f"{path}:6: message 2 has empty content; write the text or remove the message",
    ]


def test_alpaca_and_preference_field_problems(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"instruction": "Do it", "input": 3, "output": ""}\n'
        '{"instruction": "Do it", "outptu": "done"}\n'
        '{"output": "done"}\n'
    )
    assert problems_of(path) == [
        f"{path}:1: input is a number (3); expected a string",
        f"{path}:1: output is empty; write the text or remove the row",
        f'{path}:2: unknown key "outptu"; did you mean "output"?',
        f'{path}:3: missing key "instruction"; add it (alpaca rows need instruction, output)',
    ]
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "Hi", "chosen": "Hello", "rejected": " Hello "}\n{"prompt": "Hi", "chosen": null, "rejected": "x"}\n'
    )
    assert problems_of(path) == [
        f"{path}:1: chosen and rejected are the same; a preference pair needs two different answers",
        f"{path}:2: chosen is null; expected a string",
    ]


def test_rows_whose_format_cannot_be_told(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "Hi", "answer": "Hello"}\n{"txet": "Hi"}\n')
    assert problems_of(path) == [
        f'{path}:1: cannot tell the format from the keys "question", "answer"; expected messages (chat), '
        "instruction/input/output (alpaca), prompt/completion, text, or prompt (or messages)/chosen/rejected or "
        "input/preferred_output/non_preferred_output (preference)",
        f'{path}:2: cannot tell the format from the keys "txet"; did you mean "text" for "txet"?',
    ]


def test_forced_format_checks_rows_against_it():
    path = FILES / "text.jsonl"
    problems = problems_of(path, format="completion")
    assert problems[:3] == [
        f'{path}:1: unknown key "text"; remove it (completion rows have prompt, completion; id and metadata are allowed and ignored)',
        f'{path}:1: missing key "prompt"; add it (completion rows need prompt, completion)',
        f'{path}:1: missing key "completion"; add it (completion rows need prompt, completion)',
    ]
    assert len(problems) == 6  # the same three for line 2
    assert read_file(FILES / "alpaca.json", format="alpaca").format == "alpaca"


def test_whole_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file$"):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "x.xlsx").write_bytes(b"PK")
    with pytest.raises(
        DataError, match=r"unsupported file type \.xlsx; use \.jsonl, \.json, \.csv, \.parquet or \.txt"
    ):
        read_examples(tmp_path / "x.xlsx")
    with pytest.raises(DataError, match="unknown data format 'sharegpt'"):
        read_examples(FILES / "chat.jsonl", format="sharegpt")
    with pytest.raises(DataError, match="a .txt file holds raw text"):
        read_examples(FILES / "notes.txt", format="chat")


def test_problems_are_capped_but_all_counted(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text('{"text": ""}\n' * 60)
    with pytest.raises(DataError) as info:
        read_examples(path)
    assert info.value.message == f"{path}: 60 problems"
    assert len(info.value.problems) == 51
    assert info.value.problems[-1] == "... and 10 more"
    assert len(problems_of(path, max_problems=None)) == 60


# ----------------------------------------------------------------------------------------------------
# Issue #21: rows json cannot hold (lone surrogates, deep nesting, huge numbers) and unknown keys

SURROGATE = (
    "messages[0].content holds a lone surrogate \\ud800 (half of a UTF-16 pair), which is not valid Unicode and "
    "cannot be encoded as UTF-8 for the tokenizer; remove it, or write the whole pair (e.g. \\ud83d\\ude00 for an emoji)"
)
TOO_DEEP = (
    "nested too deeply (more than 100 levels of lists and objects); a row needs only a few levels, check that the "
    "line holds one example"
)
CHAT_ROW = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}'
BAD_CONTENT = '[{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "ok"}]'


def test_lone_surrogate_is_a_problem_of_its_line_in_every_reader(tmp_path):
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(f'{CHAT_ROW}\n{{"messages": {BAD_CONTENT}}}\n')
    assert problems_of(jsonl) == [f"{jsonl}:2: {SURROGATE}"]
    as_json = tmp_path / "s.json"
    as_json.write_text(f'[\n{CHAT_ROW},\n{{"messages": {BAD_CONTENT}}}\n]\n')
    assert problems_of(as_json) == [f"{as_json}:3: {SURROGATE}"]
    csv = tmp_path / "s.csv"
    csv.write_text("messages\n" + '"' + BAD_CONTENT.replace('"', '""') + '"\n')
    assert problems_of(csv) == [f"{csv}:2: {SURROGATE}"]
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "x\\udfff", "source": "\\ud83d\\ude00 is fine"}\n')
    assert problems_of(text) == [
        f"{text}:1: {SURROGATE.replace('messages[0].content', 'text').replace('d800', 'dfff')}"
    ]


def test_lone_surrogate_in_a_parquet_messages_cell(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"messages": [BAD_CONTENT]}), path)
    assert problems_of(path) == [f"{path}:row 1: {SURROGATE}"]


def test_deep_nesting_is_a_problem_of_its_line_in_every_reader(tmp_path):
    deep = "[" * 100_000
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(f"{CHAT_ROW}\n{deep}\n")
    assert problems_of(jsonl) == [f"{jsonl}:2: {TOO_DEEP}"]
    as_json = tmp_path / "d.json"
    as_json.write_text(f"[\n{CHAT_ROW},\n{deep}{']' * 100_000}\n]\n")
    assert problems_of(as_json) == [f"{as_json}:3: {TOO_DEEP}"]
    csv = tmp_path / "d.csv"
    csv.write_text(f'messages\n"{deep}"\n')
    assert problems_of(csv) == [f"{csv}:2: messages cell: {TOO_DEEP}"]
    # deep enough for the limit, shallow enough for json's parser: the same problem
    shallow = tmp_path / "m.jsonl"
    shallow.write_text('{"text": "x", "metadata": ' + "[" * 150 + "]" * 150 + "}\n")
    assert problems_of(shallow) == [f"{shallow}:1: {TOO_DEEP}"]


def test_a_number_too_long_for_python_is_a_problem(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text(f'{CHAT_ROW}\n{{"text": {"9" * 5000}}}\n')
    assert problems_of(path) == [f"{path}:2: a number has more digits than Python reads (4300); write it as a string"]


UNKNOWN = 'remove it, or move it under "metadata" (read and ignored); --strict (data.strict) makes it an error'


def test_csv_cell_longer_than_the_csv_modules_default_limit(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text\n" + "word " * 40_000 + "\nshort\n")  # a 200 kB document: over csv's 128 kB default
    assert [len(ex.text) for ex in read_examples(path)] == [200_000, 5]


def test_unknown_keys_of_valid_rows_are_warnings_naming_key_and_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"prompt": f"p{i}", "completion": "c", "source": "web"} for i in range(5)]
    rows[1]["difficulty"] = 3
    rows[3]["difficulty"] = 4
    rows.append({"prompt": "q", "completion": "c", "sourec": 1})  # close to no key the row lacks: unknown
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = read_file(path)
    assert len(data.examples) == 6
    assert data.warnings == [
        f'{path}:1: warning: unknown key "source" is ignored (lines 1-5); {UNKNOWN}',
        f'{path}:2: warning: unknown key "difficulty" is ignored (lines 2, 4); {UNKNOWN}',
        f'{path}:6: warning: unknown key "sourec" is ignored (line 6); {UNKNOWN}',
    ]
    with pytest.raises(DataError) as info:
        read_file(path, strict=True)
    assert info.value.message == f"{path}: 8 problems"
    assert info.value.problems[:2] == [
        f'{path}:1: unknown key "source"; remove it (completion rows have prompt, completion; id and metadata are '
        "allowed and ignored)",
        f'{path}:2: unknown key "source"; remove it (completion rows have prompt, completion; id and metadata are '
        "allowed and ignored)",
    ]


def test_misspelt_keys_stay_errors_with_a_did_you_mean(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"mesages": [{"role": "user", "content": "Hi"}], "source": "x"}\n'
        '{"messages": [{"role": "user", "content": "Hi", "source": "x"}, {"role": "assistant", "content": "Yo"}]}\n'
        '{"instruction": "Do", "output": "done", "inptu": "x"}\n'
    )
    assert problems_of(path, format="auto") == [
        f'{path}:1: unknown key "mesages"; did you mean "messages"?',
        f'{path}:1: unknown key "source"; remove it (chat rows have messages; id and metadata are allowed and ignored)',
        f'{path}:2: message 1 has unknown key "source"; remove it (messages have role, content and weight)',
        f"{path}:3: row looks like alpaca (keys instruction, output, inptu) but most rows are chat (first at line 2); "
        "use one format per file",
    ]
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text('{"instruction": "Do", "output": "done", "inptu": "x"}\n')
    assert problems_of(alpaca) == [f'{alpaca}:1: unknown key "inptu"; did you mean "input"?']


# ----------------------------------------------------------------------------------------------------
# Classification detection and the train/validation split


def labelled(counts: dict[str, int]) -> list[Example]:
    out = [chat(f"ticket {label} number {i}", label) for label, n in counts.items() for i in range(n)]
    for i, ex in enumerate(out, start=1):
        ex.source = f"t:{i}"
    return out


def test_is_classification():
    assert is_classification(labelled({"billing": 6, "shipping": 3, "tech": 2})) == ["billing", "shipping", "tech"]
    free_text = [chat(f"Question {i}?", f"A long and different answer number {i}.") for i in range(20)]
    assert is_classification(free_text) is None
    assert is_classification(labelled({"yes": 10})) is None  # one label is not a choice
    # 5% of answers may fall outside the label set (typos, one-offs); 10% may not
    assert is_classification(labelled({"a": 19, "b": 19}) + [chat("odd", "c")] * 1 + [chat("x", "a")]) == ["a", "b"]
    assert is_classification(labelled({"a": 9, "b": 9}) + [chat(f"odd {i}", f"z{i}") for i in range(2)]) is None
    long_labels = labelled({"one two three four five six": 5, "seven eight nine ten eleven twelve": 5})
    assert is_classification(long_labels) is None
    assert is_classification([Example("text", text="x")] * 4) is None


def test_stratified_split_keeps_proportions_and_is_deterministic():
    examples = labelled({"billing": 60, "shipping": 30, "tech": 10})
    train, val = split_train_val(examples, 0.2, seed=3)
    assert len(train) + len(val) == 100
    assert Counter(ex.answer() for ex in val) == {"billing": 12, "shipping": 6, "tech": 2}
    assert Counter(ex.answer() for ex in train) == {"billing": 48, "shipping": 24, "tech": 8}
    again = split_train_val(examples, 0.2, seed=3)
    assert [ex.source for ex in again[1]] == [ex.source for ex in val]
    other = split_train_val(examples, 0.2, seed=4)
    assert [ex.source for ex in other[1]] != [ex.source for ex in val]
    assert [ex.source for ex in train] == sorted((ex.source for ex in train), key=lambda s: int(s[2:]))  # order kept


def test_split_puts_every_label_with_two_examples_on_both_sides():
    examples = labelled({"a": 40, "b": 2, "c": 2})
    train, val = split_train_val(examples, 0.1, seed=0)
    assert {ex.answer() for ex in val} == {"a", "b", "c"}
    assert {ex.answer() for ex in train} == {"a", "b", "c"}


def test_split_keeps_identical_inputs_together():
    examples = [chat(f"question {i % 10}", f"answer {i}", source=f"f:{i}") for i in range(40)]  # each input 4x
    for seed in range(5):
        train, val = split_train_val(examples, 0.25, seed=seed)
        assert {ex.input_key() for ex in train}.isdisjoint({ex.input_key() for ex in val})
        assert len(val) > 0 and len(val) % 4 == 0


def test_split_edge_cases():
    two = [chat("a", "x"), chat("b", "y")]
    assert split_train_val(two, 0.01, seed=0)[1] != []  # at least one validation example
    assert len(split_train_val(two, 0.01, seed=0)[1]) == 1
    assert split_train_val(two, 0.0, seed=0) == (two, [])
    assert split_train_val(two[:1], 0.5, seed=0) == (two[:1], [])
    with pytest.raises(DataError, match="all 3 examples have the same input"):
        split_train_val([chat("a", "x")] * 3, 0.3, seed=0)


# ----------------------------------------------------------------------------------------------------
# Issue #16: preference pairs in three forms (plain, chat, OpenAI DPO), metadata


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_chat_form_answers_as_string_message_or_list_of_one():
    examples = read_examples(FILES / "preference_chat.jsonl")
    assert [(ex.chosen, ex.rejected, ex.is_chat_pair) for ex in examples] == [
        ("Paris.", "I think it may be Lyon.", True),
        ("Hello!", "No.", True),
        ("Blue.", "Red.", True),
    ]
    assert [(m.role, m.content) for m in examples[2].messages] == [
        ("user", "Name a colour."),
        ("assistant", "Red."),
        ("user", "Another one?"),
    ]
    assert [ex.metadata for ex in examples] == [{"topic": "geography"}, None, None]
    assert examples[0].input_key() == "system: Answer in one sentence.\nuser: What is the capital of France?"


def test_openai_dpo_rows():
    path = FILES / "preference_openai.jsonl"
    examples = read_examples(path)
    assert [(m.role, m.content) for m in examples[1].messages] == [("system", "Be brief."), ("user", "2 + 2?")]
    assert (examples[1].chosen, examples[1].rejected, examples[1].metadata) == ("4", "5", {"source": "hand-written"})
    assert read_file(path, format="preference").format == "preference"


def test_trl_conversational_rows_are_the_chat_form(tmp_path):
    # TRL's conversational preference rows hold the prompt turns in `prompt`
    path = write_rows(
        tmp_path / "trl.jsonl",
        [{"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]}],
    )
    (ex,) = read_examples(path)
    assert (ex.prompt, [(m.role, m.content) for m in ex.messages], ex.chosen) == (None, [("user", "Hi")], "Hello!")


def test_pair_problems_of_the_chat_form(tmp_path):
    good = {"messages": [user("Hi")], "chosen": "Hello", "rejected": "Go away"}
    path = write_rows(
        tmp_path / "pairs.jsonl",
        [
            good,
            {**good, "chosen": "  \n"},  # 2
            {**good, "messages": [user("Hi"), assistant("Hello")]},  # 3
            {**good, "rejected": {"role": "user", "content": "Go away"}},  # 4
            {**good, "chosen": [assistant("Hello"), assistant("again")]},  # 5
            {**good, "rejected": " Hello"},  # 6
            {**good, "messages": [{"role": "user", "content": "Hi", "weight": 1}]},  # 7
            {**good, "messages": [{"role": "system", "content": "Be kind"}]},  # 8
            {**good, "chosen": [], "rejected": 3},  # 9
            {**good, "chosen": {"role": "assistant", "content": "", "tool_calls": []}},  # 10
            {**good, "messages": "Hi"},  # 11
            {"messages": [user("Hi")], "chosen": "Hello", "rejcted": "x"},  # 12
            {**good, "metadata": ["a"]},  # 13
        ],
    )
    assert problems_of(path) == [
        f"{path}:{line}"
        for line in [
            "2: chosen is empty; write the text or remove the row",
            "3: the prompt ends with an assistant turn (message 2); a pair's prompt ends with the user turn that "
            "chosen and rejected answer: remove message 2, or make it the answer in chosen and rejected",
            '4: rejected message has role "user"; an answer is the assistant\'s turn, set "role": "assistant"',
            "5: chosen holds 2 messages; an answer is one assistant message (answers of several turns are not "
            "supported): keep the one reply",
            "6: chosen and rejected are the same; a preference pair needs two different answers",
            "7: message 1 has a weight; a preference prompt is not trained (only the answers are), remove it",
            "8: the prompt ends with a system turn (message 1); a pair's prompt ends with the user turn that chosen "
            "and rejected answer: add the user turn",
            '9: chosen is an empty list; write the answer as [{"role": "assistant", "content": "..."}]',
            '9: rejected is a number (3); expected a string, an assistant message {"role": "assistant", "content": '
            '"..."} or a list of one',
            '10: chosen message has "tool_calls"; tool definitions and tool calls are not supported (tunesmith '
            "trains on text turns only): remove the row",
            "10: chosen message has empty content; write the answer or remove the row",
            '11: messages is a string; expected a list of {"role": ..., "content": ...} objects (the prompt turns)',
            '12: unknown key "rejcted"; did you mean "rejected"?',
            '13: metadata is a list; expected an object such as {"category": "billing"}',
        ]
    ]


def test_pair_problems_of_the_openai_form(tmp_path):
    good = {
        "input": {"messages": [user("Hi")], "tools": [], "parallel_tool_calls": True},
        "preferred_output": [assistant("Hello")],
        "non_preferred_output": [assistant("Go away")],
    }
    tool = {"type": "function", "function": {"name": "weather", "parameters": {}}}
    path = write_rows(
        tmp_path / "dpo.jsonl",
        [
            good,
            {**good, "input": {"messages": [user("Hi")], "tools": [tool]}},  # 2
            {**good, "preferred_output": [{"role": "tool", "content": "12 C"}]},  # 3
            {**good, "non_preferred_output": assistant("Go away")},  # 4: a message, not a list of one
            {**good, "input": {"mesages": [user("Hi")]}},  # 5
            {**good, "input": [user("Hi")]},  # 6
            {**good, "input": {"messages": [user("Hi"), {"role": "tool", "content": "12 C"}]}},  # 7
            {**good, "non_preferred_output": [assistant("Hello ")]},  # 8
            {"input": good["input"], "preffered_output": [assistant("a")], "non_preferred_output": [assistant("b")]},
        ],
    )
    assert problems_of(path) == [
        f"{path}:{line}"
        for line in [
            "2: input.tools lists 1 tool; tool definitions and tool calls are not supported (tunesmith trains on "
            "text turns only): remove the row",
            '3: preferred_output message has role "tool"; an answer is the assistant\'s turn, set "role": '
            '"assistant"; tool definitions and tool calls are not supported (tunesmith trains on text turns only)',
            '4: non_preferred_output is an object; expected a list of one assistant message [{"role": "assistant", '
            '"content": "..."}]',
            '5: input has unknown key "mesages"; did you mean "messages"?',
            '6: input is a list; expected an object {"messages": [...]} holding the prompt turns',
            '7: input message 2 has role "tool"; expected one of system, user, assistant; tool definitions and tool '
            "calls are not supported (tunesmith trains on text turns only)",
            "8: preferred_output and non_preferred_output are the same; a preference pair needs two different answers",
            '9: unknown key "preffered_output"; did you mean "preferred_output"?',
        ]
    ]


MIXED = (
    "a plain prompt is raw text and chat turns go through the chat template, so the model would see two prompt "
    "styles: write every pair in one form"
)


def test_a_file_mixing_pair_forms_names_the_minority_lines(tmp_path):
    plain = {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}
    chat_pair = {"messages": [user("Hi")], "chosen": "Hello", "rejected": "Go away"}
    dpo = {"input": {"messages": [user("Hi")]}, "preferred_output": [assistant("Hello")]}
    dpo["non_preferred_output"] = [assistant("Go away")]
    path = write_rows(tmp_path / "mixed.jsonl", [plain, chat_pair, plain, dpo, plain])
    expected = [
        f"{path}:2: row is a pair in chat form (messages, chosen, rejected) but most pairs are in plain form "
        f"(prompt, chosen, rejected; first at line 1); {MIXED}",
        f"{path}:4: row is a pair in OpenAI DPO form (input, preferred_output, non_preferred_output) but most pairs "
        f"are in plain form (prompt, chosen, rejected; first at line 1); {MIXED}",
    ]
    assert problems_of(path) == expected
    assert problems_of(path, format="preference") == expected  # a forced format checks the forms too
    # chat and OpenAI forms both render through the chat template, but a file still holds one form
    path = write_rows(tmp_path / "chat_forms.jsonl", [dpo, chat_pair, chat_pair])
    assert problems_of(path) == [
        f"{path}:1: row is a pair in OpenAI DPO form (input, preferred_output, non_preferred_output) but most pairs "
        "are in chat form (messages, chosen, rejected; first at line 2); both are chat turns, but a file holds one "
        "form: write every pair in one form"
    ]


def test_a_preference_file_with_chat_and_completion_rows(tmp_path):
    chat_pair = {"messages": [user("Hi")], "chosen": "Hello", "rejected": "Go away"}
    path = write_rows(
        tmp_path / "p.jsonl",
        [
            chat_pair,
            {"messages": [user("Hi"), assistant("Hello")]},  # a chat row: messages without answers
            chat_pair,
            {"prompt": "Hi", "completion": "Hello"},
        ],
    )
    assert problems_of(path) == [
        f"{path}:2: row looks like chat (keys messages) but most rows are preference (first at line 1); use one "
        "format per file",
        f"{path}:4: row looks like completion (keys prompt, completion) but most rows are preference (first at line "
        "1); use one format per file",
    ]
    # forced: the chat row is a chat-form pair without answers, the completion row a plain one (and a mixed form)
    assert problems_of(path, format="preference") == [
        f'{path}:2: missing key "chosen"; add it (chat-form preference rows need messages, chosen, rejected)',
        f'{path}:2: missing key "rejected"; add it (chat-form preference rows need messages, chosen, rejected)',
        f"{path}:4: row is a pair in plain form (prompt, chosen, rejected) but most pairs are in chat form "
        f"(messages, chosen, rejected; first at line 1); {MIXED}",
    ]


@pytest.mark.parametrize(
    "row, problem",
    [
        (
            {"preffered_output": [], "non_preferred_output": []},
            'unknown key "preffered_output"; did you mean "preferred_output"?',
        ),
        ({"mesages": [user("Hi")], "chosen": "a", "rejected": "b"}, 'unknown key "mesages"; did you mean "messages"?'),
        ({"promtp": "Hi", "chosen": "a", "rejected": "b"}, 'unknown key "promtp"; did you mean "prompt"?'),
        (
            {"non_preferred_outptu": []},
            'cannot tell the format from the keys "non_preferred_outptu"; did you mean '
            '"non_preferred_output" for "non_preferred_outptu"?',
        ),
    ],
)
def test_misspelt_pair_keys(tmp_path, row, problem):
    path = write_rows(tmp_path / "typo.jsonl", [row])
    assert problems_of(path)[0] == f"{path}:1: {problem}"


def test_metadata_is_kept_and_must_be_an_object(tmp_path):
    path = write_rows(
        tmp_path / "m.jsonl",
        [
            {"prompt": "a", "completion": "b", "metadata": {"category": "billing"}},
            {"prompt": "c", "completion": "d", "metadata": None},
            {"prompt": "e", "completion": "f"},
        ],
    )
    assert [ex.metadata for ex in read_examples(path)] == [{"category": "billing"}, None, None]
    write_rows(path, [{"prompt": "a", "completion": "b", "metadata": "billing"}])
    assert problems_of(path) == [
        f'{path}:1: metadata is a string; expected an object such as {{"category": "billing"}}'
    ]
    csv = tmp_path / "m.csv"
    csv.write_text('prompt,completion,metadata\na,b,"{""category"": ""billing""}"\nc,d,\ne,f,billing\n')
    assert problems_of(csv) == [
        f"{csv}:4: the metadata cell is not valid JSON (column 1: Expecting value); write a JSON object, e.g. "
        '{"category": "billing"}'
    ]
    csv.write_text('prompt,completion,metadata\na,b,"{""category"": ""billing""}"\nc,d,\n')
    assert [ex.metadata for ex in read_examples(csv)] == [{"category": "billing"}, None]


def test_tool_calls_in_a_chat_row_are_named(tmp_path):
    path = write_rows(
        tmp_path / "tools.jsonl",
        [{"messages": [user("Weather?"), {"role": "assistant", "content": "Sunny", "tool_calls": []}]}],
    )
    assert problems_of(path) == [
        f'{path}:1: message 2 has "tool_calls"; tool definitions and tool calls are not supported (tunesmith trains '
        "on text turns only): remove the row"
    ]


def test_the_readmes_preference_rows_read(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = [json.loads(m) for m in re.findall(r"`(\{.*?\})`\n", readme) if '"chosen"' in m or "preferred_output" in m]
    assert len(rows) == 3
    for i, row in enumerate(rows):
        (ex,) = read_examples(write_rows(tmp_path / f"{i}.jsonl", [row]))
        assert (ex.chosen, ex.rejected, ex.is_chat_pair) == ("Paris.", "Lyon.", i > 0)
