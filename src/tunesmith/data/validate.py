"""Check a dataset before training: every problem of its files, then statistics and warnings.

(~680 lines: the checks, the statistics and their one terminal rendering are one feature, `tunesmith data check`;
each check is a small function.)

`check(train, validation)` reads the files with `formats.read_file`, which raises `DataError` listing every
problem (`FILE:LINE: what is wrong; how to fix it`). A readable dataset gives a `DataReport`: format, counts,
turns, token lengths (with a tokenizer), and warnings that do not fail the check, each
`FILE:LINE: warning: what; what to do`:

- exact duplicate: same input and answer (`Example.input_key()` and `answer()`; text rows: same text)
- near-duplicate: the sets of words of the two rows (system messages left out, as one shared system prompt
  would make every pair look alike; lowercased, punctuation dropped) have a Jaccard similarity of at least
  NEAR_DUPLICATE_JACCARD. Candidates come from MinHash with LSH banding (numpy), so 10k rows take about a
  second rather than the 50M comparisons of every pair; each candidate is then confirmed exactly.
- conflicting answers: same normalised input, different answer (chat and completion rows)
- train/validation overlap: a validation row with the same input as a training row (exact), or a
  near-duplicate of one (near)
- unknown keys of otherwise valid rows (from `formats.read_file`; problems with strict=True)
- longer than max_length (with a tokenizer): what training will do with the example, per data.truncation: cut
  its end off (or drop it when the cut leaves no trained token), drop it, or stop with an error
- classification-like data (see `is_classification`): imbalanced labels, or validation labels the training
  file never shows
- preference pairs: the mean length of the chosen and the rejected answers and the share of pairs whose chosen
  answer is the longer (`FileReport.pair_lengths`; tokens with a tokenizer, else characters), with a warning when
  chosen answers are systematically longer (LENGTH_BIAS_RATIO, LENGTH_BIAS_SHARE). With a tokenizer and max_length,
  a pair whose prompt + longer answer exceeds max_length is a warning (its answers would be cut), and one whose
  prompt alone leaves no room for an answer token is a problem (`DataError`, as FILE:LINE): no objective can
  learn from it. Pairs are counted as training encodes them (`pair_token_counter`).
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tunesmith.data.example import Example
from tunesmith.data.formats import MAX_PROBLEMS, DataFile, read_file
from tunesmith.errors import DataError

NEAR_DUPLICATE_JACCARD = 0.8
"""Word-set Jaccard similarity from which two rows are near-duplicates. A one-word substitution in a row of
n words gives (n-1)/(n+1): flagged from 9 words up; one word added or dropped: from 4 words up."""

CLASSIFICATION_MAX_WORDS = 5
"""A label is an answer of at most this many words..."""
CLASSIFICATION_MAX_LABELS = 50
"""...and the data has between 2 and this many distinct labels..."""
CLASSIFICATION_MIN_COUNT = 2
"""...each seen at least this often..."""
CLASSIFICATION_COVERAGE = 0.95
"""...that together answer at least this share of the examples."""
IMBALANCE_RATIO = 10
"""Warn when the most common label has at least this many times the examples of the rarest."""

LENGTH_BIAS_RATIO = 1.3
"""Warn when the chosen answers' mean length is at least this multiple of the rejected answers'..."""
LENGTH_BIAS_SHARE = 0.7
"""...and the chosen answer is the longer in at least this share of pairs. DPO exploits length: Park et al. 2024
("Disentangling Length from Quality in Direct Preference Optimization", arXiv:2403.19159) show DPO making answers
far longer than those of its preference data. These thresholds flag only a bias strong enough that the data alone
teaches "longer is better"; a mild one goes unflagged."""

_BANDS, _BAND_ROWS = 25, 5  # P(candidate) = 1 - (1 - J^5)^25: 0.99995 at J=0.8, 0.55 at 0.5, 0.06 at 0.3
_NUM_HASHES = _BANDS * _BAND_ROWS
_MAX_BUCKET = 64  # compare all pairs in LSH buckets up to this size; chain larger ones (bounded work)


@dataclass
class FileReport:
    path: str
    format: str
    examples: int
    messages: dict[str, float] | None = None
    """Messages per conversation: min, mean, max (chat data)."""
    roles: dict[str, int] | None = None
    """Number of messages of each role (chat data)."""
    tokens: dict[str, dict[str, float]] | None = None
    """Per role (or field: prompt, completion, text, chosen, rejected) and "total": tokens per example as
    p50/p90/p99/max/mean (nearest-rank percentiles). Only with a tokenizer."""
    over_max_length: int | None = None
    """Examples whose total exceeds max_length (training truncates, drops or refuses them per data.truncation).
    Only with a tokenizer and max_length."""
    exact_duplicates: int = 0
    """Rows that repeat an earlier row exactly."""
    near_duplicates: int = 0
    """Rows that are near-duplicates of an earlier row (and not exact duplicates)."""
    conflicts: int = 0
    """Rows whose input matches an earlier row's but whose answer differs."""
    labels: dict[str, int] | None = None
    """For classification-like data: examples per label, most common first ("(other)" for the rest). A
    validation file is counted against the training file's labels."""
    pair_lengths: dict[str, Any] | None = None
    """Preference data: the answers' lengths in `unit` (tokens with a tokenizer, else characters): chosen_mean,
    rejected_mean, and chosen_longer, the share of pairs whose chosen answer is the longer."""


