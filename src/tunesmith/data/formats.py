"""Read a data file into `Example`s, reporting every problem of the file at once.

(~590 lines: one owner for every file type and row format, so a row's problems are collected and worded the same
way whatever the format; each format's parser is a small function.)

Files: .jsonl (one JSON object per line), .json (a list of rows, or {"data": [...]}), .csv (a header row;
columns are the keys below; a chat conversation goes in a `messages` column holding JSON), .parquet
(needs pyarrow) and .txt (raw text).

Formats, detected from the keys of each row (or forced with `format=`):

    chat        {"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}, ...]}
                weight (OpenAI's field, assistant messages only): 0 = do not train on this reply
    alpaca      {"instruction": "...", "input": "...", "output": "..."}  -> chat: user = instruction, plus
                "\\n\\n" + input when input is not empty; assistant = output
    completion  {"prompt": "...", "completion": "..."}
    text        {"text": "..."}
    preference  {"prompt": "...", "chosen": "...", "rejected": "..."}

Rows may also carry `id` and `metadata`; they are read and dropped. A key close to a known key the row lacks
(`mesages`, `outptu`) is a problem with a did-you-mean, so a typo never silently drops a field. Any other key
(`source`, `difficulty`) in an otherwise valid row is ignored with one warning per key naming its lines
(`DataFile.warnings`); with `strict=True` (data.strict, `--strict`) it is a problem of each row. A row with
other problems lists its unknown keys among them. Unknown keys inside a message are always problems (OpenAI's
fine-tuning API rejects them too).

Strings must be valid Unicode: a lone surrogate (`"\\ud800"` written in JSON, half of a UTF-16 pair) cannot be
encoded as UTF-8 by any tokenizer, so it is a problem of its row rather than silently replaced. JSON nested more
than MAX_DEPTH levels is a problem of its row too ("nested too deeply"), as are integers longer than Python
parses (4300 digits).

A .txt file is raw text split on blank lines: one example per paragraph block (a run of non-blank lines),
so a file without blank lines is a single example. Separate documents with a blank line.

Every problem is one line `FILE:LINE: what is wrong; how to fix it`. LINE is the 1-based physical line for
.jsonl, .csv (the header is line 1) and .txt, the line where the row starts for .json (or `row N`, 1-based,
when rows share a line), and `row N` for .parquet. All problems of a file are collected before `DataError` is raised.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import re
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunesmith.data.example import ROLES, Example, Message
from tunesmith.errors import DataError

FORMATS = ("chat", "alpaca", "completion", "text", "preference")

# format -> (required keys, optional keys)
KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "chat": (("messages",), ()),
    "alpaca": (("instruction", "output"), ("input",)),
    "completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
    "preference": (("prompt", "chosen", "rejected"), ()),
}
IGNORED_KEYS = ("id", "metadata")
MESSAGE_KEYS = ("role", "content", "weight")
MAX_PROBLEMS = 50
"""How many problems a DataError lists before '... and N more' (all are counted)."""
MAX_DEPTH = 100
"""Deepest nesting of lists and objects a row may have (a chat row needs 4). Deeper rows are problems; without the
limit a line of 100k `[` ends json's recursive parser with RecursionError."""

_EXAMPLE_ROW = {
    ".jsonl": 'one JSON object per line, e.g. {"messages": [{"role": "user", "content": "..."}, '
    '{"role": "assistant", "content": "..."}]}',
    ".json": 'a JSON list of rows, e.g. [{"prompt": "...", "completion": "..."}]',
    ".csv": "a header row (e.g. instruction,input,output) and one row per example",
    ".parquet": "one row per example with columns such as prompt and completion",
    ".txt": "text; separate documents with a blank line",
}


@dataclass
class DataFile:
    """A data file read and validated: its detected format and its examples."""

    path: str
    format: str
    examples: list[Example]
    warnings: list[str] = field(default_factory=list)
    """`FILE:LINE: warning: ...` lines that do not fail the file (unknown keys of otherwise valid rows)."""


