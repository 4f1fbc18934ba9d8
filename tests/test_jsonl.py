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