@dataclass
class DataReport:
    train: FileReport
    validation: FileReport | None = None
    max_length: int | None = None
    overlap_exact: int | None = None
    """Validation rows whose input is also a training input (only with a validation file)."""
    overlap_near: int | None = None
    """Validation rows that are near-duplicates of a training row (and not exact overlaps)."""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(
    train_path: str | Path,
    validation_path: str | Path | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    renderer: Callable[[Example], Sequence[int]] | None = None,
    format: str = "auto",
    truncation: str = "truncate",
    strict: bool = False,
    pair_tokens: Callable[[Example], tuple[int, int, int]] | None = None,
) -> DataReport:
    """Validate a training file (and a validation file). Raises DataError listing the problems of both files.

    tokenizer: a Hugging Face tokenizer, for token counts. renderer: example -> token ids as training sees
    them (chat template included), or a `templates.Encoded` (then an example whose cut to max_length keeps no
    trained token is reported as dropped, as training does); without one the total is the sum of the roles'
    content tokens. truncation: data.truncation, for what the long-example warnings say training will do.
    strict: unknown keys of rows are problems, not warnings. pair_tokens: a preference pair -> its (prompt, chosen,
    rejected) token counts as training renders them (see `pair_token_counter`); without one, the content tokens.
    A pair whose prompt leaves no room for an answer within max_length is a problem (raised as DataError).
    """
    paths = [str(train_path)] + ([] if validation_path is None else [str(validation_path)])
    files, errors = [], []
    for path in paths:
        try:
            files.append(read_file(path, format, max_problems=None, strict=strict))
        except DataError as e:
            errors.append((path, e))
    if errors:
        if len(errors) == 1 and not errors[0][1].problems:
            raise errors[0][1]  # one whole-file error, such as a missing file
        found = [line for _, e in errors for line in (e.problems or [e.message])]
        n = len(found)
        shown = found[:MAX_PROBLEMS] + ([f"... and {n - MAX_PROBLEMS} more"] if n > MAX_PROBLEMS else [])
        raise DataError(f"{' and '.join(p for p, _ in errors)}: {n} problem{'s' if n != 1 else ''}", shown)

    # long examples last: they can be many, and the table counts them
    warnings: list[str] = [w for f in files for w in f.warnings]
    too_long: list[str] = []
    no_room: list[tuple[str, str]] = []  # (path, problem): pairs whose prompt leaves no room for an answer
    counting = _Counting(tokenizer, max_length, renderer, pair_tokens, truncation)
    reports = [_file_report(f, counting, warnings, too_long, no_room) for f in files]
    if no_room:
        found = [line for _, line in no_room]
        n = len(found)
        shown = found[:MAX_PROBLEMS] + ([f"... and {n - MAX_PROBLEMS} more"] if n > MAX_PROBLEMS else [])
        where = " and ".join(dict.fromkeys(path for path, _ in no_room))
        raise DataError(f"{where}: {n} problem{'s' if n != 1 else ''}", shown)
    report = DataReport(train=reports[0], max_length=max_length, warnings=warnings)
    if len(files) == 2:
        report.validation = reports[1]
        train, val = files
        report.overlap_exact, report.overlap_near = _overlap(train.examples, val.examples, warnings)
        if report.train.labels:  # the validation file's labels, counted against the training label set
            labels = is_classification(train.examples) or []
            report.validation.labels = _label_counts(val.examples, labels)
            _unseen_labels(val.examples, labels, warnings)
    warnings += too_long
    return report


