"""Build the debian-docs corpus: Debian manuals converted to plain-text passages for continued pretraining.

Usage (on Debian 12 "bookworm", where apt can download the pinned package versions):

    python data/debian-docs/build.py [--cache DIR] [--out DIR]

Steps: download four documentation packages at pinned versions (`apt-get download`), unpack them with
`dpkg-deb -x`, check the sha256 of each source file, convert it to plain text, cut it into documents (one per
chapter or HTML page), cut each document into passages of about 150-400 words at paragraph boundaries, assign
whole documents to train / validation / test, and write train.jsonl, validation.jsonl, test.jsonl
({"id", "text"} rows, kind text), documents.json (every document, its source file, package, licence and split)
and copyright/ (each package's Debian copyright file and the GPL-2 text they refer to).
Nothing here is random except the document split, which uses a fixed seed, so a rebuild gives identical files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import random
import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent

# package, version, file inside the package, format, title, licence, sha256 of the file as shipped
SOURCES = [
    {
        "key": "policy",
        "package": "debian-policy",
        "version": "4.6.2.0",
        "files": ["usr/share/doc/debian-policy/policy.txt.gz"],
        "format": "sphinx-text",
        "title": "Debian Policy Manual",
        "licence": "GPL-2+",
    },
    {
        "key": "devref",
        "package": "developers-reference",
        "version": "12.18",
        "files": ["usr/share/developers-reference/developers-reference.txt.gz"],
        "format": "sphinx-text",
        "title": "Debian Developer's Reference",
        "licence": "GPL-2+",
    },
    {
        "key": "debref",
        "package": "debian-reference-en",
        "version": "2.100",
        "files": ["usr/share/debian-reference/debian-reference.en.txt.gz"],
        "format": "docbook-text",
        "title": "Debian Reference",
        "licence": "GPL-2+",
    },
    {
        "key": "maint",
        "package": "maint-guide",
        "version": "1.2.53",
        "files": [
            f"usr/share/doc/maint-guide/html/{page}.en.html"
            for page in (
                "start",
                "first",
                "modify",
                "dreq",
                "dother",
                "build",
                "checkit",
                "upload",
                "update",
                "advanced",
            )
        ],
        "format": "docbook-html",
        "title": "Debian New Maintainers' Guide",
        "licence": "GPL-2+",
    },
]

MIN_WORDS, MAX_WORDS, MAX_BLOCK = 150, 400, 250
# Token budget per passage with the default model's tokenizer (SmolLM2): rows must fit data.max_length 512 with
# BOS and EOS, also on the 512-position test model, without truncation.
TOKENIZER_MODEL, MAX_TOKENS, MAX_BLOCK_TOKENS = "smollm2-135m-instruct", 480, 300
_TOKENIZER = None


def n_tokens(text: str) -> int:
    return len(_TOKENIZER(text, add_special_tokens=False)["input_ids"])


def load_tokenizer() -> None:
    global _TOKENIZER
    try:
        from transformers import AutoTokenizer

        from tunesmith.models import resolve

        _TOKENIZER = AutoTokenizer.from_pretrained(resolve(TOKENIZER_MODEL))
    except Exception as err:  # noqa: BLE001 - any failure means the same thing here
        raise BuildError(
            f"could not load the {TOKENIZER_MODEL} tokenizer to size passages ({err}); run this "
            "with the tunesmith virtual environment's python"
        ) from err


SPLIT_SEED = 6
TARGET = {"test": (150, 200), "validation": (55, 75)}  # passages per held-out split (min, max)


class BuildError(Exception):
    pass


# ---- fetching ------------------------------------------------------------------------------------------------


def fetch(source: dict, cache: Path) -> Path:
    """Unpack the pinned package into cache/<package>_<version>/ (downloading it once) and return that dir."""
    root = cache / f"{source['package']}_{source['version']}"
    if (root / ".done").exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    debs = list(cache.glob(f"{source['package']}_{source['version']}_*.deb"))
    if not debs:
        spec = f"{source['package']}={source['version']}"
        print(f"downloading {spec}", file=sys.stderr)
        try:
            subprocess.run(["apt-get", "download", "-q", spec], cwd=cache, check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            raise BuildError(
                f"could not download {spec} ({err}); run this on Debian 12 after `apt-get update`, or put the "
                f".deb file in {cache}"
            ) from err
        debs = list(cache.glob(f"{source['package']}_{source['version']}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    (root / ".done").write_text("ok\n")
    return root


def read_source(root: Path, member: str) -> str:
    path = root / member
    if not path.exists():
        raise BuildError(f"{path} is missing from the package")
    data = path.read_bytes()
    if member.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8").replace("\u00a0", " ").replace("\r\n", "\n")


def sha256(root: Path, member: str) -> str:
    return hashlib.sha256((root / member).read_bytes()).hexdigest()


# ---- blocks: paragraphs and headings -------------------------------------------------------------------------


@dataclass
class Block:
    text: str
    heading: bool = False

    @property
    def words(self) -> int:
        return len(self.text.split())

    @property
    def tokens(self) -> int:
        return n_tokens(self.text) + 2  # + the blank line that joins it to the next block


@dataclass
class Document:
    source: dict
    file: str
    number: int
    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def doc_id(self) -> str:
        return f"{self.source['key']}-{self.number:02d}"


BULLET = re.compile(r"^(\*|-|\+|•|\d+\.|[a-z]\.|\(\d+\))\s+")
CODEY = re.compile(r"^(\$ |# |> |\[|/|\||\+-)")


def is_table(lines: list[str]) -> bool:
    table = sum(1 for ln in lines if ln.lstrip().startswith(("+-", "|", "+=")))
    return table >= max(2, len(lines) // 2)


def tidy(lines: list[str]) -> str | None:
    """One paragraph as text: dedented; prose and bullet items reflowed to one line; code kept as is."""
    lines = [ln.rstrip() for ln in lines]
    if not any(ln.strip() for ln in lines) or is_table(lines):
        return None
    text = textwrap.dedent("\n".join(lines)).strip("\n")
    lines = text.split("\n")
    if any(CODEY.match(ln.strip()) for ln in lines):
        return text
    indents = {len(ln) - len(ln.lstrip()) for ln in lines[1:] if ln.strip()}
    first_indent = len(lines[0]) - len(lines[0].lstrip())
    bullet = BULLET.match(lines[0].strip())
    if bullet and indents and min(indents) > first_indent:  # a list item with hanging indent
        return join_lines(lines)
    if not indents or indents == {first_indent}:
        long_lines = sum(1 for ln in lines[:-1] if len(ln.strip()) >= 40)
        if len(lines) == 1 or long_lines >= 0.8 * (len(lines) - 1):
            return join_lines(lines)
    return text


def join_lines(lines: list[str]) -> str:
    """Reflow wrapped lines; a line that the renderer broke after a hyphen or a slash
    ("Build-" / "Depends", "/usr/share/doc/" / "aptitude") is joined without a space."""
    out = ""
    for ln in (ln.strip() for ln in lines):
        if out and re.search(r"\w[-/]$", out):
            out += ln
        else:
            out = f"{out} {ln}" if out else ln
    return out


def paragraphs(lines: list[str]) -> list[list[str]]:
    out, cur = [], []
    for ln in lines:
        if ln.strip():
            cur.append(ln)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


UNDERLINE = re.compile(r"^([*=\-~^\"#+])\1{2,}$")


def sphinx_documents(source: dict, member: str, text: str) -> list[Document]:
    """Sphinx text builder output: chapters are titles underlined with '*'; sections with = - ~ ^."""
    lines = text.split("\n")
    heads = [
        i
        for i in range(1, len(lines))
        if UNDERLINE.match(lines[i]) and lines[i - 1].strip() and len(lines[i]) == len(lines[i - 1].rstrip())
    ]
    chapters = [i - 1 for i in heads if lines[i][0] == "*" and re.match(r"^(\d+|[A-Z])\.\s", lines[i - 1])]
    docs = []
    for n, start in enumerate(chapters):
        end = chapters[n + 1] if n + 1 < len(chapters) else len(lines)
        body = lines[start:end]
        doc = Document(source, member, n + 1, body[0].strip())
        skip = {0, 1}
        sub = {i - start - 1 for i in heads if start < i - 1 < end} | {i - start for i in heads if start < i < end}
        blocks: list[list[str]] = []
        cur: list[str] = []
        for i, ln in enumerate(body):
            if i in skip:
                continue
            if i in sub:  # a heading line or its underline
                if not UNDERLINE.match(ln):
                    if cur:
                        blocks += paragraphs(cur)
                        cur = []
                    blocks.append(["\x00" + ln.strip()])
                continue
            cur.append(ln)
        blocks += paragraphs(cur)
        doc.blocks = to_blocks(blocks)
        docs.append(doc)
    return docs


def docbook_text_documents(source: dict, member: str, text: str) -> list[Document]:
    """Debian Reference's text rendering: body indented, headings at column 0, 'Chapter N.' starts a chapter."""
    lines = text.split("\n")
    starts = [i for i, ln in enumerate(lines) if re.match(r"^(Chapter \d+|Appendix [A-Z])\. ", ln)]
    docs = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        body = lines[start + 1 : end]
        doc = Document(source, member, n + 1, lines[start].strip())
        blocks: list[list[str]] = []
        cur: list[str] = []
        for ln in body:
            if ln.strip() and not ln.startswith(" "):
                if cur:
                    blocks += paragraphs(cur)
                    cur = []
                blocks.append(["\x00" + ln.strip()])
            else:
                cur.append(ln)
        blocks += paragraphs(cur)
        # tables are dropped (see tidy), and so are their captions, which may wrap over two lines
        blocks = [b for b in blocks if not re.match(r"^\s+(Table|Figure) \d+\.\d+\. ", b[0])]
        doc.blocks = to_blocks(blocks)
        docs.append(doc)
    return docs


