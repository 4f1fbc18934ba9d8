"""tunesmith.jsonl.read_objects: every object with its line number, every other non-blank line as a problem."""

from tunesmith.jsonl import read_objects


def test_objects_and_problems_are_numbered_by_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n  \n[1, 2]\n{"b": 2\n{"c": "é"}\n', encoding="utf-8")
    rows, problems = read_objects(path)
    assert rows == [(1, {"a": 1}), (6, {"c": "é"})]
    assert problems == [(4, "not a JSON object (a list)"), (5, "invalid JSON at column 8: Expecting ',' delimiter")]