# ----------------------------------------------------------------------------------------------------
# One file


@dataclass
class _Counting:
    """How `check` counts tokens (all None without a tokenizer) and what training does with long examples."""

    tokenizer: Any
    max_length: int | None
    renderer: Callable[[Example], Sequence[int]] | None
    pair_tokens: Callable[[Example], tuple[int, int, int]] | None
    truncation: str


def _file_report(
    data: DataFile, counting: _Counting, warnings: list[str], too_long: list[str], no_room: list[tuple[str, str]]
) -> FileReport:
    path, examples = data.path, data.examples
    report = FileReport(path=path, format=data.format, examples=len(examples))
    chats = [ex for ex in examples if ex.kind == "chat"]
    if chats:
        sizes = [len(ex.messages) for ex in chats]
        report.messages = {"min": min(sizes), "mean": round(sum(sizes) / len(sizes), 2), "max": max(sizes)}
        report.roles = dict(Counter(m.role for ex in chats for m in ex.messages))
    pairs: dict[int, tuple[int, int, int]] = {}
    if counting.tokenizer is not None:
        max_length, truncation = counting.max_length, counting.truncation
        report.tokens, totals, nothing_left, pairs = _token_stats(examples, counting)
        if max_length is not None:
            long = [i for i, n in enumerate(totals) if n > max_length]
            report.over_max_length = len(long)
            for i in long:
                if i in pairs:
                    prompt = pairs[i][0]
                    if prompt >= max_length:
                        no_room.append((path, _no_room(examples[i], prompt, max_length)))
                    else:
                        too_long.append(_long_pair(examples[i], prompt, totals[i], max_length, truncation))
                    continue
                fate = _training_fate(totals[i], max_length, truncation, i in nothing_left)
                too_long.append(
                    f"{examples[i].source}: warning: {totals[i]} tokens, longer than max_length {max_length}: {fate}"
                )
    report.pair_lengths = _pair_lengths(examples, pairs if counting.tokenizer is not None else None)
    if report.pair_lengths:
        _length_bias(path, report.pair_lengths, warnings)
    report.exact_duplicates, report.near_duplicates = _duplicates(examples, path, warnings)
    report.conflicts = _conflicts(examples, path, warnings)
    labels = is_classification(examples)
    if labels:
        report.labels = _label_counts(examples, labels)
        _imbalance(path, labels, report.labels, warnings)
    return report


def _training_fate(length: int, max_length: int, truncation: str, nothing_left: bool) -> str:
    """What training does with an example of `length` tokens (as `training.loop._encode_all` does), and the fix."""
    if truncation == "error":
        return (
            "train will stop with an error (data.truncation=error); raise --max-length, shorten the example, "
            "or set data.truncation to truncate or drop"
        )
    if truncation == "drop":
        return "train will drop it (data.truncation=drop); raise --max-length or shorten the example"
    if nothing_left:
        return (
            f"train will drop it, as its first {max_length} tokens hold nothing to learn (data.truncation="
            "truncate keeps the start); raise --max-length or shorten the prompt"
        )
    return (
        f"train will cut off its last {length - max_length} tokens (data.truncation=truncate); raise --max-length, "
        "shorten the example, or set data.truncation=drop to leave it out"
    )