class _HTMLText(html.parser.HTMLParser):
    """DocBook XHTML to paragraphs: block elements break paragraphs, <pre> keeps its lines, nav and footnote
    markers are skipped."""

    BLOCK = {"p", "li", "dt", "dd", "pre", "h1", "h2", "h3", "h4", "h5", "div", "tr", "table", "blockquote"}
    HEAD = {"h1", "h2", "h3", "h4", "h5"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[list[str]] = []
        self.cur: list[str] = []
        self.pre = 0
        self.skip = 0
        self.stack: list[tuple[str, bool]] = []
        self.heading = False

    def flush(self) -> None:
        text = "".join(self.cur)
        self.cur = []
        if not text.strip():
            return
        if self.pre:
            self.blocks.append(text.strip("\n").split("\n"))
        else:
            words = " ".join(text.split())
            self.blocks.append([("\x00" if self.heading else "") + words])

    def handle_starttag(self, tag, attrs):
        cls = dict(attrs).get("class") or ""
        skipping = tag in ("script", "style") or any(c in cls.split() for c in ("navheader", "navfooter", "toc"))
        if tag == "sup" or (tag == "a" and "footnote" in cls):
            skipping = True
        if tag in ("br", "hr", "img", "meta", "link", "col", "input"):
            return
        self.stack.append((tag, skipping))
        if skipping:
            self.skip += 1
        if self.skip:
            return
        if tag in self.BLOCK:
            self.flush()
            self.heading = tag in self.HEAD
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag):
        while self.stack:
            name, skipping = self.stack.pop()
            if skipping:
                self.skip -= 1
            elif not self.skip:
                if name in self.BLOCK:
                    self.flush()
                    self.heading = False
                if name == "pre":
                    self.pre -= 1
            if name == tag:
                break

    def handle_data(self, data):
        if not self.skip:
            self.cur.append(data)


