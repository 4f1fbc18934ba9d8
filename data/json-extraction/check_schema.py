"""Check that every row of the json-extraction dataset conforms to the schema in README.md.

Usage: python data/json-extraction/check_schema.py [FILE.jsonl ...]   (default: the three splits next to this file)

Checks, per row: chat format with the fixed system prompt; the assistant answer is exactly
json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")) of an object with exactly the ten keys;
every value has the documented type and format (real calendar dates, 24-hour times, ISO currency codes, positive
integer quantities, lower-case item names); and the answer is grounded in the message: the name, email, phone,
each item name and each note are copied from the user's message (item names case-insensitively), and currency
is null when the message states no money amount. Across files: ids are unique and no
user message appears twice. Exits 1 and lists every problem, or prints a summary.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections import Counter
from pathlib import Path

SYSTEM = (
    "Extract the order, invoice/receipt or appointment request in the user's message as one JSON object with "
    'exactly these keys: type ("order", "invoice" or "appointment"); name (the customer\'s name); date '
    '("YYYY-MM-DD": the appointment date, the requested delivery or pickup date, or the invoice date); time '
    '("HH:MM", 24-hour); items (list of {"name": the item or service in lower case as written, "quantity": '
    'integer}); total (the stated total, a number); currency (ISO code such as "EUR"); email; phone; notes '
    "(special instructions copied from the message). Use null, or [] for items, for anything not stated. If the "
    'message corrects itself, the latest statement wins. Resolve relative dates such as "tomorrow" only against '
    "a date given in the message, otherwise use null. Reply with the JSON only."
)
KEYS = {"type", "name", "date", "time", "items", "total", "currency", "email", "phone", "notes"}
TYPES = {"order", "invoice", "appointment"}
CURRENCIES = {
    "EUR",
    "USD",
    "GBP",
    "CHF",
    "CAD",
    "AUD",
    "NZD",
    "JPY",
    "SEK",
    "NOK",
    "DKK",
    "PLN",
    "CZK",
    "HUF",
    "INR",
    "BRL",
    "MXN",
    "ZAR",
    "SGD",
    "HKD",
    "TRY",
    "RUB",
    "CNY",
    "KRW",
    "AED",
    "ILS",
    "RON",
    "ARS",
    "CLP",
    "COP",
}
MONEY = re.compile(
    r"[$€£¥₹]|\b(?:" + "|".join(sorted(CURRENCIES)) + r")\b|\b(?:euros?|dollars?|pounds?|kr|zł|Kč|Fr\.|R\$|€)", re.I
)
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
TIME = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def encode(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def check_row(row: object) -> list[str]:
    if not isinstance(row, dict) or set(row) != {"id", "messages"}:
        return ["row must be an object with exactly the keys id and messages"]
    msgs = row["messages"]
    if not isinstance(row["id"], str) or not row["id"]:
        return ["id must be a non-empty string"]
    if not (isinstance(msgs, list) and [m.get("role") for m in msgs] == ["system", "user", "assistant"]):
        return ["messages must be system, user, assistant"]
    if msgs[0]["content"] != SYSTEM:
        return ["system prompt differs from the fixed one in check_schema.py"]
    user, answer = msgs[1]["content"], msgs[2]["content"]
    try:
        obj = json.loads(answer)
    except json.JSONDecodeError as err:
        return [f"assistant answer is not JSON: {err}"]
    if not isinstance(obj, dict) or set(obj) != KEYS:
        return [f"answer keys must be exactly {sorted(KEYS)}"]
    problems = []
    if encode(obj) != answer:
        problems.append("answer is not compact sorted JSON (json.dumps sort_keys, separators (',', ':'))")
    if obj["type"] not in TYPES:
        problems.append(f"type {obj['type']!r} not one of {sorted(TYPES)}")
    for key in ("name", "email", "phone", "notes"):
        value = obj[key]
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip() or value != value.strip():
            problems.append(f"{key} must be null or a non-empty trimmed string")
            continue
        parts = value.split("; ") if key == "notes" else [value]
        for part in parts:
            if part not in user:
                problems.append(f"{key} part {part!r} is not copied from the message")
    if obj["email"] is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", obj["email"]):
        problems.append(f"email {obj['email']!r} is not an email address")
    if obj["phone"] is not None and len(re.sub(r"\D", "", obj["phone"])) < 6:
        problems.append(f"phone {obj['phone']!r} has fewer than 6 digits")
    if obj["date"] is not None:
        try:
            if not (isinstance(obj["date"], str) and DATE.match(obj["date"])):
                raise ValueError
            dt.date.fromisoformat(obj["date"])
        except ValueError:
            problems.append(f"date {obj['date']!r} is not a real YYYY-MM-DD date")
    if obj["time"] is not None and not (isinstance(obj["time"], str) and TIME.match(obj["time"])):
        problems.append(f"time {obj['time']!r} is not HH:MM (24-hour)")
    items = obj["items"]
    if not isinstance(items, list):
        problems.append("items must be a list")
        items = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"name", "quantity"}:
            problems.append(f"item {item!r} must have exactly name and quantity")
            continue
        name, qty = item["name"], item["quantity"]
        if not isinstance(name, str) or not name or name != name.lower() or name != name.strip():
            problems.append(f"item name {name!r} must be a non-empty trimmed lower-case string")
        elif name not in user.lower():
            problems.append(f"item name {name!r} is not copied from the message")
        if type(qty) is not int or qty < 1:
            problems.append(f"item {name!r}: quantity must be a positive integer")
    total = obj["total"]
    if total is not None and (type(total) not in (int, float) or total < 0):
        problems.append("total must be null or a non-negative number")
    currency = obj["currency"]
    if currency is not None and currency not in CURRENCIES:
        problems.append(f"currency {currency!r} is not a known ISO 4217 code")
    if currency is not None and total is None and not MONEY.search(user):
        problems.append("currency is set but the message states no money amount")
    return problems


def main(paths: list[str]) -> int:
    here = Path(__file__).resolve().parent
    files = [Path(p) for p in paths] or [here / f"{s}.jsonl" for s in ("train", "validation", "test")]
    problems: list[str] = []
    ids: Counter = Counter()
    users: dict[str, str] = {}
    counts: Counter = Counter()
    for path in files:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.name}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{where}: not JSON: {err}")
                continue
            problems += [f"{where}: {p}" for p in check_row(row)]
            if isinstance(row, dict):
                ids[row.get("id")] += 1
                try:
                    user = row["messages"][1]["content"]
                    counts[(path.name, json.loads(row["messages"][2]["content"])["type"])] += 1
                except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                    continue
                key = re.sub(r"\W+", " ", user.lower()).strip()
                if key in users:
                    problems.append(f"{where}: same message as {users[key]}")
                users[key] = where
    problems += [f"id {i!r} appears {n} times" for i, n in ids.items() if n > 1]
    if problems:
        print("\n".join(problems))
        print(f"{len(problems)} problem(s)")
        return 1
    for path in files:
        by_type = {t: counts[(path.name, t)] for t in sorted(TYPES)}
        print(f"{path.name}: {sum(by_type.values())} rows {by_type}")
    print("OK: every row conforms to the schema")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