@dataclass
class _Row:
    where: str  # "FILE:LINE" or "FILE:row N"
    pos: int  # line or row number, to list problems in file order
    value: Any
    plain: bool = False  # known to be valid Unicode and shallow (see _plain_json): _unusable_value is skipped


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[int, str]] = []

    def add(self, pos: int, text: str) -> None:
        self.items.append((pos, text))

    def sorted(self) -> list[str]:
        return [text for _, text in sorted(self.items, key=lambda item: item[0])]  # stable: same line keeps order


def read_examples(
    path: str | Path, format: str = "auto", max_problems: int | None = MAX_PROBLEMS, strict: bool = False
) -> list[Example]:
    """Read and validate a data file. Raises DataError listing every problem (`FILE:LINE: ...`)."""
    return read_file(path, format, max_problems, strict).examples


def read_file(
    path: str | Path, format: str = "auto", max_problems: int | None = MAX_PROBLEMS, strict: bool = False
) -> DataFile:
    """Like `read_examples`, also returning the detected format and the warnings. strict: unknown keys of
    rows are problems rather than warnings."""
    name = str(path)
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; expected auto, {', '.join(FORMATS)}")
    try:
        exists = path.exists()
    except (OSError, ValueError):  # a name no file can have: a NUL byte, too long
        exists = False
    if not exists:
        raise DataError(f"{name}: no such file")
    if path.is_dir():
        raise DataError(f"{name}: is a directory; give a .jsonl, .json, .csv, .parquet or .txt file")
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise DataError(
            f"{name}: unsupported file type {suffix or '(no extension)'}; use .jsonl, .json, .csv, .parquet or .txt"
        )
    if suffix == ".txt" and format not in ("auto", "text"):
        raise DataError(f"{name}: a .txt file holds raw text (format text), not {format}; use .jsonl for {format} rows")

    problems = _Problems()
    rows = _READERS[suffix](path, name, problems)
    if not rows and not problems.items:
        problems.add(0, f"{name}: the file is empty; write {_EXAMPLE_ROW[suffix]}")
    fmt = "text" if suffix == ".txt" else format
    warnings: list[str] = []
    examples, fmt = _normalise(rows, fmt, problems, warnings, strict)

    if problems.items:
        found = problems.sorted()
        n = len(found)
        shown = found if max_problems is None or n <= max_problems else found[:max_problems]
        if len(shown) < n:
            shown.append(f"... and {n - len(shown)} more")
        raise DataError(f"{name}: {n} problem{'s' if n != 1 else ''}", shown)
    return DataFile(name, fmt, examples, warnings)


# ----------------------------------------------------------------------------------------------------
# Readers: bytes -> rows (any JSON value) with their position; unreadable lines become problems


def _decode_lines(data: bytes, name: str, problems: _Problems) -> list[str | None]:
    """Split into lines and decode each as UTF-8; a line that is not UTF-8 is None (and a problem)."""
    offset = 0
    if data.startswith(codecs.BOM_UTF8):
        data, offset = data[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
    lines: list[str | None] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as e:
            problems.add(
                number,
                f"{name}:{number}: invalid UTF-8 byte 0x{raw[e.start]:02X} at byte offset {offset + e.start}; "
                "save the file with UTF-8 encoding",
            )
            lines.append(None)
        offset += len(raw) + 1
    return lines


def _read_jsonl(path: Path, name: str, problems: _Problems) -> list[_Row]:
    rows = []
    for number, line in enumerate(_decode_lines(path.read_bytes(), name, problems), start=1):
        if line is None or not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            fix = "write one complete JSON object per line"
            problems.add(number, f"{where}: invalid JSON at column {e.colno}: {e.msg}; {fix}")
            continue
        except (RecursionError, ValueError) as e:  # ValueError: an integer of more than 4300 digits
            problems.add(number, f"{where}: {_unparsable(e)}")
            continue
        rows.append(_Row(where, number, value, plain=_plain_json(line)))
    return rows


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]", re.ASCII)


