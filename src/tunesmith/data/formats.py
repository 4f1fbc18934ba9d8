"""Read a data file into `Example`s, reporting every problem of the file at once.

(~1050 lines: one owner for every file type and row format, so a row's problems are collected and worded the same
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
    preference  a prompt and two answers, in one of three forms (detected per row; one form per file):
                plain:  {"prompt": "...", "chosen": "...", "rejected": "..."}  (the prompt is raw text, as in
                        completion rows)
                chat:   {"messages": [prompt turns], "chosen": A, "rejected": A}, A being a string, an assistant
                        message {"role": "assistant", "content": "..."} or a list of one (TRL's conversational
                        rows, whose `prompt` is a list of turns, are read as this form too)
                OpenAI: {"input": {"messages": [prompt turns], "tools": [], "parallel_tool_calls": true},
                         "preferred_output": [assistant message], "non_preferred_output": [assistant message]}
                        (OpenAI's DPO fine-tuning rows; tools and tool calls are not supported: a problem)
                Prompt turns follow the chat rules (roles, message keys; no weight, as a prompt is not trained) and
                end with the user turn the answers reply to. The chosen and rejected answers must differ. Plain and
                chat prompts render differently (raw text, chat template), so a file mixing forms is a problem.

Rows may also carry `id` (read and dropped) and `metadata` (a JSON object, kept as `Example.metadata`; in .csv a
cell holding JSON text). A key close to a known key the row lacks
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
PAIR_FORMS: dict[str, tuple[tuple[str, ...], str]] = {
    # form -> (required keys, how messages name its rows)
    "plain": (("prompt", "chosen", "rejected"), "preference"),
    "chat": (("messages", "chosen", "rejected"), "chat-form preference"),
    "openai": (("input", "preferred_output", "non_preferred_output"), "OpenAI DPO"),
}
"""The three forms of preference rows; KEYS["preference"] is the plain form."""
IGNORED_KEYS = ("id", "metadata")
MESSAGE_KEYS = ("role", "content", "weight")
ANSWER_KEYS = ("role", "content")
INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")
"""The keys of an OpenAI DPO row's `input` object."""
_TOOL_KEYS = ("tool_calls", "function_call", "tool_call_id", "tools", "functions")
_NO_TOOLS = "tool definitions and tool calls are not supported (tunesmith trains on text turns only)"
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
    """A table cell holds a conversation (`messages`) or a `metadata` object as JSON text: parse the last row's, or
    drop the row with a problem. An empty metadata cell is no metadata."""
    row = rows[-1]
    for key, example in (
        ("messages", '[{"role": "user", "content": "..."}]'),
        ("metadata", '{"category": "billing"}'),
    ):
        cell = row.value.get(key)
        if not isinstance(cell, str):
            continue
        if key == "metadata" and not cell.strip():
            del row.value[key]
            continue
        what = "the conversation as a JSON list" if key == "messages" else "a JSON object"
        try:
            row.value[key] = json.loads(cell)
        except json.JSONDecodeError as e:
            problems.add(
                row.pos,
                f"{row.where}: the {key} cell is not valid JSON (column {e.colno}: {e.msg}); write {what}, e.g. {example}",
            )
            rows.pop()
            return
        except (RecursionError, ValueError) as e:
            problems.add(row.pos, f"{row.where}: {key} cell: {_unparsable(e)}")
            rows.pop()
            return


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
    if any(key in row for key in ("chosen", "rejected", "preferred_output", "non_preferred_output")):
        return "preference"  # before chat: a chat-form pair has messages too
    if "messages" in row:
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if isinstance(row.get("input"), dict):
        return "preference"  # OpenAI DPO's input object (alpaca's input is text)
    if "completion" in row or "prompt" in row:
        return "completion"
    if "text" in row:
        return "text"
    return None


