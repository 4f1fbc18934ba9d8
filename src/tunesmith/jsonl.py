"""Reading JSON-lines files whose every non-blank line must be one JSON object, problems named by line number."""

from __future__ import annotations

import json
from pathlib import Path


def read_objects(path: str | Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(line number, object) for every line that holds a JSON object, and (line number, what is wrong) for every
    other non-blank line; blank lines are skipped. Line numbers count from 1. Callers add the file name and how
    to fix it in their own words."""
    rows, problems = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append((number, f"invalid JSON at column {e.colno}: {e.msg}"))
            continue
        except RecursionError:  # a line of 100k "[": json's parser recurses once per level
            problems.append((number, "nested too deeply (JSON lists and objects inside each other)"))
            continue
        except ValueError:  # an integer of more than 4300 digits
            problems.append((number, "a number has more digits than Python reads (4300)"))
            continue
        if not isinstance(value, dict):
            problems.append((number, f"not a JSON object (a {type(value).__name__})"))
            continue
        rows.append((number, value))
    return rows, problems