def _no_room(ex: Example, prompt: int, max_length: int) -> str:
    return (
        f"{ex.source}: the prompt alone is {prompt} tokens, so max_length {max_length} leaves no room for an answer "
        "and the pair cannot be trained; shorten the prompt, raise --max-length, or remove the pair"
    )


def _long_pair(ex: Example, prompt: int, total: int, max_length: int, truncation: str) -> str:
    """A pair whose prompt fits but whose prompt + longer answer does not: what training does with it."""
    if truncation == "error":
        fate = (
            "train will stop with an error (data.truncation=error); raise --max-length, shorten the answers, "
            "or set data.truncation to truncate or drop"
        )
    elif truncation == "drop":
        fate = "train will drop it (data.truncation=drop); raise --max-length or shorten the answers"
    else:
        fate = (
            f"the answers would be cut to fit, the longer losing its last {total - max_length} tokens "
            "(data.truncation=truncate); raise --max-length, shorten the answers, or set data.truncation=drop"
        )
    return (
        f"{ex.source}: warning: {total} tokens (prompt {prompt} + longer answer {total - prompt}), longer than "
        f"max_length {max_length}: {fate}"
    )


def _pair_lengths(examples: list[Example], tokens: dict[int, tuple[int, int, int]] | None) -> dict[str, Any] | None:
    """Mean chosen and rejected answer lengths and the share of pairs whose chosen is the longer (None without
    pairs). tokens: the pairs' (prompt, chosen, rejected) token counts by index; None: count characters."""
    if tokens is None:
        lengths = [(len(ex.chosen or ""), len(ex.rejected or "")) for ex in examples if ex.kind == "preference"]
    else:
        lengths = [(c, r) for _, c, r in tokens.values()]
    if not lengths:
        return None
    n = len(lengths)
    return {
        "unit": "characters" if tokens is None else "tokens",
        "chosen_mean": round(sum(c for c, _ in lengths) / n, 1),
        "rejected_mean": round(sum(r for _, r in lengths) / n, 1),
        "chosen_longer": round(sum(c > r for c, r in lengths) / n, 3),
    }


def _length_bias(path: str, lengths: dict[str, Any], warnings: list[str]) -> None:
    chosen, rejected, share = lengths["chosen_mean"], lengths["rejected_mean"], lengths["chosen_longer"]
    if chosen >= LENGTH_BIAS_RATIO * rejected and share >= LENGTH_BIAS_SHARE:
        warnings.append(
            f"{path}: warning: chosen answers are systematically longer than rejected ones (mean {chosen} vs "
            f"{rejected} {lengths['unit']}; chosen longer in {share:.0%} of pairs), so DPO can learn that longer "
            'is better (Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization", '
            "arXiv:2403.19159); add pairs whose chosen answer is the shorter one, or trim the chosen answers"
        )


def _imbalance(path: str, labels: list[str], counts: dict[str, int], warnings: list[str]) -> None:
    most, rarest = max(labels, key=lambda k: counts[k]), min(labels, key=lambda k: counts[k])
    if counts[most] >= IMBALANCE_RATIO * counts[rarest]:
        warnings.append(
            f"{path}: warning: labels are imbalanced ({_quote(most)}: {counts[most]} examples, "
            f"{_quote(rarest)}: {counts[rarest]}); add examples of the rare labels, or the model "
            f"may learn to answer {_quote(most)}"
        )