_FORM_MARKERS = {
    "input": "openai",
    "preferred_output": "openai",
    "non_preferred_output": "openai",
    "messages": "chat",
    "prompt": "plain",
}


def pair_form(row: dict) -> str:
    """Which form of preference row this is: plain, chat or openai (see PAIR_FORMS). A TRL conversational row (its
    `prompt` a list of turns) is the chat form; without any of the keys that tell, a misspelt one decides."""
    if isinstance(row.get("prompt"), list) and "messages" not in row:
        return "chat"
    for key, form in _FORM_MARKERS.items():
        if key in row:
            return form
    for key in row:
        if isinstance(key, str) and (hint := difflib.get_close_matches(key, list(_FORM_MARKERS), n=1)):
            return _FORM_MARKERS[hint[0]]
    return "plain"


_FORM_NAMES = {
    "plain": "plain form (prompt, chosen, rejected",
    "chat": "chat form (messages, chosen, rejected",
    "openai": "OpenAI DPO form (input, preferred_output, non_preferred_output",
}


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
        fmt = _majority(detected)
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
    forms = [pair_form(row.value) if fmt == "preference" else "" for row in objects]
    if fmt == "preference":
        objects, forms = _one_pair_form(objects, forms, problems)

    examples = []
    ignored: dict[str, list[_Row]] = {}  # unknown key -> the otherwise valid rows that carry it
    for row, form in zip(objects, forms):
        found: list[str] = []
        extra: dict[str, str] = {}  # unknown key -> its problem text (also in `found`)
        complete = _check_keys(row.value, fmt, found.append, extra, form)
        metadata = row.value.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            found.append(f'metadata is {_kind(metadata)}; expected an object such as {{"category": "billing"}}')
        convert = _PAIR_CONVERTERS[form] if form else _CONVERTERS[fmt]
        example = convert(row.value, found.append) if complete else None
        if example is not None and not strict and len(found) == len(extra):  # only unknown keys: warn, keep the row
            for key in extra:
                ignored.setdefault(key, []).append(row)
            found = []
        for text in found:
            problems.add(row.pos, f"{row.where}: {text}")
        if example is not None and not found:
            example.source = row.where
            example.metadata = metadata
            examples.append(example)
    for key, carriers in ignored.items():
        warnings.append(
            f"{carriers[0].where}: warning: unknown key {_show(key)} is ignored ({_positions(carriers)}); remove it, "
            'or move it under "metadata" (read and ignored); --strict (data.strict) makes it an error'
        )
    return examples, fmt


def _majority(labels: list[str | None]) -> str:
    """The most common label (None aside); a tie goes to the one seen first."""
    counts = Counter(label for label in labels if label)
    return max(counts, key=lambda label: (counts[label], -labels.index(label)))


def _one_pair_form(objects: list[_Row], forms: list[str], problems: _Problems) -> tuple[list[_Row], list[str]]:
    """Report the pairs written in another form than most of the file's (as rows of another format are), and leave
    them out. Plain prompts are raw text and chat prompts go through the chat template: a mix would teach the model
    two prompt styles."""
    if len(set(forms)) < 2:
        return objects, forms
    form = _majority(forms)  # type: ignore[arg-type]
    first = _line_of(objects[forms.index(form)].where)
    for row, other in zip(objects, forms):
        if other != form:
            why = (
                "a plain prompt is raw text and chat turns go through the chat template, so the model would see "
                "two prompt styles"
                if "plain" in (form, other)
                else "both are chat turns, but a file holds one form"
            )
            problems.add(
                row.pos,
                f"{row.where}: row is a pair in {_FORM_NAMES[other]}) but most pairs are in {_FORM_NAMES[form]}; "
                f"first at {first}); {why}: write every pair in one form",
            )
    keep = [i for i, other in enumerate(forms) if other == form]
    return [objects[i] for i in keep], [forms[i] for i in keep]


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
    known = sorted(
        {k for required, optional in KEYS.values() for k in required + optional}
        | {k for required, _ in PAIR_FORMS.values() for k in required}
    )
    hints = [f'"{m[0]}" for {_show(k)}' for k in keys if (m := difflib.get_close_matches(k, known, n=1))]
    if hints:
        fix = f"did you mean {', '.join(hints)}?"
    else:
        fix = (
            "expected messages (chat), instruction/input/output (alpaca), prompt/completion, text, "
            "or prompt (or messages)/chosen/rejected or input/preferred_output/non_preferred_output (preference)"
        )
    shown = ", ".join(_show(k) for k in keys[:10]) if keys else "no keys"
    return f"cannot tell the format from the keys {shown}; {fix}"


