"""Rendering examples to token ids with exact loss masks.

`Renderer.encode(example)` returns `Encoded(input_ids, labels)`. Labels are *unshifted* (Hugging Face
convention): `labels[i]` is `input_ids[i]` where token i is trained and -100 elsewhere; the loss code
shifts them. What is trained, per kind:

- chat: every assistant message whose weight is not 0 (OpenAI semantics), rendered with the model's own
  chat template (or a built-in / user template). The trained tokens are what the model has to generate
  after the template's generation prompt: the content plus the end-of-turn token (`<|im_end|>`,
  `<|eot_id|>`, `<end_of_turn>`, ...) and EOS where the template writes one there, so the model learns to
  stop. Formatting whitespace after the end-of-turn token (ChatML's "\\n") is not trained: generation stops
  before it. The template's text is tokenized once, as a whole, with `add_special_tokens=False` (as
  `apply_chat_template(tokenize=True)` does), so the ids are exactly those the model sees at inference.
- completion: [BOS] + tokens(prompt) + tokens(completion) + [EOS]; loss on completion + EOS. The prompt is
  taken as is: no separator is inserted (put one at the end of your prompts if you want one). Prompt and
  completion are tokenized separately, as at inference, where the prompt is tokenized alone.
- text: [BOS] + tokens(text) + [EOS]; loss on every token but BOS.
- preference: `encode_pair` (encode() refuses a pair). Each answer is encoded as if it were the whole example:
  a chat pair as its prompt turns plus the answer as the next assistant turn (trained like a chat example's
  final turn), a raw-text pair like a completion row (prompt, answer, EOS). The tokens the two sequences share
  before their first trained token are the pair's prompt (`EncodedPair.prompt`), fed once; the rest of each
  sequence, up to its last trained token, is its answer.

BOS: the template writes BOS where it wants it (Llama 3 and Gemma templates write `bos_token`). When the
tokenizer adds a BOS to plain text (`tokenizer("x")` starts with bos_token_id) and a rendered chat does not
begin with it, the BOS id is prepended, in `encode` and `prompt_ids` alike: the model was pretrained with
it. For completion and text kinds BOS is added exactly when the tokenizer adds one (SmolLM2's tokenizer
names `<|im_start|>` as its bos_token but never adds it, so it gets none).

How assistant spans are found: incremental rendering. For assistant message i the template renders
messages[:i] with the generation prompt, and messages[:i+1] without; the span is the difference. This
needs the "prefix property" (rendering more messages only appends text); templates that rewrite earlier
turns (e.g. dropping reasoning from past turns) break it and get a clear error naming the template.
Tokens are then labelled from their character offsets: a token is trained if it overlaps a trained span.
A tokenizer without offsets (not a "fast" tokenizer) falls back to tokenizing prefixes of the text and
comparing them with the full tokenization; this is slower and exact only where tokens do not straddle a
span boundary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tunesmith.data.example import Example, Message
from tunesmith.errors import ConfigError, DataError

IGNORE = -100
RENDER_MEMO = 64  # rendered conversations a Renderer remembers (Renderer._render)

# Built-in templates, for models without one (base models) or to override a model's own.
# In each, the generation prompt is exactly the text that starts an assistant turn, so spans are exact.
FALLBACK_TEMPLATES: dict[str, str] = {
    # ChatML (Qwen, SmolLM, ...), without any default system message.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3 / 3.1 chat format (without the date preamble of 3.1's own template).
    "llama3": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Gemma 2/3: no system role (system text is put at the top of the first user turn), assistant is "model".
    "gemma": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% if messages and messages[0]['role'] == 'system' %}"
        "{% set first_user_prefix = messages[0]['content'] | trim + '\\n\\n' %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '')"
        " + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    # For base models whose vocabulary has no chat tokens: plain-text headers, EOS ends an assistant turn.
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Assistant:\\n' + message['content'] + (eos_token or '') + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
    ),
}

# End-of-turn markers of common templates, recognised when they appear in a template's text.
_KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; the token id where the token is trained, -100 elsewhere (unshifted)."""
    truncated: bool = False

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodedPair:
    """A preference pair as token ids: the shared prompt, then each answer (input ids up to and including its last
    trained token, with its labels: the id where trained, -100 elsewhere). Sequence i of the pair is
    prompt + answer_i; an answer's first token is predicted from the prompt's last position."""

    prompt: list[int]
    chosen: list[int]
    chosen_labels: list[int]
    rejected: list[int]
    rejected_labels: list[int]
    truncated: bool = False
    """An answer was cut to fit data.max_length."""
    source: str = ""

    @property
    def n_label_tokens(self) -> int:
        return sum(t != IGNORE for t in self.chosen_labels) + sum(t != IGNORE for t in self.rejected_labels)

    @property
    def tokens(self) -> int:
        """Tokens of the two sequences a user asks to train on (the prompt counted in each)."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def fed(self) -> int:
        """Tokens fed when the prompt is shared: prompt + both answers."""
        return len(self.prompt) + len(self.chosen) + len(self.rejected)

    def __len__(self) -> int:
        return self.fed


class TooLong(DataError):
    """An example is longer than max_length and truncation is "drop" or "error".

    With "drop" the caller catches this to count (and skip) the example; `length` is its token count."""

    def __init__(self, message: str, *, length: int, max_length: int, source: str = ""):
        super().__init__(message)
        self.length = length
        self.max_length = max_length
        self.source = source


class Renderer:
    """Renders examples for one tokenizer and chat template. See the module docstring for what is trained."""

    def __init__(
        self, tokenizer, chat_template: str | None = None, system_prompt: str | None = None, raw_prompts: bool = False
    ):
        """raw_prompts: the model was trained on raw prompt/completion or text rows, so a prompt is given to it as
        raw text (tokenizer BOS rules), not through the chat template (run_dir.RunDir.raw_prompts says which)."""
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.raw_prompts = raw_prompts
        self.chat_template, self.template_name = _resolve_template(tokenizer, chat_template)
        self.has_offsets = bool(getattr(tokenizer, "is_fast", False))
        self.bos_token_id: int | None = tokenizer.bos_token_id
        self.eos_token_id: int | None = tokenizer.eos_token_id
        self.adds_bos = self._tokenizer_adds_bos()
        self._rendered: dict[tuple[bool, str], str] = {}  # _render's and _tokenize's recent results (see there)
        self._tokenized: dict[str, tuple[int, ...]] = {}
        self.stop_strings = self._find_stop_strings()

    # ---- public API -------------------------------------------------------------------------------------

    def encode(self, example: Example, max_length: int | None = None, truncation: str = "truncate") -> Encoded:
        if truncation not in ("truncate", "drop", "error"):
            raise ValueError(f"truncation must be truncate, drop or error, not {truncation!r}")
        if example.kind == "chat":
            ids, labels = self._encode_chat(example)
        elif example.kind == "completion":
            ids, labels = self._encode_completion(example)
        elif example.kind == "text":
            ids, labels = self._encode_text(example)
        elif example.kind == "preference":
            raise DataError(
                f"{_where(example)}a preference pair (prompt/chosen/rejected) is trained with train.objective dpo, "
                "orpo or simpo (Renderer.encode_pair), not as one example"
            )
        else:
            raise DataError(f"{_where(example)}unknown example kind {example.kind!r}")
        return _fit(ids, labels, example, max_length, truncation)

    def encode_pair(self, example: Example, max_length: int | None = None, truncation: str = "truncate") -> EncodedPair:
        """A preference pair's token ids (see EncodedPair). Longer than max_length (prompt + the longer answer):
        "truncate" cuts the answers' ends (`truncated` says so; the caller reports which pairs); a prompt that
        leaves no room for an answer token, or "drop" / "error", raises TooLong."""
        if example.kind != "preference":
            raise DataError(f"{_where(example)}encode_pair needs a preference pair, not a {example.kind} example")
        seqs = []
        for answer in (example.chosen or "", example.rejected or ""):
            if example.is_chat_pair:
                # the prompt's own assistant turns are context, never trained: only the answer is
                context = [Message(m.role, m.content, 0 if m.role == "assistant" else None) for m in example.messages]
                turn = Example("chat", [*context, Message("assistant", answer)], source=example.source)
                ids, labels = self._encode_chat(turn)
            else:
                part = Example("completion", prompt=example.prompt, completion=answer, source=example.source)
                ids, labels = self._encode_completion(part)
            last = max((p for p, t in enumerate(labels) if t != IGNORE), default=-1)
            first = next((p for p, t in enumerate(labels) if t != IGNORE), len(labels))
            seqs.append((ids[: last + 1], labels[: last + 1], first))
        (c_ids, c_lab, c_first), (r_ids, r_lab, r_first) = seqs
        n = min(c_first, r_first, _common_prefix(c_ids, r_ids))
        if n == 0:
            raise DataError(
                f"{_where(example)}the pair has an empty prompt (no token before the answers); give it a prompt"
            )
        pair = EncodedPair(c_ids[:n], c_ids[n:], c_lab[n:], r_ids[n:], r_lab[n:], source=example.source)
        return _fit_pair(pair, example, max_length, truncation)

    def prompt_text(self, messages: list[Message] | list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered as the model is given it to write the next assistant turn.

        Feed it to the model through `prompt_ids`, not `tokenizer(text)`: that would add a second BOS where
        the template writes one."""
        return self._render(self._with_system(_as_dicts(messages)), add_generation_prompt)

    def prompt_ids(self, messages: list[Message] | list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `prompt_text`, tokenized exactly as `encode` tokenizes training conversations."""
        text = self.prompt_text(messages, add_generation_prompt)
        return self._with_bos(self._tokenize(text), text)

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS and the template's end-of-turn token(s) that are single tokens, for stopping generation.

        A marker that is several tokens in this vocabulary (ChatML on a base model) is only in
        `stop_strings`, which transformers' generate() accepts as `stop_strings=` with `tokenizer=`."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        for s in self.stop_strings:
            tid = self._single_token_id(s)
            if tid is not None and tid not in ids:
                ids.append(tid)
        return ids

    # ---- kinds -------------------------------------------------------------------------------------------

    def _encode_chat(self, example: Example) -> tuple[list[int], list[int]]:
        messages = self._with_system(_as_dicts(example.messages))
        trained = [m.trained for m in example.messages]
        if len(messages) > len(example.messages):  # a system message was put first
            trained = [False, *trained]
        text, spans = self._assistant_spans(messages, trained, example)
        if self.has_offsets:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            mask = _mask_from_offsets(enc["offset_mapping"], spans)
        else:
            ids = self._tokenize(text)
            mask = self._mask_from_prefixes(text, ids, spans)
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        if self._needs_bos(text):
            ids, labels = [self.bos_token_id, *ids], [IGNORE, *labels]
        return ids, labels

    def _encode_completion(self, example: Example) -> tuple[list[int], list[int]]:
        prompt = self._tokenize(example.prompt or "")
        completion = self._tokenize(example.completion or "") + [self._eos(example)]
        bos = [self.bos_token_id] if self.adds_bos else []
        ids = bos + prompt + completion
        return ids, [IGNORE] * (len(bos) + len(prompt)) + completion

    def _encode_text(self, example: Example) -> tuple[list[int], list[int]]:
        body = self._tokenize(example.text or "") + [self._eos(example)]
        if self.adds_bos:
            return [self.bos_token_id, *body], [IGNORE, *body]
        return body, list(body)

    # ---- chat spans ---------------------------------------------------------------------------------------

    def _assistant_spans(
        self, messages: list[dict], trained: list[bool], example: Example
    ) -> tuple[str, list[tuple[int, int]]]:
        """The full rendered text and the (start, end) character spans to train, in order."""
        full = self._render_checked(messages, False, example)
        spans = []
        for i, (_message, train) in enumerate(zip(messages, trained)):
            if not train:
                continue
            if i == 0:
                raise DataError(
                    f"{_where(example)}the conversation starts with an assistant message; "
                    "put a user (or system) message before it"
                )
            before = self._render_checked(messages[:i], True, example)
            after = full if i == len(messages) - 1 else self._render_checked(messages[: i + 1], False, example)
            if not (after.startswith(before) and full.startswith(after)):
                raise DataError(
                    f"{_where(example)}{self._template_desc()} does not render conversations incrementally "
                    f"(adding message {i + 1} changes the text before it), so its assistant tokens cannot be "
                    "located; set model.chat_template to a built-in template (chatml, llama3, gemma, plain) "
                    "or to Jinja text that only appends"
                )
            spans.append((len(before), len(before) + self._trained_length(after[len(before) :])))
        return full, spans

    def _trained_length(self, turn: str) -> int:
        """How much of an assistant turn's text is trained: all of it up to and including its end-of-turn
        marker; whitespace after the marker is formatting the model never generates (it stops first)."""
        stripped = turn.rstrip()
        if any(stripped.endswith(s) for s in self.stop_strings):
            return len(stripped)
        return len(turn)  # a template with no end marker: train everything it writes

    def _mask_from_prefixes(self, text: str, ids: list[int], spans: list[tuple[int, int]]) -> list[bool]:
        """Slow path for tokenizers without offsets: find, for each span edge, how many of the full text's
        tokens lie before it, by tokenizing the text up to the edge. Where the prefix tokenizes differently
        from the whole near the edge ("\\n\\n" as one token alone, two before a letter), the differing tail is
        measured by decoding. Same rule as with offsets: a token straddling an edge is trained."""
        mask = [False] * len(ids)
        for start, end in spans:
            a = self._tokens_before(text[:start], ids, straddling=False)
            b = self._tokens_before(text[:end], ids, straddling=True)
            for j in range(a, b):
                mask[j] = True
        return mask

    def _tokens_before(self, prefix: str, ids: list[int], straddling: bool) -> int:
        """How many of `ids` (the whole text's tokens) end within `prefix` (or, straddling=True, start in it)."""
        alone = self._tokenize(prefix)
        n = _common_prefix(alone, ids)
        rest = len(self.tokenizer.decode(alone[n:])) if n < len(alone) else 0
        k = n
        while k < len(ids):
            covered = len(self.tokenizer.decode(ids[n : k + 1]))
            if covered > rest and not (straddling and covered - len(self.tokenizer.decode(ids[k : k + 1])) < rest):
                break
            k += 1
        return k

    # ---- helpers -------------------------------------------------------------------------------------------

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text for `messages`. The last RENDER_MEMO results are remembered: label scoring renders
        the same prompt once per candidate label (and once more for its generation prompt), which with 8 retrieved
        shots was ~4% of `tunesmith eval`. A plain dict, emptied when full: safe to share between threads (at worst
        a text is rendered twice) and to pickle."""
        key = (add_generation_prompt, json.dumps(messages, ensure_ascii=False, sort_keys=True, default=repr))
        text = self._rendered.get(key)
        if text is None:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            if len(self._rendered) >= RENDER_MEMO:
                self._rendered.clear()
            self._rendered[key] = text
        return text

    def _render_checked(self, messages: list[dict], add_generation_prompt: bool, example: Example) -> str:
        try:
            return self._render(messages, add_generation_prompt)
        except Exception as e:  # jinja errors and the template's own raise_exception()
            raise DataError(f"{_where(example)}{self._template_desc()} cannot render this conversation: {e}") from e

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt is None or any(m.get("role") == "system" for m in messages):
            return messages
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def _tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added; the last RENDER_MEMO results remembered, as in _render
        (a scored prompt is tokenized once per candidate label)."""
        if not text:
            return []
        ids = self._tokenized.get(text)
        if ids is None:
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(self._tokenized) >= RENDER_MEMO:
                self._tokenized.clear()
            self._tokenized[text] = ids
        return list(ids)

    def _needs_bos(self, text: str) -> bool:
        return self.adds_bos and not text.startswith(self.tokenizer.bos_token)

    def _with_bos(self, ids: list[int], text: str) -> list[int]:
        return [self.bos_token_id, *ids] if self._needs_bos(text) else ids

    def _eos(self, example: Example) -> int:
        if self.eos_token_id is None:
            raise DataError(
                f"{_where(example)}the tokenizer has no EOS token, so a {example.kind} example cannot end with one; "
                "use a tokenizer that defines eos_token"
            )
        return self.eos_token_id

    def _tokenizer_adds_bos(self) -> bool:
        if self.bos_token_id is None:
            return False
        with_special = self.tokenizer("a")["input_ids"]
        without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        return with_special[:1] == [self.bos_token_id] and without[:1] != [self.bos_token_id]

    def _single_token_id(self, s: str) -> int | None:
        ids = self._tokenize(s)
        return ids[0] if len(ids) == 1 else None

    def _find_stop_strings(self) -> list[str]:
        """The strings that end an assistant turn: what the template writes after a probe answer (its
        end-of-turn marker, maybe EOS), the known markers in its text, and EOS."""
        found: list[str] = []
        probe = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "tunesmith-probe"}]
        try:
            before = self._render(probe[:1], True)
            after = self._render(probe, False)
            turn = after[len(before) :] if after.startswith(before) else ""
            if "tunesmith-probe" in turn:
                found += turn.split("tunesmith-probe", 1)[1].split()
        except Exception:
            pass  # a template that cannot render the probe: rely on the known markers
        found += [m for m in _KNOWN_END_OF_TURN if m in self.chat_template]
        if self.tokenizer.eos_token:
            found.append(self.tokenizer.eos_token)
        return list(dict.fromkeys(s for s in found if s))

    def _template_desc(self) -> str:
        if self.template_name == "model":
            return "the model's own chat template"
        if self.template_name in FALLBACK_TEMPLATES:
            return f"the built-in {self.template_name!r} chat template"
        return "the chat template given in model.chat_template"


