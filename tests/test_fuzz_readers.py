"""Property-based tests (hypothesis) of every reader, format and the config loader (issue #21).

Any input either passes or fails with a tunesmith error that names the file (and the line, where the format has
lines), in bounded time (and, for the worst fragments, bounded memory): never a traceback, never a message the
terminal cannot print. Inputs are random bytes and text, and mutations of valid rows of every format (wrong types,
missing and extra keys, nested junk, odd unicode with lone surrogates, huge numbers, NaN, deep nesting), written as
.jsonl, .json, .csv, .parquet and .txt.

Each test runs a bounded number of examples (FUZZ_EXAMPLES) so the file takes seconds; raise it locally
(`FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_readers.py`) to search longer.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunesmith.cli import main
from tunesmith.config import Config, load_config
from tunesmith.data.formats import read_file
from tunesmith.data.validate import check
from tunesmith.errors import ConfigError, DataError

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
SECONDS_PER_INPUT = 5.0  # every input here is under ~100 kB: a read taking longer is a bug (quadratic, runaway)
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # a shared 2-core machine makes per-example deadlines flaky; SECONDS_PER_INPUT bounds time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

VALID = {
    "chat": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": 1},
        ]
    },
    "alpaca": {"instruction": "Add the numbers", "input": "1 and 2", "output": "3"},
    "completion": {"prompt": "2+2=", "completion": "4"},
    "text": {"text": "Some text."},
    "preference": {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
    "preference_chat": {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": {"role": "assistant", "content": "Go away"},
        "metadata": {"topic": "greeting"},
    },
    "preference_openai": {
        "input": {"messages": [{"role": "user", "content": "Hi"}], "tools": [], "parallel_tool_calls": True},
        "preferred_output": [{"role": "assistant", "content": "Hello"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away"}],
    },
}
KNOWN_KEYS = sorted({k for row in VALID.values() for k in row} | {"role", "content", "weight", "id", "metadata"})


class Raw(str):
    """JSON text written as is (what json.dumps cannot write: 100k nested brackets, a 5000-digit number)."""


ODD_STRINGS = [
    "",
    " ",
    "\n",
    "\r\n",
    "a\ud800b",  # lone surrogates: valid in JSON text (\ud800), not valid Unicode
    "\udfff",
    "\ud83d\ude00",  # a surrogate pair in Python: also not encodable
    "😀",
    "\x00",
    "\x1b[31mred",
    "\u202eevil",
    "\ufeff",
    "NaN",
    "null",
    "é" * 3,
    "x" * 5000,
]
RAW = [
    Raw("[" * 100_000),
    Raw("[" * 150 + "]" * 150),
    Raw("{" * 3000),
    Raw('{"a": ' * 120 + "1" + "}" * 120),
    Raw("9" * 5000),
    Raw("-" + "1" * 4400),
    Raw("1e999999"),
    Raw("NaN"),
    Raw("-Infinity"),
    Raw('"\\ud800"'),
    Raw('"\\udc00\\ud800"'),
    Raw("[1, 2"),
    Raw("tru"),
]

text_values = st.one_of(st.text(max_size=30), st.sampled_from(ODD_STRINGS))
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    text_values,
    st.sampled_from(RAW),
)
junk = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(text_values, st.sampled_from(KNOWN_KEYS)), children, max_size=4),
    ),
    max_leaves=12,
)


def _misspell(key: str, draw) -> str:
    if not key:
        return "x"
    i = draw(st.integers(0, max(len(key) - 1, 0)))
    how = draw(st.sampled_from(["drop", "swap", "double", "upper"]))
    if how == "drop":
        return key[:i] + key[i + 1 :]
    if how == "swap" and i + 1 < len(key):
        return key[:i] + key[i + 1] + key[i] + key[i + 2 :]
    if how == "double":
        return key[:i] + key[i] * 2 + key[i + 1 :]
    return key.upper()


@st.composite
def near_valid_rows(draw):
    """A valid row of some format with a few mutations."""
    row = json.loads(json.dumps(VALID[draw(st.sampled_from(sorted(VALID)))]))
    for _ in range(draw(st.integers(0, 3))):
        target = row
        lists = _message_lists(row)  # mutate inside a message (of a conversation, a prompt or an answer) half the time
        if lists and draw(st.booleans()):
            messages = draw(st.sampled_from(lists))
            i = draw(st.integers(0, len(messages) - 1))
            if not isinstance(messages[i], dict) or draw(st.integers(0, 4)) == 0:
                messages[i] = draw(junk)
                continue
            target = messages[i]
        keys = sorted(target)
        action = draw(st.sampled_from(["set", "delete", "add", "misspell", "extra"]))
        if action == "set" and keys:
            target[draw(st.sampled_from(keys))] = draw(junk)
        elif action == "delete" and keys:
            del target[draw(st.sampled_from(keys))]
        elif action == "add":
            target[draw(st.one_of(st.sampled_from(KNOWN_KEYS), text_values))] = draw(junk)
        elif action == "misspell" and keys:
            key = draw(st.sampled_from(keys))
            target[_misspell(key, draw)] = target.pop(key)
        else:
            target[draw(st.sampled_from(["source", "difficulty", "labels", "tags"]))] = draw(junk)
    if draw(st.integers(0, 9)) == 0:
        return draw(junk)  # not an object at all
    return row


def _message_lists(row) -> list[list]:
    """The non-empty lists of messages in a row: messages, a pair's answers, OpenAI's input.messages and outputs."""
    if not isinstance(row, dict):
        return []
    holders = [row, row["input"] if isinstance(row.get("input"), dict) else {}]
    keys = ("messages", "chosen", "rejected", "preferred_output", "non_preferred_output")
    return [h[k] for h in holders for k in keys if isinstance(h.get(k), list) and h[k]]


rows_strategy = st.lists(st.one_of(near_valid_rows(), st.sampled_from(list(VALID.values()))), max_size=6)


def dumps(value) -> str:
    """json.dumps that writes Raw values as they are (and lone surrogates as \\uXXXX escapes, as JSON allows)."""
    raws: list[str] = []

    def swap(v):
        if isinstance(v, Raw):
            raws.append(str(v))
            return f"__RAW_{len(raws) - 1}__"
        if isinstance(v, list):
            return [swap(x) for x in v]
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        return v

    text = json.dumps(swap(value))  # ensure_ascii: every non-ASCII character, surrogates too, as an escape
    for i, raw in enumerate(raws):
        text = text.replace(f'"__RAW_{i}__"', raw, 1)
    return text


def write_rows(path: Path, rows: list, layout: int) -> None:
    """Rows in the file type of `path`; `layout` picks a variant (json: list or {"data": ...}; blank lines)."""
    suffix = path.suffix
    if suffix == ".jsonl":
        sep = "\n\n" if layout % 2 else "\n"
        path.write_text(sep.join(dumps(r) for r in rows) + ("\n" if layout % 3 else ""), encoding="utf-8")
    elif suffix == ".json":
        body = "[\n" + ",\n".join(dumps(r) for r in rows) + "\n]"
        path.write_text('{"data": ' + body + "}" if layout % 2 else body, encoding="utf-8")
    elif suffix in (".csv", ".parquet"):
        records = [r if isinstance(r, dict) else {"value": r} for r in rows]
        columns = list(dict.fromkeys(k for r in records for k in r))
        cells = [{k: _cell(r[k]) if k in r else None for k in columns} for r in records]
        if suffix == ".csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(columns)
            writer.writerows([["" if c[k] is None else c[k] for k in columns] for c in cells])
            path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))
        else:
            pa = pytest.importorskip("pyarrow")
            pq = pytest.importorskip("pyarrow.parquet")
            table = {_cell(k): pa.array([c[k] for c in cells], pa.string()) for k in columns}  # names: UTF-8 too
            pq.write_table(pa.table(table), path)
    else:
        text = "\n\n".join(str(r) for r in rows)
        path.write_bytes(text.encode("utf-8", "surrogatepass"))


def _cell(value) -> str:
    """A table cell: strings as they are (lone surrogates JSON-escaped, as a file could not hold them raw), anything
    else as JSON text (a messages cell holds the conversation as JSON)."""
    if isinstance(value, str) and not isinstance(value, Raw):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return json.dumps(value)
    return dumps(value)


# ----------------------------------------------------------------------------------------------------
# The property


def assert_clean(path: Path, call):
    """Run `call` (a read or check of `path`): it returns, or raises a DataError whose every line names the file and,
    where the file has lines, the line or row. Returns the result, or None after an error."""
    name = str(path)
    start = time.perf_counter()
    try:
        result = call()
    except DataError as e:
        elapsed = time.perf_counter() - start
        text = str(e)
        text.encode("utf-8")  # printable: no lone surrogate reaches the terminal
        assert e.message.startswith(f"{name}: "), text
        assert e.problems or not re.match(r".*: \d+ problems?$", e.message), text
        for line in e.problems:
            if line.startswith("... and "):
                continue
            assert line.startswith(f"{name}:"), line
            assert "\x1b" not in line, line  # control characters in keys are escaped
            where = line[len(name) + 1 :]
            if path.suffix in (".jsonl", ".txt", ".csv") and not where.startswith(" the file is empty"):
                assert re.match(r"\d+: ", where), line
            elif path.suffix == ".json":
                assert re.match(r"(\d+|row \d+): | the file holds | the file is empty", where), line
            elif path.suffix == ".parquet":
                assert re.match(r"row \d+: | not a readable Parquet file | the file is empty", where), line
        result = None
    else:
        elapsed = time.perf_counter() - start
        warnings = getattr(result, "warnings", [])
        for line in warnings:
            line.encode("utf-8")
            assert line.startswith(f"{name}:"), line
    assert elapsed < SECONDS_PER_INPUT, f"{elapsed:.1f} s for {path.stat().st_size} bytes"
    return result


def assert_cli_clean(path: Path):
    """`tunesmith data check FILE` exits 0 or 2 (never 1, an internal error), and prints only UTF-8."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["data", "check", str(path)])
    assert code in (0, 2), err.getvalue()
    assert "internal error" not in err.getvalue()
    if code == 2:
        assert err.getvalue().startswith(f"error: {path}"), err.getvalue()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ----------------------------------------------------------------------------------------------------
