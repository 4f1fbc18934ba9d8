"""tunesmith.jsonl.read_objects: every object with its line number, every other non-blank line as a problem."""

from tunesmith.jsonl import read_objects


def test_objects_and_problems_are_numbered_by_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n  \n[1, 2]\n{"b": 2\n{"c": "é"}\n', encoding="utf-8")
    rows, problems = read_objects(path)
    assert rows == [(1, {"a": 1}), (6, {"c": "é"})]
    assert problems == [(4, "not a JSON object (a list)"), (5, "invalid JSON at column 8: Expecting ',' delimiter")]


def test_lines_json_cannot_hold_are_problems_not_crashes(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n' + "[" * 100_000 + "\n" + '{"n": ' + "9" * 5000 + "}\n", encoding="utf-8")
    rows, problems = read_objects(path)
    assert rows == [(1, {"a": 1})]
    assert problems == [
        (2, "nested too deeply (JSON lists and objects inside each other)"),
        (3, "a number has more digits than Python reads (4300)"),
    ]


def test_lines_split_on_newline_only_and_bad_utf8_is_a_problem(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes('{"a": "x\u2028y\u0085z"}\n{"b": 1}\n'.encode() + b'{"c": "\xff"}\n{"d": 2}\n')
    rows, problems = read_objects(path)
    assert rows == [(1, {"a": "x\u2028y\u0085z"}), (2, {"b": 1}), (4, {"d": 2})]
    assert problems == [(3, "invalid UTF-8 byte 0xFF; save the file with UTF-8 encoding")]


def test_generate_prompts_file_rejects_what_a_tokenizer_cannot_take(tmp_path):
    import pytest

    from tunesmith.cli.generate import _read_prompts
    from tunesmith.errors import DataError

    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "Hi"}\n{"messages": [1]}\n{"prompt": "a\\ud800"}\n{"messages": []}\n'
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n'
    )
    with pytest.raises(DataError) as info:
        _read_prompts(str(path))
    expected = (
        'expected {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]} with text that is '
        "valid Unicode (no lone surrogate such as \\ud800)"
    )
    assert info.value.problems == [f"{path}:{n}: {expected}" for n in (2, 3, 4)]
    path.write_text(
        '{"prompt": "Hi"}\n{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n'
    )
    assert _read_prompts(str(path)) == ["Hi", [{"role": "user", "content": "Hi"}]]