def _resolve_template(tokenizer, chat_template: str | None) -> tuple[str, str]:
    """(Jinja text, name): name is "model", a FALLBACK_TEMPLATES key, or "custom"."""
    if chat_template is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # named templates: the default one is for plain chat
            own = own.get("default") or next(iter(own.values()), None)
        if own:
            return own, "model"
        return FALLBACK_TEMPLATES["chatml"], "chatml"
    if chat_template.strip() in FALLBACK_TEMPLATES:
        name = chat_template.strip()
        return FALLBACK_TEMPLATES[name], name
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template, "custom"
    raise ConfigError(
        f"model.chat_template: unknown template {chat_template!r}; expected one of "
        f"{', '.join(FALLBACK_TEMPLATES)} or Jinja text"
    )


def _as_dicts(messages: list[Message] | list[dict]) -> list[dict[str, Any]]:
    """Messages as the template sees them: role and content only (weight is ours, not the template's)."""
    out = []
    for m in messages:
        if isinstance(m, Message):
            out.append({"role": m.role, "content": m.content})
        else:
            out.append({k: v for k, v in m.items() if k != "weight"})
    return out


def _mask_from_offsets(offsets, spans: list[tuple[int, int]]) -> list[bool]:
    """True for each token whose characters overlap a span (spans sorted, disjoint). A token straddling a
    span's edge is trained: it carries text the model must produce."""
    mask = []
    k = 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:  # spans wholly before this token
            k += 1
        if k == len(spans):
            mask.append(False)
            continue
        s, e = spans[k]
        if start == end:  # zero-width token: trained if it sits inside the span
            mask.append(s <= start < e)
        else:
            mask.append(start < e and end > s)
    return mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _where(example: Example) -> str:
    return f"{example.source}: " if example.source else ""