def _fields(ex: Example) -> list[tuple[str, str]]:
    """(role or field name, text) pairs of an example, for token counts."""
    if ex.kind == "chat":
        return [(m.role, m.content) for m in ex.messages]
    if ex.kind == "completion":
        return [("prompt", ex.prompt or ""), ("completion", ex.completion or "")]
    if ex.kind == "preference":
        prompt = [("prompt", m.content) for m in ex.messages] if ex.is_chat_pair else [("prompt", ex.prompt or "")]
        return [*prompt, ("chosen", ex.chosen or ""), ("rejected", ex.rejected or "")]
    return [("text", ex.text or "")]


def _token_stats(
    examples: list[Example], counting: _Counting
) -> tuple[dict[str, dict[str, float]], list[int], set[int], dict[int, tuple[int, int, int]]]:
    """Token statistics, each example's total length, the examples whose first max_length tokens hold no trained
    token (known where the renderer gives labels: training drops those rather than truncating them), and, by index,
    each preference pair's prompt tokens as training renders them and its answers' content tokens."""
    tokenizer, renderer, max_length = counting.tokenizer, counting.renderer, counting.max_length
    owners, roles, texts = [], [], []
    for i, ex in enumerate(examples):
        for role, text in _fields(ex):
            owners.append(i)
            roles.append(role)
            texts.append(text)
    lengths: list[int] = []
    for start in range(0, len(texts), 1024):  # batched: the fast tokenizer works through a list in Rust
        ids = tokenizer(texts[start : start + 1024], add_special_tokens=False)["input_ids"]
        lengths.extend(len(x) for x in ids)
    per_example: list[dict[str, int]] = [defaultdict(int) for _ in examples]
    for i, role, n in zip(owners, roles, lengths):
        per_example[i][role] += n
    nothing_left: set[int] = set()
    pairs: dict[int, tuple[int, int, int]] = {}
    totals = []
    for i, (ex, counts) in enumerate(zip(examples, per_example)):
        if ex.kind == "preference":  # trained as prompt + chosen and prompt + rejected: the longer counts
            content = (counts["prompt"], counts["chosen"], counts["rejected"])
            prompt, chosen, rejected = counting.pair_tokens(ex) if counting.pair_tokens else content
            totals.append(prompt + max(chosen, rejected))
            pairs[i] = (prompt, content[1], content[2])  # the answers' own lengths for the length statistics
        elif renderer is not None:
            rendered = renderer(ex)
            totals.append(len(rendered))
            labels = getattr(rendered, "labels", None)
            if max_length is not None and labels is not None and all(t == -100 for t in labels[:max_length]):
                nothing_left.add(i)
        else:
            totals.append(sum(counts.values()))
    by_role: dict[str, list[int]] = defaultdict(list)
    for counts in per_example:
        for role, n in counts.items():
            by_role[role].append(n)
    order = ["system", "user", "assistant", "prompt", "completion", "chosen", "rejected", "text"]
    stats = {role: _percentiles(by_role[role]) for role in sorted(by_role, key=order.index)}
    stats["total"] = _percentiles(totals)
    return stats, totals, nothing_left, pairs