Report = Callable[[str], None]


def _check_keys(row: dict, fmt: str, report: Report, extra: dict[str, str], form: str = "") -> bool:
    """Report unknown and missing keys. True when every required key is there. form: a preference row's form.

    A key close to a known key the row lacks is a misspelling (a problem); the other unknown keys are also put in
    `extra` (key -> text), which the caller may turn into a warning when the row is otherwise valid."""
    required, optional = KEYS[fmt]
    name = fmt
    if form:
        required, name = PAIR_FORMS[form]
        if form == "chat" and "messages" not in row and "prompt" in row:
            required = ("prompt", *required[1:])  # TRL's conversational rows: the turns under `prompt`
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
            text = f"unknown key {_show(key)}; remove it ({name} rows have {keys}; id and metadata are allowed and ignored)"
            extra[key] = text
            report(text)
    for key in missing:
        report(f'missing key "{key}"; add it ({name} rows need {", ".join(required)})')
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


def _message(item: Any, i: int, report: Report, label: str = "message", prompt: bool = False) -> Message | None:
    """One chat message, checked; `label` names it in problems. prompt: a preference prompt's turn (no weight, as
    nothing in a prompt is trained)."""
    name = f"{label} {i}"
    if not isinstance(item, dict):
        report(f'{name} is {_kind(item)}; expected an object like {{"role": "user", "content": "..."}}')
        return None
    ok = True
    misspelt = set()
    for key in item:
        if key in _TOOL_KEYS:
            report(f"{name} has {_show(key)}; {_NO_TOOLS}: remove the row")
            ok = False
        elif key not in MESSAGE_KEYS:
            hint = difflib.get_close_matches(key, MESSAGE_KEYS, n=1)
            fix = f'did you mean "{hint[0]}"?' if hint else "remove it (messages have role, content and weight)"
            report(f"{name} has unknown key {_show(key)}; {fix}")
            misspelt.update(hint)
            ok = False
    role = item.get("role")
    if "role" not in item:
        if "role" not in misspelt:  # one typo, one message
            report(f'{name} has no role; add "role": one of {", ".join(ROLES)}')
        ok = False
    elif role not in ROLES:
        tools = f"; {_NO_TOOLS}" if role in ("tool", "function") else ""
        report(f"{name} has role {json.dumps(role)}; expected one of {', '.join(ROLES)}{tools}")
        ok = False
    content = item.get("content")
    if "content" not in item:
        if "content" not in misspelt:
            report(f'{name} has no content; add "content": "..."')
        ok = False
    elif not isinstance(content, str):
        report(f"{name} content is {_kind(content)}; expected a string")
        ok = False
    elif not content.strip():
        report(f"{name} has empty content; write the text or remove the message")
        ok = False
    weight = item.get("weight")
    if "weight" in item:
        if prompt:
            report(f"{name} has a weight; a preference prompt is not trained (only the answers are), remove it")
            ok = False
        elif role in ROLES and role != "assistant":
            report(f"{name} is from {role} but has a weight; only assistant messages take a weight, remove it")
            ok = False
        elif isinstance(weight, bool) or weight not in (0, 1):
            report(f"{name} has weight {json.dumps(weight)}; expected 0 (do not train on this reply) or 1")
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