# Data files


@FUZZ
@given(data=st.binary(max_size=3000), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes(fuzz_dir, data, suffix):
    path = fuzz_dir / f"bytes{suffix}"
    path.write_bytes(data)
    assert_clean(path, lambda: read_file(path))


@FUZZ
@given(text=st.text(max_size=2000), suffix=st.sampled_from(SUFFIXES))
def test_random_text(fuzz_dir, text, suffix):
    path = fuzz_dir / f"text{suffix}"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # surrogates become bytes no UTF-8 decoder accepts
    assert_clean(path, lambda: read_file(path))


@FUZZ
@given(
    rows=rows_strategy,
    suffix=st.sampled_from(SUFFIXES),
    layout=st.integers(0, 5),
    format=st.sampled_from(["auto", "chat", "alpaca", "completion", "text", "preference"]),
    strict=st.booleans(),
)
def test_near_valid_rows_read(fuzz_dir, rows, suffix, layout, format, strict):
    path = fuzz_dir / f"rows{suffix}"
    write_rows(path, rows, layout)
    if suffix == ".txt" and format not in ("auto", "text"):
        format = "auto"
    data = assert_clean(path, lambda: read_file(path, format, strict=strict))
    if data is not None:
        assert data.examples, "a file that reads without problems has examples"
        for ex in data.examples:
            assert ex.source.startswith(f"{path}:")
            for text in (ex.prompt, ex.completion, ex.text, ex.chosen, ex.rejected, *(m.content for m in ex.messages)):
                if text is not None:
                    text.encode("utf-8")  # what reaches a tokenizer is valid Unicode


@FUZZ
@given(rows=rows_strategy, val_rows=rows_strategy, suffix=st.sampled_from(SUFFIXES), layout=st.integers(0, 5))
def test_near_valid_rows_check(fuzz_dir, rows, val_rows, suffix, layout):
    train, val = fuzz_dir / f"train{suffix}", fuzz_dir / f"val{suffix}"
    write_rows(train, rows, layout)
    write_rows(val, val_rows, layout)
    try:
        report = check(train, val)
    except DataError as e:
        text = str(e)
        text.encode("utf-8")
        for line in e.problems:
            assert line.startswith((f"{train}:", f"{val}:", "... and ")), line
    else:
        for line in report.warnings:
            line.encode("utf-8")
            assert line.startswith((f"{train}:", f"{val}:")), line
        json.dumps(report.to_dict())


@pytest.fixture(scope="module")
def renderer(tokenizer):
    """What api.check_data gives `check` for --model (the fixture's SmolLM2 tokenizer): example -> what training
    renders, and a pair -> its (prompt, chosen, rejected) tokens as training encodes it."""
    from tunesmith.data.templates import Renderer
    from tunesmith.data.validate import pair_token_counter

    render = Renderer(tokenizer)
    return render.encode, pair_token_counter(render)


@settings(FUZZ, max_examples=max(FUZZ_EXAMPLES // 3, 10))
@given(
    rows=rows_strategy,
    suffix=st.sampled_from(SUFFIXES),
    max_length=st.integers(8, 64),
    truncation=st.sampled_from(["truncate", "drop", "error"]),
)
def test_check_with_a_tokenizer(fuzz_dir, tokenizer, renderer, rows, suffix, max_length, truncation):
    # the token statistics and long-example warnings: the tokenizer only ever sees text it can encode
    path = fuzz_dir / f"tok{suffix}"
    write_rows(path, rows, 0)
    report = assert_clean(
        path,
        lambda: check(
            path,
            tokenizer=tokenizer,
            max_length=max_length,
            renderer=renderer[0],
            pair_tokens=renderer[1],
            truncation=truncation,
        ),
    )
    if report is not None:
        assert report.train.over_max_length == sum("longer than max_length" in w for w in report.warnings)


@settings(FUZZ, max_examples=max(FUZZ_EXAMPLES // 3, 10))
@given(rows=rows_strategy, suffix=st.sampled_from(SUFFIXES), layout=st.integers(0, 5))
def test_cli_data_check_never_crashes(fuzz_dir, rows, suffix, layout):
    path = fuzz_dir / f"cli{suffix}"
    write_rows(path, rows, layout)
    assert_cli_clean(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
@pytest.mark.parametrize("raw", RAW[:6], ids=lambda r: r[:12])
def test_every_raw_fragment_in_every_json_reader(fuzz_dir, suffix, raw):
    # the fragments the strategies draw from, each on its own in each reader that parses JSON
    path = fuzz_dir / f"raw{suffix}"
    write_rows(path, [{"messages": raw}, {"text": raw}, VALID["chat"]], 0)
    tracemalloc.start()
    try:
        assert assert_clean(path, lambda: read_file(path)) is None  # each fragment is a problem
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * path.stat().st_size + 5_000_000, f"{peak / 1e6:.0f} MB for {path.stat().st_size} bytes"
    assert_cli_clean(path)


@FUZZ
@given(rows=rows_strategy, data=st.binary(max_size=1000), as_bytes=st.booleans())
def test_generate_prompts_file(fuzz_dir, rows, data, as_bytes):
    from tunesmith.cli.generate import _read_prompts  # `tunesmith generate --file`: JSONL through tunesmith.jsonl

    path = fuzz_dir / "prompts.jsonl"
    if as_bytes:
        path.write_bytes(data)
    else:
        write_rows(path, rows, 0)
    try:
        prompts = _read_prompts(str(path))
    except DataError as e:
        str(e).encode("utf-8")
        assert all(re.match(rf"{re.escape(str(path))}:\d+: ", line) for line in e.problems), e.problems
    else:
        json.dumps(prompts, ensure_ascii=False).encode("utf-8")  # every prompt is text a tokenizer can take


# ----------------------------------------------------------------------------------------------------
# The config loader

VALID_RECIPE = {
    "name": "fuzz",
    "model": "smollm2-135m-instruct",
    "data": {"train": "train.jsonl", "max_length": 512, "truncation": "drop", "strict": True},
    "method": "lora",
    "lora": {"r": 8, "target": ["q_proj", "v_proj"]},
    "train": {"lr": 1e-4, "epochs": 2, "log": ["jsonl"]},
    "eval": {"shots": 3, "format": "Answer: .+"},
}


@st.composite
def near_valid_recipes(draw):
    recipe = json.loads(json.dumps(VALID_RECIPE))
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(recipe)))
        if isinstance(recipe[section], dict) and recipe[section] and draw(st.booleans()):
            key = draw(st.one_of(st.sampled_from(sorted(recipe[section])), text_values))
            recipe[section][key] = draw(junk)
        else:
            recipe[section] = draw(junk)
    return recipe


def _yaml_value(value):
    """Junk as YAML can hold it: Raw fragments as strings (YAML has its own deep-nesting case below)."""
    if isinstance(value, Raw):
        return str(value)[:200]
    if isinstance(value, list):
        return [_yaml_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _yaml_value(v) for k, v in value.items()}
    return value


def assert_config_clean(path: Path):
    start = time.perf_counter()
    try:
        config = load_config(path)
    except ConfigError as e:
        text = str(e)
        text.encode("utf-8")
        assert e.message.startswith(f"{path}"), text
        for line in e.problems:
            assert line.strip().startswith(f"{path}"), line
    else:
        assert isinstance(config, Config)
    assert time.perf_counter() - start < SECONDS_PER_INPUT


@FUZZ
@given(recipe=near_valid_recipes())
def test_near_valid_recipes(fuzz_dir, recipe):
    path = fuzz_dir / "recipe.yaml"
    text = yaml.safe_dump(_yaml_value(recipe), allow_unicode=True, sort_keys=False)
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    assert_config_clean(path)


@FUZZ
@given(
    text=st.one_of(
        st.text(max_size=500),
        st.binary(max_size=500).map(lambda b: b.decode("latin-1")),
        st.sampled_from(
            [
                "train: " + "[" * 3000,
                "train: " + "{a: " * 1500,
                "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nlora: {target: *b}\n",
                "data: {train: !!binary aGVsbG8=}\n",
                "data: !!set {a, b}\n",
                "? [a, b]\n: 1\n",
                "--- 1\n--- 2\n",
                "train: {lr: .nan, epochs: .inf}\n",
                "data: {max_length: 99999999999999999999999999}\n",
            ]
        ),
    )
)
def test_random_recipes(fuzz_dir, text):
    path = fuzz_dir / "random.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    assert_config_clean(path)