def _plain_json(text: str) -> bool:
    """JSON text that can hold neither a lone surrogate (only a \\uD800-\\uDFFF escape writes one) nor nesting
    deeper than MAX_DEPTH (it has fewer brackets). Two scans in C that spare nearly every line the walk of
    `_unusable_value`, which costs as much as json.loads itself (measured on 50k chat rows: walk 0.51 s, json.loads
    0.55 s, these scans 0.03 s)."""
    return text.count("[") + text.count("{") <= MAX_DEPTH and not _SURROGATE_ESCAPE.search(text)


def _unparsable(e: Exception) -> str:
    """The problem text for JSON that json.loads cannot hold (not a syntax error)."""
    if isinstance(e, RecursionError):
        return _TOO_DEEP
    return "a number has more digits than Python reads (4300); write it as a string"


_TOO_DEEP = (
    f"nested too deeply (more than {MAX_DEPTH} levels of lists and objects); "
    "a row needs only a few levels, check that the line holds one example"
)


def _read_json(path: Path, name: str, problems: _Problems) -> list[_Row]:
    data = path.read_bytes()
    _decode_lines(data, name, problems)  # reports lines that are not UTF-8
    text = data.decode("utf-8-sig", errors="replace")
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{name}:{e.lineno}"
        problems.add(e.lineno, f"{where}: invalid JSON at column {e.colno}: {e.msg}; fix the JSON syntax there")
        return []
    except (RecursionError, ValueError) as e:
        offset = _too_deep_at(text) if isinstance(e, RecursionError) else None
        line = 1 if offset is None else text.count("\n", 0, offset) + 1
        problems.add(line, f"{name}:{line}: {_unparsable(e)}")
        return []
    key = None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        key, value = "data", value["data"]
    if not isinstance(value, list):
        problems.add(0, f'{name}: the file holds {_kind(value)}; write a JSON list of rows, or {{"data": [rows]}}')
        return []
    lines = _json_item_lines(text, key)
    if lines is None or len(lines) != len(value) or len(set(lines)) != len(lines):  # rows sharing a line: "row N"
        return [_Row(f"{name}:row {i}", i, row) for i, row in enumerate(value, start=1)]
    return [_Row(f"{name}:{line}", line, row) for line, row in zip(lines, value)]


_WS = re.compile(r"[ \t\n\r]*")


