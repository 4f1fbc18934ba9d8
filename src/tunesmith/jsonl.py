"""Reading JSON-lines files whose every non-blank line must be one JSON object, problems named by line number."""

from __future__ import annotations

import json
from pathlib import Path


def read_objects(path: str | Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """(line number, object) for every line that holds a JSON object, and (line number, what is wrong) for every
    other non-blank line; blank lines are skipped. Line numbers count from 1. Callers add the file name and how
    to fix it in their own words."""
    rows, problems = [], []
    data = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    # split on "\n" only: str.splitlines would also split inside a JSON string holding U+2028 or U+0085
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append((number, f"invalid UTF-8 byte 0x{raw[e.start]:02X}; save the file with UTF-8 encoding"))
            continue
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