def _percentiles(values: Sequence[int]) -> dict[str, float]:
    """Nearest-rank percentiles: p90 is the smallest value at least 90% of the examples do not exceed."""
    v = sorted(values)
    n = len(v)

    if not v:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0}

    def rank(p: int) -> int:
        return v[max(0, -(-p * n // 100) - 1)]  # the ceil(p% of n)-th smallest

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": v[-1], "mean": round(sum(v) / n, 1)}


# ----------------------------------------------------------------------------------------------------
# Duplicates, near-duplicates, conflicts, overlap

_NON_WORD = re.compile(r"[\W_]+")


def normalize_text(text: str) -> str:
    """Lowercase, NFKC, punctuation and runs of whitespace to one space: 'Hello,  World!' -> 'hello world'."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def _exact_key(ex: Example) -> tuple:
    if ex.kind == "preference":
        return (ex.input_key(), ex.chosen, ex.rejected)
    return (ex.input_key(), ex.answer())


def _words(ex: Example) -> frozenset[str]:
    """The words a near-duplicate check compares: every field but system messages."""
    if ex.kind == "chat":
        text = "\n".join(m.content for m in ex.messages if m.role != "system")
    elif ex.is_chat_pair:
        turns = [m.content for m in ex.messages if m.role != "system"]
        text = "\n".join([*turns, ex.chosen or "", ex.rejected or ""])
    else:
        text = "\n".join(t for _, t in _fields(ex))
    return frozenset(normalize_text(text).split())


def _where(ex: Example, path: str) -> str:
    """How a row of the same file is named in a warning: 'line 12' (or 'row 3'); another file's: in full."""
    if ex.source.startswith(path + ":"):
        tail = ex.source[len(path) + 1 :]
        return f"line {tail}" if tail.isdigit() else tail
    return ex.source


def _duplicates(examples: list[Example], path: str, warnings: list[str]) -> tuple[int, int]:
    first: dict[tuple, int] = {}
    exact = 0
    unique = []  # indices of rows that are not exact duplicates
    for i, ex in enumerate(examples):
        j = first.setdefault(_exact_key(ex), i)
        if j != i:
            exact += 1
            warnings.append(f"{ex.source}: warning: exact duplicate of {_where(examples[j], path)}; remove one copy")
        else:
            unique.append(i)

    words = [_words(examples[i]) for i in unique]
    near: dict[int, tuple[int, float]] = {}  # later row -> (earliest similar row, similarity)
    for a, b, sim in _similar_pairs(words):
        i, j = unique[a], unique[b]
        if j not in near or i < near[j][0]:
            near[j] = (i, sim)
    for j, (i, sim) in sorted(near.items()):
        warnings.append(
            f"{examples[j].source}: warning: near-duplicate of {_where(examples[i], path)} ({sim:.0%} of words "
            "shared); remove one, or make them differ"
        )
    return exact, len(near)


def _conflicts(examples: list[Example], path: str, warnings: list[str]) -> int:
    first: dict[str, int] = {}
    conflicts = 0
    for i, ex in enumerate(examples):
        if ex.kind not in ("chat", "completion"):
            continue  # a preference prompt often has several pairs; text has no answer
        j = first.setdefault(normalize_text(ex.input_key()), i)
        answer, other = (ex.answer() or "").strip(), (examples[j].answer() or "").strip()
        if j != i and answer != other:
            conflicts += 1
            warnings.append(
                f"{ex.source}: warning: same input as {_where(examples[j], path)} but a different answer "
                f"({_quote(answer)} vs {_quote(other)}); keep one answer, or make the inputs differ"
            )
    return conflicts


def _overlap(train: list[Example], val: list[Example], warnings: list[str]) -> tuple[int, int]:
    inputs: dict[str, int] = {}
    for i, ex in enumerate(train):
        inputs.setdefault(ex.input_key(), i)
    exact_rows = set()
    for j, ex in enumerate(val):
        if (i := inputs.get(ex.input_key())) is not None:
            exact_rows.add(j)
            warnings.append(
                f"{ex.source}: warning: same input as {train[i].source} (the training file); remove it from "
                "one of the files so validation measures unseen examples"
            )
    near: dict[int, tuple[int, float]] = {}
    words = [_words(ex) for ex in train] + [_words(ex) for ex in val]
    for a, b, sim in _similar_pairs(words, split=len(train)):
        j = b - len(train)
        if j not in exact_rows and (j not in near or a < near[j][0]):
            near[j] = (a, sim)
    for j, (i, sim) in sorted(near.items()):
        warnings.append(
            f"{val[j].source}: warning: near-duplicate of {train[i].source} in the training file ({sim:.0%} of "
            "words shared); remove it from one of the files"
        )
    return len(exact_rows), len(near)


def _similar_pairs(word_sets: list[frozenset[str]], split: int | None = None) -> list[tuple[int, int, float]]:
    """Pairs (i, j, jaccard), i < j, with word-set Jaccard >= NEAR_DUPLICATE_JACCARD.

    For each row j the pairs include its earliest similar row. With `split`, only pairs with
    i < split <= j (the rows of two files, concatenated). Rows with identical word sets are grouped first;
    the distinct sets go through MinHash LSH, and every candidate pair of sets is confirmed exactly.
    """
    groups: dict[frozenset[str], list[int]] = defaultdict(list)
    for i, words in enumerate(word_sets):
        if words:  # a row of punctuation only has no words to compare
            groups[words].append(i)
    sets = list(groups)
    members = list(groups.values())

    def link(into: list[int], partners: list[int], sim: float) -> list[tuple[int, int, float]]:
        """Each row of `into` paired with its earliest earlier row among `partners`."""
        if split is not None:
            into = [j for j in into if j >= split]
            partners = [i for i in partners if i < split]
        if not partners:
            return []
        return [(partners[0], j, sim) for j in into if partners[0] < j]

    pairs = [p for rows in members for p in link(rows[1:], rows, 1.0)]
    if len(sets) < 2:
        return pairs
    seen: set[tuple[int, int]] = set()
    for bucket in _lsh_buckets(_minhash(sets)):
        if len(bucket) <= _MAX_BUCKET:
            candidates = [(s, t) for x, s in enumerate(bucket) for t in bucket[x + 1 :]]
        else:  # a huge bucket of alike rows: the first and the neighbours keep the work linear
            candidates = [(bucket[0], t) for t in bucket[1:]] + list(zip(bucket[1:], bucket[2:]))
        for s, t in candidates:
            if (s, t) in seen:
                continue
            seen.add((s, t))
            sim = len(sets[s] & sets[t]) / len(sets[s] | sets[t])
            if sim >= NEAR_DUPLICATE_JACCARD:
                pairs += link(members[t], members[s], sim) + link(members[s], members[t], sim)
    return pairs


def _minhash(word_sets: list[frozenset[str]]) -> np.ndarray:
    """(n, _NUM_HASHES) MinHash signatures: per hash function, the minimum over the words of a
    multiply-shift hash ((a*x + b) mod 2^64) >> 32 of the word's CRC32 (no modulo: twice as fast)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1 << 63, _NUM_HASHES, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 1 << 63, _NUM_HASHES, dtype=np.uint64)
    crc: dict[str, int] = {}  # words repeat across rows: hash each once
    ids = [
        np.fromiter((crc.get(w) or crc.setdefault(w, zlib.crc32(w.encode())) for w in s), np.uint64, count=len(s))
        for s in word_sets
    ]
    sigs = np.empty((len(ids), _NUM_HASHES), dtype=np.uint64)
    start = 0
    while start < len(ids):  # chunks of ~32k words keep the (words x hashes) matrix near 32 MB
        stop, total = start, 0
        while stop < len(ids) and (stop == start or total + len(ids[stop]) <= 32_768):
            total += len(ids[stop])
            stop += 1
        chunk = ids[start:stop]
        hashed = (np.concatenate(chunk)[:, None] * a + b) >> np.uint64(32)
        offsets = np.cumsum([0] + [len(x) for x in chunk[:-1]])
        sigs[start:stop] = np.minimum.reduceat(hashed, offsets, axis=0)  # every set here is non-empty
        start = stop
    return sigs


def _lsh_buckets(sigs: np.ndarray) -> list[list[int]]:
    """Groups of rows whose signatures agree on a whole band (of _BAND_ROWS hashes), for each band."""
    buckets = []
    mix = np.random.default_rng(1).integers(1, 1 << 63, _BAND_ROWS, dtype=np.uint64)
    for band in range(_BANDS):
        # one 64-bit key per row and band (uint64 arithmetic wraps; a collision only adds a candidate)
        keys = (sigs[:, band * _BAND_ROWS : (band + 1) * _BAND_ROWS] * mix).sum(axis=1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(keys)]
        for k in np.flatnonzero(ends - starts > 1):
            buckets.append(order[starts[k] : ends[k]].tolist())  # stable sort: already in row order
    return buckets


# ----------------------------------------------------------------------------------------------------
# Classification-like data


def is_classification(examples: Sequence[Example]) -> list[str] | None:
    """The sorted label set if the data looks like classification, else None.

    Classification-like: every example is chat or completion; answers (stripped) of at most
    CLASSIFICATION_MAX_WORDS words, each seen at least CLASSIFICATION_MIN_COUNT times, are the labels; there
    are 2 to CLASSIFICATION_MAX_LABELS of them and they answer at least CLASSIFICATION_COVERAGE of the
    examples. Answers outside the set (rare or long) are the remaining few percent.
    """
    if not examples or any(ex.kind not in ("chat", "completion") for ex in examples):
        return None
    counts = Counter((ex.answer() or "").strip() for ex in examples)
    labels = [
        a
        for a, c in counts.items()
        if a and c >= CLASSIFICATION_MIN_COUNT and len(a.split()) <= CLASSIFICATION_MAX_WORDS
    ]
    if not 2 <= len(labels) <= CLASSIFICATION_MAX_LABELS:
        return None
    if sum(counts[a] for a in labels) < CLASSIFICATION_COVERAGE * len(examples):
        return None
    return sorted(labels)


def _label_counts(examples: Sequence[Example], labels: list[str]) -> dict[str, int]:
    """Examples per label, most common first; "(other)" counts the answers outside `labels`."""
    counts = Counter((ex.answer() or "").strip() for ex in examples)
    out = {label: counts[label] for label in sorted(labels, key=lambda k: (-counts[k], k))}
    other = sum(c for a, c in counts.items() if a not in out)
    if other:
        out["(other)"] = other
    return out


def _unseen_labels(val: list[Example], labels: list[str], warnings: list[str]) -> None:
    for ex in val:
        answer = (ex.answer() or "").strip()
        if ex.kind in ("chat", "completion") and answer not in labels:
            warnings.append(
                f"{ex.source}: warning: answer {_quote(answer)} is not one of the training file's labels; "
                "add examples of it to the training file, or fix the label"
            )


def _quote(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return '"' + (text if len(text) <= limit else text[: limit - 1] + "…") + '"'


# ----------------------------------------------------------------------------------------------------
# Token counts through a chat template, and the report as tables


def chat_template_renderer(tokenizer) -> Callable[[Example], list[int]] | None:
    """Example -> token ids with the tokenizer's chat template (None if it has none), for total lengths.

    Completion and text rows are the plain text plus EOS; a preference pair counts its longer answer (after its
    chat turns, through the template, for a chat-form pair). `check` counts pairs with `pair_token_counter`."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(ex: Example) -> list[int]:
        if ex.kind == "chat" or ex.is_chat_pair:
            messages = [{"role": m.role, "content": m.content} for m in ex.messages]
            if ex.is_chat_pair:
                longer = max(ex.chosen or "", ex.rejected or "", key=lambda a: len(ids(a)))
                messages.append({"role": "assistant", "content": longer})
            return ids(tokenizer.apply_chat_template(messages, tokenize=False))
        if ex.kind == "preference":
            return ids(ex.prompt or "") + max(ids(ex.chosen or ""), ids(ex.rejected or ""), key=len) + eos
        text = (ex.prompt or "") + (ex.completion or "") if ex.kind == "completion" else (ex.text or "")
        return ids(text) + eos

    return render


def pair_token_counter(renderer) -> Callable[[Example], tuple[int, int, int]]:
    """A preference pair -> its (prompt, chosen, rejected) token counts exactly as training encodes it
    (`templates.Renderer.encode_pair`, uncut): a plain pair like completion rows, a chat-form pair through the chat
    template (the prompt turns, then each answer as the next assistant turn)."""

    def count(ex: Example) -> tuple[int, int, int]:
        pair = renderer.encode_pair(ex)
        return len(pair.prompt), len(pair.chosen), len(pair.rejected)

    return count