def _json_item_lines(text: str, key: str | None) -> list[int] | None:
    """The line on which each item of the top-level list (or of text["key"]) starts; None if unsure."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        return _WS.match(text, i).end()

    try:
        i = skip(0)
        if key is not None:  # walk the top-level object to the value of `key`
            if text[i] != "{":
                return None
            i += 1
            while True:
                name, i = decoder.raw_decode(text, skip(i))
                i = skip(i)
                if text[i] != ":":
                    return None
                i = skip(i + 1)
                if name == key:
                    break
                _, i = decoder.raw_decode(text, i)
                i = skip(i)
                if text[i] != ",":
                    return None
                i += 1
        if text[i] != "[":
            return None
        starts = []
        i = skip(i + 1)
        while text[i] != "]":
            starts.append(i)
            _, i = decoder.raw_decode(text, i)
            i = skip(i)
            if text[i] == ",":
                i = skip(i + 1)
    except (ValueError, IndexError, RecursionError):
        return None
    newlines = [m.start() for m in re.finditer("\n", text)]
    return [bisect_right(newlines, start) + 1 for start in starts]


def _too_deep_at(text: str) -> int | None:
    """The offset where JSON text first nests deeper than MAX_DEPTH (brackets inside strings skipped), or None."""
    depth, in_string, escaped = 0, False, False
    for i, c in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return i
        elif c in "]}":
            depth -= 1
    return None


def _read_csv(path: Path, name: str, problems: _Problems) -> list[_Row]:
    data = path.read_bytes()
    bad = {i for i, line in enumerate(_decode_lines(data, name, problems), start=1) if line is None}
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig", errors="replace"), newline=""))
    rows: list[_Row] = []
    limit = csv.field_size_limit(max(len(data), csv.field_size_limit()))  # the default 128 kB refuses long documents
    try:
        header = [cell.strip() for cell in next(reader, [])]
        if not header:
            return []
        for column, count in Counter(header).items():
            if count > 1:
                problems.add(1, f'{name}:1: column "{column}" appears {count} times; rename or remove the copies')
        start = reader.line_num + 1
        for record in reader:
            first, last = start, reader.line_num
            start = last + 1
            if not any(cell.strip() for cell in record) or bad.intersection(range(first, last + 1)):
                continue  # a blank line, or one already reported as not UTF-8
            if len(record) != len(header):
                problems.add(
                    first,
                    f"{name}:{first}: row has {len(record)} fields but the header has {len(header)}; "
                    "quote fields that contain commas, quotes or line breaks",
                )
                continue
            rows.append(_Row(f"{name}:{first}", first, dict(zip(header, record))))
            _parse_messages_cell(rows, problems)
    except csv.Error as e:
        where = f"{name}:{reader.line_num}"
        problems.add(reader.line_num, f"{where}: unreadable CSV ({e}); save it as standard comma-separated CSV")
    finally:
        csv.field_size_limit(limit)
    return rows


def _read_parquet(path: Path, name: str, problems: _Problems) -> list[_Row]:
    try:
        import pyarrow.parquet as pq  # optional dependency: only .parquet files need it
    except ImportError:
        raise DataError(
            f"{name}: reading .parquet files needs pyarrow; install it with: pip install 'tunesmith[data]'"
        ) from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file (or a cell it cannot convert)
        problems.add(0, f"{name}: not a readable Parquet file ({e}); write it again, or convert it to .jsonl")
        return []
    rows: list[_Row] = []
    for i, row in enumerate(records, start=1):
        # a null cell is a missing key, so a null required column reads "missing key", not "is null"
        rows.append(_Row(f"{name}:row {i}", i, {k: v for k, v in row.items() if v is not None}))
        _parse_messages_cell(rows, problems)
    return rows


def _parse_messages_cell(rows: list[_Row], problems: _Problems) -> None:
    """A table cell holds a conversation as JSON text: parse the last row's, or drop the row with a problem."""
    row = rows[-1]
    cell = row.value.get("messages")
    if not isinstance(cell, str):
        return
    try:
        row.value["messages"] = json.loads(cell)
    except json.JSONDecodeError as e:
        problems.add(
            row.pos,
            f"{row.where}: the messages cell is not valid JSON (column {e.colno}: {e.msg}); "
            'write the conversation as a JSON list, e.g. [{"role": "user", "content": "..."}]',
        )
        rows.pop()
    except (RecursionError, ValueError) as e:
        problems.add(row.pos, f"{row.where}: messages cell: {_unparsable(e)}")
        rows.pop()


def _read_txt(path: Path, name: str, problems: _Problems) -> list[_Row]:
    rows: list[_Row] = []
    block: list[str | None] = []
    start = 0
    lines = _decode_lines(path.read_bytes(), name, problems)
    for number, line in enumerate([*lines, ""], start=1):  # the extra "" closes the last block
        if line is not None and not line.strip():
            if block and None not in block:  # a block with a non-UTF-8 line is reported already
                rows.append(_Row(f"{name}:{start}", start, {"text": "\n".join(block)}))  # type: ignore[arg-type]
            block = []
        else:
            if not block:
                start = number
            block.append(line)
    return rows


