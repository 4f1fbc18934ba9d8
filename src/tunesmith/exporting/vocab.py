"""The tokenizer of a model as GGUF metadata, the way llama.cpp's convert_hf_to_gguf.py writes it.

Two tokenizer families are written:
- byte-level BPE (GPT-2 style, e.g. SmolLM2, Llama 3, Qwen): `tokenizer.ggml.model = "gpt2"` with the tokens,
  their types, the merges and `tokenizer.ggml.pre`, the name of the pre-tokenizer llama.cpp must use;
- SentencePiece-style BPE with byte fallback (Llama 2, Gemma): `tokenizer.ggml.model = "llama"` with tokens,
  scores and types. Our models carry a `tokenizer.json` (no `tokenizer.model`), so the scores are rebuilt from
  the merges: llama.cpp's SentencePiece tokenizer merges the pair whose result has the highest score, and a
  BPE applies merges in rank order, so score = -rank of the first merge that makes the token gives the same
  merge order.

The pre-tokenizer name comes from llama.cpp's own rule: tokenize a fixed check string and look the sha256 of
the ids up in a table (a subset of `get_vocab_base_pre` in convert_hf_to_gguf.py; an unknown hash gets
"default" and a warning, as a missing entry there would).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from hashlib import sha256

from tunesmith.errors import ModelError

# llama.cpp's check string (convert_hf_to_gguf.py, get_vocab_base_pre): it exercises whitespace runs, emoji,
# digits, scripts and contractions, where pre-tokenizers differ.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids of CHECK_TEXT)) -> llama.cpp pre-tokenizer name (from convert_hf_to_gguf.py)
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class GGUFVocab:
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot -> id
    add_bos: bool = False
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        adders = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
            "eot": writer.add_eot_token_id,
        }
        for kind, token_id in self.special.items():
            adders[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(False)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def build_vocab(tokenizer, vocab_size: int, chat_template: str | None, add_bos: bool, stop_ids: list[int]) -> GGUFVocab:
    """The GGUF vocabulary of a Hugging Face fast tokenizer, padded to the model's `vocab_size` rows."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"GGUF export needs a fast tokenizer (tokenizer.json); {type(tokenizer).__name__} has none")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(
            f"GGUF export supports BPE tokenizers (byte-level like GPT-2/SmolLM2, or SentencePiece-style like "
            f"Llama 2/Gemma); this tokenizer's model is {model.get('type')!r}"
        )
    byte_level = _is_byte_level(spec)
    if not byte_level and not model.get("byte_fallback"):
        raise ModelError(
            "GGUF export: this BPE tokenizer is neither byte-level (GPT-2 style) nor SentencePiece-style with "
            "byte fallback, and llama.cpp has no vocabulary type for it"
        )

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ModelError(
            f"the tokenizer has token ids up to {max(vocab.values())} but the model has only {vocab_size} "
            "embedding rows; the tokenizer does not belong to this model"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    T = gguf.TokenType
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(T.CONTROL if added[token].special else T.USER_DEFINED)
        elif not byte_level and _BYTE_TOKEN.fullmatch(token):
            tokens.append(token)
            types.append(T.BYTE)
        else:
            tokens.append(token)
            types.append(T.NORMAL)
    if not byte_level:
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = T.UNKNOWN

    special = {
        kind: token_id
        for kind, token_id in (
            ("bos", tokenizer.bos_token_id),
            ("eos", tokenizer.eos_token_id),
            ("unk", tokenizer.unk_token_id),
            ("pad", tokenizer.pad_token_id),
        )
        if token_id is not None
    }
    end_of_turn = [i for i in stop_ids if i != tokenizer.eos_token_id]
    if end_of_turn:
        special["eot"] = end_of_turn[0]

    warnings: list[str] = []
    if byte_level:
        digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
        pre = KNOWN_PRE_TOKENIZERS.get(digest)
        if pre is None:
            pre = "default"
            warnings.append(
                f"llama.cpp pre-tokenizer not recognised (check hash {digest[:16]}...); wrote 'default', so "
                "llama.cpp may split some text differently from this tokenizer"
            )
        return GGUFVocab(
            "gpt2", pre, tokens, [int(t) for t in types], None, merges, special, add_bos, chat_template, warnings
        )

    scores = _scores_from_merges(tokens, merges)
    return GGUFVocab(
        "llama", "default", tokens, [int(t) for t in types], scores, [], special, add_bos, chat_template, warnings
    )


def _is_byte_level(spec: dict) -> bool:
    def kinds(node) -> list[str]:
        if not node:
            return []
        inner = node.get("pretokenizers") or node.get("decoders") or []
        return [node.get("type", "")] + [k for n in inner for k in kinds(n)]

    return "ByteLevel" in kinds(spec.get("pre_tokenizer")) or "ByteLevel" in kinds(spec.get("decoder"))


def _scores_from_merges(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that make llama.cpp merge in the BPE's rank order (see the module docstring)."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, r)
    # a token no merge makes (single characters, bytes, specials) is never the result of a BPE merge: lowest score
    lowest = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else lowest for t in tokens]