def _plain_pair(row: dict, report: Report) -> Example | None:
    prompt = _string(row["prompt"], "prompt", report)
    chosen = _string(row["chosen"], "chosen", report)
    rejected = _string(row["rejected"], "rejected", report)
    if prompt is None or chosen is None or rejected is None:
        return None
    return _pair(Example("preference", prompt=prompt, chosen=chosen, rejected=rejected), "chosen", "rejected", report)


def _chat_pair(row: dict, report: Report) -> Example | None:
    key = "messages" if "messages" in row else "prompt"  # TRL's conversational rows hold the turns in `prompt`
    messages = _prompt_turns(row[key], key, "message", "chosen and rejected", report)
    chosen = _answer(row["chosen"], "chosen", report, text=True)
    rejected = _answer(row["rejected"], "rejected", report, text=True)
    if messages is None or chosen is None or rejected is None:
        return None
    return _pair(Example("preference", messages, chosen=chosen, rejected=rejected), "chosen", "rejected", report)


def _openai_pair(row: dict, report: Report) -> Example | None:
    """OpenAI's DPO fine-tuning row: input {messages, tools, parallel_tool_calls}, preferred_output and
    non_preferred_output each a list of one assistant message."""
    messages = None
    given = row["input"]
    if not isinstance(given, dict):
        report(f'input is {_kind(given)}; expected an object {{"messages": [...]}} holding the prompt turns')
    else:
        ok = True
        for key in given:
            if key not in INPUT_KEYS:
                hint = difflib.get_close_matches(key, [k for k in INPUT_KEYS if k not in given], n=1)
                fix = (
                    f"did you mean {_show(hint[0])}?"
                    if hint
                    else "remove it (input has messages, tools, parallel_tool_calls)"
                )
                report(f"input has unknown key {_show(key)}; {fix}")
                ok = False
        tools = given.get("tools")
        if isinstance(tools, list) and tools:
            report(f"input.tools lists {len(tools)} tool{'s' if len(tools) > 1 else ''}; {_NO_TOOLS}: remove the row")
            ok = False
        elif tools is not None and not isinstance(tools, list):
            report(f"input.tools is {_kind(tools)}; expected a list (empty: {_NO_TOOLS})")
            ok = False
        parallel = given.get("parallel_tool_calls")
        if parallel is not None and not isinstance(parallel, bool):
            report(f"input.parallel_tool_calls is {_kind(parallel)}; expected true or false (it is not used)")
            ok = False
        if "messages" not in given:
            if "messages" not in [h for k in given for h in difflib.get_close_matches(k, INPUT_KEYS, n=1)]:
                report('input has no messages; add "messages": [the prompt turns, ending with a user turn]')
        else:
            answers = "preferred_output and non_preferred_output"
            messages = _prompt_turns(given["messages"], "input.messages", "input message", answers, report)
        if not ok:
            messages = None
    chosen = _answer(row["preferred_output"], "preferred_output", report, text=False)
    rejected = _answer(row["non_preferred_output"], "non_preferred_output", report, text=False)
    if messages is None or chosen is None or rejected is None:
        return None
    example = Example("preference", messages, chosen=chosen, rejected=rejected)
    return _pair(example, "preferred_output", "non_preferred_output", report)


def _pair(example: Example, chosen: str, rejected: str, report: Report) -> Example | None:
    if (example.chosen or "").strip() == (example.rejected or "").strip():
        report(f"{chosen} and {rejected} are the same; a preference pair needs two different answers")
        return None
    return example