_READERS: dict[str, Callable[[Path, str, _Problems], list[_Row]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}
_EXAMPLE_ROW[".ndjson"] = _EXAMPLE_ROW[".jsonl"]


# ----------------------------------------------------------------------------------------------------
# Detection and normalisation: rows -> Examples


def detect_format(row: dict) -> str | None:
    """The format a row's keys point to, or None."""
    if "messages" in row:
        return "chat"
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "completion" in row or "prompt" in row:
        return "completion"
    if "text" in row:
        return "text"
    return None


def _normalise(
    rows: list[_Row], fmt: str, problems: _Problems, warnings: list[str], strict: bool
) -> tuple[list[Example], str]:
    """Detect the file's format (unless given), report rows of another format, convert the rest."""
    objects = []
    for row in rows:
        if not row.plain and (bad := _unusable_value(row.value)) is not None:
            problems.add(row.pos, f"{row.where}: {bad}")
        elif isinstance(row.value, dict):
            objects.append(row)
        else:
            problems.add(
                row.pos,
                f"{row.where}: row is {_kind(row.value)}, not an object; write each row as a JSON object "
                'such as {"messages": [...]}',
            )

    detected = [detect_format(row.value) for row in objects]
    if fmt == "auto":
        counts = Counter(f for f in detected if f)
        if not counts:
            for row in objects:
                problems.add(row.pos, f"{row.where}: {_unknown_format(row.value)}")
            return [], "auto"
        fmt = max(counts, key=lambda f: (counts[f], -detected.index(f)))  # most rows; a tie goes to the first
        first = _line_of(objects[detected.index(fmt)].where)
        for row, f in zip(objects, detected):
            if f and f != fmt:
                keys = ", ".join(_show(k)[1:-1] for k in row.value if k not in IGNORED_KEYS)
                problems.add(
                    row.pos,
                    f"{row.where}: row looks like {f} (keys {keys}) but most rows are {fmt} (first at {first}); "
                    "use one format per file",
                )
        # rows of another format are reported above; undetected rows are checked as `fmt` (typos in keys)
        objects = [row for row, f in zip(objects, detected) if f in (fmt, None)]

    examples = []
    ignored: dict[str, list[_Row]] = {}  # unknown key -> the otherwise valid rows that carry it
    for row in objects:
        found: list[str] = []
        extra: dict[str, str] = {}  # unknown key -> its problem text (also in `found`)
        complete = _check_keys(row.value, fmt, found.append, extra)
        example = _CONVERTERS[fmt](row.value, found.append) if complete else None
        if example is not None and not strict and len(found) == len(extra):  # only unknown keys: warn, keep the row
            for key in extra:
                ignored.setdefault(key, []).append(row)
            found = []
        for text in found:
            problems.add(row.pos, f"{row.where}: {text}")
        if example is not None and not found:
            example.source = row.where
            examples.append(example)
    for key, carriers in ignored.items():
        warnings.append(
            f"{carriers[0].where}: warning: unknown key {_show(key)} is ignored ({_positions(carriers)}); remove it, "
            'or move it under "metadata" (read and ignored); --strict (data.strict) makes it an error'
        )
    return examples, fmt


def _positions(rows: list[_Row]) -> str:
    """'line 3', 'lines 1-4, 9', 'rows 2-3' (at most 10 ranges, then 'and N more')."""
    unit = "line" if _line_of(rows[0].where).startswith("line") else "row"
    ranges: list[list[int]] = []
    for pos in sorted(row.pos for row in rows):
        if ranges and pos <= ranges[-1][1] + 1:
            ranges[-1][1] = pos
        else:
            ranges.append([pos, pos])
    shown = [f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:10]]
    more = sum(b - a + 1 for a, b in ranges[10:])
    text = f"{unit}{'s' if len(rows) > 1 else ''} {', '.join(shown)}"
    return text + (f" and {more} more" if more else "")