def docbook_html_documents(source: dict, root: Path) -> list[Document]:
    docs = []
    for n, member in enumerate(source["files"]):
        parser = _HTMLText()
        parser.feed(read_source(root, member))
        parser.close()
        parser.flush()
        blocks = parser.blocks
        title_i = next(i for i, b in enumerate(blocks) if b[0].startswith("\x00"))
        title = blocks[title_i][0][1:]
        blocks = blocks[title_i + 1 :]
        # the guide's footnotes are listed at the end of each page; the markers in the text were skipped
        doc = Document(source, member, n + 1, title)
        doc.blocks = to_blocks(blocks)
        docs.append(doc)
    return docs


def to_blocks(raw: list[list[str]]) -> list[Block]:
    out = []
    for lines in raw:
        if lines[0].startswith("\x00"):
            title = lines[0][1:].strip()
            if title:
                out.append(Block(title, heading=True))
            continue
        text = tidy(lines)
        if text:
            out.append(Block(text))
    return out


# ---- passages ------------------------------------------------------------------------------------------------


def split_block(block: Block) -> list[Block]:
    """A paragraph over MAX_BLOCK words or MAX_BLOCK_TOKENS tokens, cut at line ends (code, lists) or sentence
    ends (prose)."""
    if block.words <= MAX_BLOCK and block.tokens <= MAX_BLOCK_TOKENS:
        return [block]
    units = block.text.split("\n") if "\n" in block.text else re.split(r"(?<=[.!?:;])\s+", block.text)
    joiner = "\n" if "\n" in block.text else " "
    pieces, cur, n, t = [], [], 0, 0
    for unit in units:
        w, u = len(unit.split()), n_tokens(unit) + 1
        if cur and (n + w > MAX_BLOCK or t + u > MAX_BLOCK_TOKENS):
            pieces.append(Block(joiner.join(cur)))
            cur, n, t = [], 0, 0
        if w > MAX_BLOCK or u > MAX_BLOCK_TOKENS:  # one enormous line or sentence: cut by words
            words = unit.split()
            step = max(1, min(MAX_BLOCK, len(words) * MAX_BLOCK_TOKENS // (2 * u)))
            for k in range(0, len(words), step):
                pieces.append(Block(" ".join(words[k : k + step])))
            continue
        cur.append(unit)
        n += w
        t += u
    if cur:
        pieces.append(Block(joiner.join(cur)))
    return pieces


def passages(doc: Document) -> list[str]:
    blocks = [piece for b in doc.blocks for piece in split_block(b)]
    out: list[list[Block]] = []
    cur: list[Block] = []
    words = tokens = 0

    def body_words(bs: list[Block]) -> int:
        return sum(b.words for b in bs)

    def body_tokens(bs: list[Block]) -> int:
        return sum(b.tokens for b in bs)

    for b in blocks:
        full = words + b.words > MAX_WORDS or tokens + b.tokens > MAX_TOKENS
        if cur and ((b.heading and words >= MIN_WORDS) or full):
            carry: list[Block] = []
            while cur and cur[-1].heading:  # never end a passage with a heading: it opens the next one
                carry.insert(0, cur.pop())
            if cur:
                out.append(cur)
            cur, words, tokens = carry, body_words(carry), body_tokens(carry)
        cur.append(b)
        words += b.words
        tokens += b.tokens
    while cur and cur[-1].heading:
        cur.pop()
    if cur:
        short = body_words(cur) < MIN_WORDS
        if (
            out
            and short
            and body_words(out[-1]) + body_words(cur) <= MAX_WORDS + 50
            and body_tokens(out[-1]) + body_tokens(cur) <= MAX_TOKENS
        ):
            out[-1] += cur
        elif body_words(cur) >= 50:
            out.append(cur)
    texts = ["\n\n".join(b.text for b in group) for group in out if body_words(group) >= 50]
    for text in texts:
        if n_tokens(text) > MAX_TOKENS + 20:
            raise BuildError(f"{doc.doc_id}: a passage has {n_tokens(text)} tokens, over the budget")
    return texts


# ---- splits --------------------------------------------------------------------------------------------------


def assign_splits(docs: list[tuple[Document, list[str]]]) -> tuple[dict[str, str], int]:
    """Whole documents to test / validation / train. Try seeds from SPLIT_SEED upwards until the held-out
    splits land inside TARGET, the test split holds at least 8 chapters from at least three of the four manuals
    and validation at least 4 chapters."""
    for seed in range(SPLIT_SEED, SPLIT_SEED + 1000):
        order = list(docs)
        random.Random(seed).shuffle(order)
        split: dict[str, str] = {}
        counts = {"test": 0, "validation": 0}
        for doc, ps in order:
            for name in ("test", "validation"):
                if counts[name] < TARGET[name][0]:
                    split[doc.doc_id] = name
                    counts[name] += len(ps)
                    break
            else:
                split[doc.doc_id] = "train"
        ok = all(TARGET[n][0] <= counts[n] <= TARGET[n][1] for n in counts)
        test_docs = [d for d, _ in docs if split[d.doc_id] == "test"]
        val_docs = [d for d, _ in docs if split[d.doc_id] == "validation"]
        if ok and len({d.source["key"] for d in test_docs}) >= 3 and len(test_docs) >= 8 and len(val_docs) >= 4:
            return split, seed
    raise BuildError("no document split reaches the target sizes; adjust TARGET")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "debian-docs-cache",
        help="where the .deb files are downloaded and unpacked",
    )
    ap.add_argument("--out", type=Path, default=HERE, help="output directory (default: next to this script)")
    args = ap.parse_args(argv)
    load_tokenizer()
    expected = (
        json.loads((HERE / "documents.json").read_text())["sources"] if (HERE / "documents.json").exists() else {}
    )
    docs: list[tuple[Document, list[str]]] = []
    sources_out = {}
    for source in SOURCES:
        root = fetch(source, args.cache)
        hashes = {m: sha256(root, m) for m in source["files"]}
        old = expected.get(source["key"], {}).get("sha256", {})
        for m, h in hashes.items():
            if old.get(m) and old[m] != h:
                raise BuildError(f"{source['package']} {m}: sha256 {h} differs from documents.json ({old[m]})")
        sources_out[source["key"]] = {k: source[k] for k in ("package", "version", "title", "licence", "files")}
        sources_out[source["key"]]["sha256"] = hashes
        copyright_file = root / "usr/share/doc" / source["package"] / "copyright"
        (args.out / "copyright").mkdir(parents=True, exist_ok=True)
        (args.out / "copyright" / source["package"]).write_bytes(copyright_file.read_bytes())
        if source["format"] == "sphinx-text":
            found = sphinx_documents(source, source["files"][0], read_source(root, source["files"][0]))
        elif source["format"] == "docbook-text":
            found = docbook_text_documents(source, source["files"][0], read_source(root, source["files"][0]))
        else:
            found = docbook_html_documents(source, root)
        if not found:
            raise BuildError(f"{source['package']}: no chapters found; has the file's format changed?")
        for doc in found:
            ps = passages(doc)
            if ps:
                docs.append((doc, ps))
    split, seed = assign_splits(docs)
    rows: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    documents = []
    for doc, ps in docs:
        name = split[doc.doc_id]
        for k, text in enumerate(ps, 1):
            rows[name].append({"id": f"{doc.doc_id}-{k:03d}", "text": text})
        documents.append(
            {
                "id": doc.doc_id,
                "title": doc.title,
                "source": doc.source["key"],
                "package": doc.source["package"],
                "version": doc.source["version"],
                "file": doc.file,
                "licence": doc.source["licence"],
                "split": name,
                "passages": len(ps),
                "words": sum(len(p.split()) for p in ps),
            }
        )
    gpl = Path("/usr/share/common-licenses/GPL-2")
    if gpl.exists():
        (args.out / "copyright" / "GPL-2").write_bytes(gpl.read_bytes())
    for name, rs in rows.items():
        tmp = args.out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs), encoding="utf-8")
        tmp.replace(args.out / f"{name}.jsonl")
        words = [len(r["text"].split()) for r in rs]
        print(
            f"{name}: {len(rs)} passages from {sum(1 for d in documents if d['split'] == name)} documents, "
            f"words min {min(words)} / mean {sum(words) / len(words):.0f} / max {max(words)}"
        )
    manifest = {"sources": sources_out, "split_seed": seed, "documents": documents}
    tmp = args.out / ".documents.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(args.out / "documents.json")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