def _prompt_turns(raw: Any, what: str, label: str, answers: str, report: Report) -> list[Message] | None:
    """A preference prompt as chat turns: chat messages (no weights) ending with the user turn `answers` reply to."""
    if not isinstance(raw, list):
        report(f'{what} is {_kind(raw)}; expected a list of {{"role": ..., "content": ...}} objects (the prompt turns)')
        return None
    if not raw:
        report(f"{what} is empty; add the user turn that {answers} answer")
        return None
    messages = [m for i, item in enumerate(raw, start=1) if (m := _message(item, i, report, label, prompt=True))]
    if len(messages) < len(raw):
        return None  # a bad message was reported; checks of the whole prompt would only repeat it
    last = messages[-1].role
    if last != "user":
        n = len(messages)
        fix = f"remove {label} {n}, or make it the answer in {answers}" if last == "assistant" else "add the user turn"
        report(
            f"the prompt ends with {'an' if last == 'assistant' else 'a'} {last} turn ({label} {n}); a pair's prompt ends "
            f"with the user turn that {answers} answer: {fix}"
        )
        return None
    return messages


def _answer(value: Any, what: str, report: Report, text: bool) -> str | None:
    """A pair's answer as text. text: a string or a bare assistant message is accepted too (the chat form); else
    only a list of one assistant message (OpenAI's form)."""
    if isinstance(value, str) and text:
        return _string(value, what, report)
    if isinstance(value, list):
        if len(value) == 1:
            return _answer_message(value[0], what, report)
        if value:
            report(
                f"{what} holds {len(value)} messages; an answer is one assistant message (answers of several turns "
                "are not supported): keep the one reply"
            )
        else:
            report(f'{what} is an empty list; write the answer as [{{"role": "assistant", "content": "..."}}]')
        return None
    if isinstance(value, dict) and text:
        return _answer_message(value, what, report)
    expected = (
        'a string, an assistant message {"role": "assistant", "content": "..."} or a list of one'
        if text
        else 'a list of one assistant message [{"role": "assistant", "content": "..."}]'
    )
    report(f"{what} is {_kind(value)}; expected {expected}")
    return None


def _answer_message(item: Any, what: str, report: Report) -> str | None:
    if not isinstance(item, dict):
        report(f'{what} message is {_kind(item)}; expected {{"role": "assistant", "content": "..."}}')
        return None
    ok = True
    misspelt = set()
    for key in item:
        if key in _TOOL_KEYS:
            report(f"{what} message has {_show(key)}; {_NO_TOOLS}: remove the row")
            ok = False
        elif key not in ANSWER_KEYS:
            hint = difflib.get_close_matches(key, [k for k in ANSWER_KEYS if k not in item], n=1)
            fix = f"did you mean {_show(hint[0])}?" if hint else "remove it (an answer message has role and content)"
            report(f"{what} message has unknown key {_show(key)}; {fix}")
            misspelt.update(hint)
            ok = False
    role = item.get("role")
    if "role" not in item:
        if "role" not in misspelt:  # one typo, one message
            report(f'{what} message has no role; add "role": "assistant"')
        ok = False
    elif role != "assistant":
        tools = f"; {_NO_TOOLS}" if role in ("tool", "function") else ""
        report(
            f'{what} message has role {json.dumps(role)}; an answer is the assistant\'s turn, set "role": "assistant"{tools}'
        )
        ok = False
    content = item.get("content")
    if "content" not in item:
        if "content" not in misspelt:
            report(f'{what} message has no content; add "content": "..."')
        ok = False
    elif not isinstance(content, str):
        report(f"{what} message content is {_kind(content)}; expected a string")
        ok = False
    elif not content.strip():
        report(f"{what} message has empty content; write the answer or remove the row")
        ok = False
    return content if ok else None


_CONVERTERS: dict[str, Callable[[dict, Report], Example | None]] = {
    "chat": _chat,
    "alpaca": _alpaca,
    "completion": _completion,
    "text": _text,
    "preference": _plain_pair,
}
_PAIR_CONVERTERS: dict[str, Callable[[dict, Report], Example | None]] = {
    "plain": _plain_pair,
    "chat": _chat_pair,
    "openai": _openai_pair,
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