def _unusable_value(value: Any) -> str | None:
    """A row nested deeper than MAX_DEPTH, or holding a string that is not valid Unicode, as a problem text.

    Walks the row without recursion (a recursive walk would fail on the very rows it looks for)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                char = f"\\u{ord(item[e.start]):04x}"
                place = f"{where} holds" if where else "the row holds"
                return (
                    f"{place} a lone surrogate {char} (half of a UTF-16 pair), which is not valid Unicode and "
                    "cannot be encoded as UTF-8 for the tokenizer; remove it, or write the whole pair "
                    "(e.g. \\ud83d\\ude00 for an emoji)"
                )
        elif isinstance(item, (list, dict)):
            if depth > MAX_DEPTH:
                return _TOO_DEEP
            if isinstance(item, list):
                stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item))
            else:
                for k, v in item.items():
                    name = f"{where}.{k}" if where else str(k)
                    if not isinstance(k, str) or not _IDENTIFIER.fullmatch(k):
                        name = f"{where}[{_show(k)}]"
                    stack.append((k, f"the key {name}", depth + 1))
                    stack.append((v, name, depth + 1))
    return None


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,40}")


def _show(key: Any) -> str:
    """A key as messages quote it: JSON-escaped (no control characters reach the terminal), at most 60 chars."""
    text = str(key)
    if len(text) > 60:
        text = text[:59] + "…"
    shown = json.dumps(text, ensure_ascii=False)
    try:
        shown.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: escape it, as the terminal cannot print it
        return json.dumps(text)
    return shown


def _line_of(where: str) -> str:
    """'train.jsonl:12' -> 'line 12'; 'data.parquet:row 3' -> 'row 3'."""
    tail = where.rpartition(":")[2]
    return f"line {tail}" if tail.isdigit() else tail


def _unknown_format(row: dict) -> str:
    keys = [k for k in row if k not in IGNORED_KEYS]
    known = sorted({k for required, optional in KEYS.values() for k in required + optional})
    hints = [f'"{m[0]}" for {_show(k)}' for k in keys if (m := difflib.get_close_matches(k, known, n=1))]
    if hints:
        fix = f"did you mean {', '.join(hints)}?"
    else:
        fix = (
            "expected messages (chat), instruction/input/output (alpaca), prompt/completion, text, "
            "or prompt/chosen/rejected (preference)"
        )
    shown = ", ".join(_show(k) for k in keys[:10]) if keys else "no keys"
    return f"cannot tell the format from the keys {shown}; {fix}"


Report = Callable[[str], None]


def _check_keys(row: dict, fmt: str, report: Report, extra: dict[str, str]) -> bool:
    """Report unknown and missing keys. True when every required key is there.

    A key close to a known key the row lacks is a misspelling (a problem); the other unknown keys are also put in
    `extra` (key -> text), which the caller may turn into a warning when the row is otherwise valid."""
    required, optional = KEYS[fmt]
    missing = [k for k in required if k not in row]
    absent = [k for k in required + optional if k not in row]
    complete = not missing
    for key in row:
        if key in required or key in optional or key in IGNORED_KEYS:
            continue
        hint = difflib.get_close_matches(key, absent, n=1)
        if hint:
            report(f"unknown key {_show(key)}; did you mean {_show(hint[0])}?")
            if hint[0] in missing:
                missing.remove(hint[0])  # one typo, one message
        else:
            keys = ", ".join([*required, *optional])
            text = (
                f"unknown key {_show(key)}; remove it ({fmt} rows have {keys}; id and metadata are allowed and ignored)"
            )
            extra[key] = text
            report(text)
    for key in missing:
        report(f'missing key "{key}"; add it ({fmt} rows need {", ".join(required)})')
    return complete


def _string(value: Any, what: str, report: Report, allow_empty: bool = False) -> str | None:
    if not isinstance(value, str):
        report(f"{what} is {_kind(value)}; expected a string")
        return None
    if not allow_empty and not value.strip():
        report(f"{what} is empty; write the text or remove the row")
        return None
    return value


def _chat(row: dict, report: Report) -> Example | None:
    raw = row["messages"]
    if not isinstance(raw, list):
        report(f'messages is {_kind(raw)}; expected a list of {{"role": ..., "content": ...}} objects')
        return None
    if not raw:
        report("messages is empty; add a user message and the assistant reply")
        return None
    messages = [m for i, item in enumerate(raw, start=1) if (m := _message(item, i, report)) is not None]
    if len(messages) < len(raw):
        return None  # a bad message was reported; checks of the whole conversation would only repeat it
    roles = [m.role for m in messages]
    if "assistant" not in roles:
        report("no assistant message; add the assistant reply the model should learn")
    elif roles[-1] != "assistant":
        report(
            f"last message is from {roles[-1]}; end the conversation with the assistant reply, "
            "or remove the trailing message"
        )
    elif not any(m.trained for m in messages):
        report("every assistant message has weight 0; set weight 1 (or remove weight) on the replies to learn")
    else:
        return Example("chat", messages)
    return None


def _message(item: Any, i: int, report: Report) -> Message | None:
    if not isinstance(item, dict):
        report(f'message {i} is {_kind(item)}; expected an object like {{"role": "user", "content": "..."}}')
        return None
    ok = True
    misspelt = set()
    for key in item:
        if key not in MESSAGE_KEYS:
            hint = difflib.get_close_matches(key, MESSAGE_KEYS, n=1)
            fix = f'did you mean "{hint[0]}"?' if hint else "remove it (messages have role, content and weight)"
            report(f"message {i} has unknown key {_show(key)}; {fix}")
            misspelt.update(hint)
            ok = False
    role = item.get("role")
    if "role" not in item:
        if "role" not in misspelt:  # one typo, one message
            report(f'message {i} has no role; add "role": one of {", ".join(ROLES)}')
        ok = False
    elif role not in ROLES:
        report(f"message {i} has role {json.dumps(role)}; expected one of {', '.join(ROLES)}")
        ok = False
    content = item.get("content")
    if "content" not in item:
        if "content" not in misspelt:
            report(f'message {i} has no content; add "content": "..."')
        ok = False
    elif not isinstance(content, str):
        report(f"message {i} content is {_kind(content)}; expected a string")
        ok = False
    elif not content.strip():
        report(f"message {i} has empty content; write the text or remove the message")
        ok = False
    weight = item.get("weight")
    if "weight" in item:
        if role in ROLES and role != "assistant":
            report(f"message {i} is from {role} but has a weight; only assistant messages take a weight, remove it")
            ok = False
        elif isinstance(weight, bool) or weight not in (0, 1):
            report(f"message {i} has weight {json.dumps(weight)}; expected 0 (do not train on this reply) or 1")
            ok = False
    if not ok:
        return None
    return Message(role, content, None if weight is None else int(weight))


def _alpaca(row: dict, report: Report) -> Example | None:
    instruction = _string(row["instruction"], "instruction", report)
    extra = row.get("input", "")
    extra = _string("" if extra is None else extra, "input", report, allow_empty=True)
    output = _string(row["output"], "output", report)
    if instruction is None or extra is None or output is None:
        return None
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example("chat", [Message("user", user), Message("assistant", output)])


def _completion(row: dict, report: Report) -> Example | None:
    prompt = _string(row["prompt"], "prompt", report)
    completion = _string(row["completion"], "completion", report)
    if prompt is None or completion is None:
        return None
    return Example("completion", prompt=prompt, completion=completion)


def _text(row: dict, report: Report) -> Example | None:
    text = _string(row["text"], "text", report)
    return None if text is None else Example("text", text=text)


def _preference(row: dict, report: Report) -> Example | None:
    prompt = _string(row["prompt"], "prompt", report)
    chosen = _string(row["chosen"], "chosen", report)
    rejected = _string(row["rejected"], "rejected", report)
    if prompt is None or chosen is None or rejected is None:
        return None
    if chosen.strip() == rejected.strip():
        report("chosen and rejected are the same; a preference pair needs two different answers")
        return None
    return Example("preference", prompt=prompt, chosen=chosen, rejected=rejected)


_CONVERTERS: dict[str, Callable[[dict, Report], Example | None]] = {
    "chat": _chat,
    "alpaca": _alpaca,
    "completion": _completion,
    "text": _text,
    "preference": _preference,
}


def _kind(value: Any) -> str:
    """How a JSON value is named in messages: 'a list', 'null', 'a number (3)'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        text = str(value)
        return f"a number ({text if len(text) <= 20 else text[:19] + '…'})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