def _fit_pair(pair: EncodedPair, example: Example, max_length: int | None, truncation: str) -> EncodedPair:
    longest = len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))
    if truncation not in ("truncate", "drop", "error"):
        raise ValueError(f"truncation must be truncate, drop or error, not {truncation!r}")
    if max_length is None or longest <= max_length:
        return pair
    room = max_length - len(pair.prompt)
    message = (
        f"{_where(example)}pair is {longest} tokens (prompt {len(pair.prompt)} + longer answer "
        f"{longest - len(pair.prompt)}), longer than data.max_length={max_length}; "
    )
    if truncation == "truncate" and room >= 1:
        for side in ("chosen", "rejected"):
            setattr(pair, side, getattr(pair, side)[:room])
            setattr(pair, f"{side}_labels", getattr(pair, f"{side}_labels")[:room])
        if any(t != IGNORE for t in pair.chosen_labels) and any(t != IGNORE for t in pair.rejected_labels):
            pair.truncated = True
            return pair
    if room < 1 or truncation == "truncate":
        message += "its prompt leaves no room for an answer; shorten the prompt or raise data.max_length"
    elif truncation == "error":
        message += "raise data.max_length, shorten the answers, or set data.truncation=truncate (cuts the answers)"
    else:
        message += "dropped (data.truncation=drop)"
    raise TooLong(message, length=longest, max_length=max_length, source=example.source)


def _fit(ids: list[int], labels: list[int], example: Example, max_length: int | None, truncation: str) -> Encoded:
    if max_length is None or len(ids) <= max_length:
        return Encoded(ids, labels)
    if truncation == "truncate":
        return Encoded(ids[:max_length], labels[:max_length], truncated=True)
    message = f"{_where(example)}example is {len(ids)} tokens, longer than data.max_length={max_length}; "
    if truncation == "error":
        message += "raise data.max_length, shorten it, or set data.truncation=drop"
    else:
        message += "dropped (data.truncation=drop)"
    raise TooLong(message, length=len(ids), max_length=max_length, source=example.source)
