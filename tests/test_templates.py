"""Rendering to token ids and loss masks, checked token by token against the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from conftest import TOKENIZER_DIR
from tunesmith.data.example import Example, Message
from tunesmith.data.templates import FALLBACK_TEMPLATES, IGNORE, Encoded, Renderer, TooLong
from tunesmith.errors import ConfigError, DataError

CONVERSATION = [
    Message("system", "You answer arithmetic questions."),
    Message("user", "What is 2+2?"),
    Message("assistant", "2+2 is 4."),
    Message("user", "And 3*3?"),
    Message("assistant", "3*3 is 10.", weight=0),  # a wrong answer kept as context, not trained
    Message("user", "Are you sure?"),
    Message("assistant", "Sorry: 3*3 is 9.\nThat one I know."),
]


def chat(messages=CONVERSATION, source="train.jsonl:3") -> Example:
    return Example(kind="chat", messages=list(messages), source=source)


def as_dicts(messages) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def template_ids(tok, messages, **kw) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5, a list before."""
    out = tok.apply_chat_template(as_dicts(messages), tokenize=True, **kw)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def trained_runs(tok, enc: Encoded) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    runs, cur = [], []
    for i, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE:
            assert label == i, "labels are unshifted: a trained label is the token itself"
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.fixture(scope="module")
def renderer(tokenizer) -> Renderer:
    return Renderer(tokenizer)


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A tokenizer that adds a BOS to plain text, as Llama and Gemma tokenizers do (SmolLM2's does not)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR, bos_token="<|endoftext|>")
    tok.add_bos_token = True
    assert tok("hi")["input_ids"][0] == tok.bos_token_id == 0
    return tok


# ---- chat: the mask, token by token ------------------------------------------------------------------------


def test_chat_mask_token_by_token(tokenizer, renderer):
    enc = renderer.encode(chat())
    text = tokenizer.apply_chat_template(as_dicts(CONVERSATION), tokenize=False)

    # Same ids as the template's own tokenisation (what the model sees at inference).
    assert enc.input_ids == template_ids(tokenizer, CONVERSATION)
    assert len(enc.labels) == len(enc.input_ids) and not enc.truncated

    # Expected labels built independently of offsets: character positions from decoding token by token,
    # trained spans from the ChatML structure the template writes.
    pieces = [tokenizer.decode([i]) for i in enc.input_ids]
    assert "".join(pieces) == text
    trained_spans, untrained_spans, pos = [], [], 0
    for m in CONVERSATION:
        header = f"<|im_start|>{m.role}\n"
        pos = text.index(header + m.content + "<|im_end|>\n", pos) + len(header)
        if m.role == "assistant":
            span = (pos, pos + len(m.content + "<|im_end|>"))
            (trained_spans if m.trained else untrained_spans).append(span)
    assert len(trained_spans) == 2 and len(untrained_spans) == 1

    expected, start = [], 0
    for tid, piece in zip(enc.input_ids, pieces):
        end = start + len(piece)
        inside = any(s <= start and end <= e for s, e in trained_spans)
        expected.append(tid if inside else IGNORE)
        start = end
    assert enc.labels == expected

    # Read back: the trained tokens are exactly each trained turn's content + end-of-turn, nothing else.
    assert trained_runs(tokenizer, enc) == ["2+2 is 4.<|im_end|>", "Sorry: 3*3 is 9.\nThat one I know.<|im_end|>"]
    assert enc.n_label_tokens == sum(1 for x in expected if x != IGNORE)

    # The weight-0 turn is all -100; and the "\n" after each <|im_end|> is never trained.
    start = 0
    for piece, label in zip(pieces, enc.labels):
        if any(s <= start < e for s, e in untrained_spans):
            assert label == IGNORE
        if piece == "\n" and start > 0 and text[start - len("<|im_end|>") : start] == "<|im_end|>":
            assert label == IGNORE
        start += len(piece)
    assert enc.labels[-1] == IGNORE and pieces[-1] == "\n" and pieces[-2] == "<|im_end|>"
    assert enc.labels[-2] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_weight_one_and_none_both_train(tokenizer, renderer):
    msgs = [Message("user", "a"), Message("assistant", "b", weight=1), Message("user", "c"), Message("assistant", "d")]
    assert trained_runs(tokenizer, renderer.encode(chat(msgs))) == ["b<|im_end|>", "d<|im_end|>"]


def test_model_default_system_message_is_not_trained(tokenizer, renderer):
    # SmolLM2's template writes its own system message when there is none: it must stay untrained.
    msgs = CONVERSATION[1:3]
    enc = renderer.encode(chat(msgs))
    assert enc.input_ids == template_ids(tokenizer, msgs)
    assert "SmolLM" in tokenizer.decode(enc.input_ids)
    assert trained_runs(tokenizer, enc) == ["2+2 is 4.<|im_end|>"]


def test_trailing_user_message_and_empty_answer(tokenizer, renderer):
    msgs = [Message("user", "a"), Message("assistant", ""), Message("user", "still there?")]
    enc = renderer.encode(chat(msgs))
    assert enc.input_ids == template_ids(tokenizer, msgs)
    assert trained_runs(tokenizer, enc) == ["<|im_end|>"]  # an empty answer still learns to stop


def test_system_prompt_is_added_only_where_missing(tokenizer):
    r = Renderer(tokenizer, system_prompt="Answer in one word.")
    enc = r.encode(chat(CONVERSATION[1:3]))
    expected = [Message("system", "Answer in one word."), *CONVERSATION[1:3]]
    assert enc.input_ids == template_ids(tokenizer, expected)
    assert "SmolLM" not in tokenizer.decode(enc.input_ids)
    assert trained_runs(tokenizer, enc) == ["2+2 is 4.<|im_end|>"]
    # an example with its own system message keeps it
    assert r.encode(chat()).input_ids == template_ids(tokenizer, CONVERSATION)
    # and the prompt for generation gets the same system message as training did
    assert r.prompt_ids(CONVERSATION[1:2]) == template_ids(tokenizer, expected[:2], add_generation_prompt=True)


def test_prompt_ids_match_the_template(tokenizer, renderer):
    prompt = CONVERSATION[:6]
    expected = template_ids(tokenizer, prompt, add_generation_prompt=True)
    assert renderer.prompt_ids(prompt) == expected
    assert renderer.prompt_ids(as_dicts(prompt)) == expected
    assert renderer.prompt_text(prompt) == tokenizer.apply_chat_template(
        as_dicts(prompt), tokenize=False, add_generation_prompt=True
    )
    assert renderer.prompt_text(prompt).endswith("<|im_start|>assistant\n")
    assert not renderer.prompt_text(prompt, add_generation_prompt=False).endswith("assistant\n")
    # the training rendering starts with exactly the prompt the model will be given
    enc = renderer.encode(chat(CONVERSATION[:7]))
    assert enc.input_ids[: len(expected)] == expected


def test_stop_token_ids(tokenizer, renderer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert renderer.stop_token_ids == [im_end] == [tokenizer.eos_token_id]
    assert renderer.stop_strings == ["<|im_end|>"]
    # <end_of_turn> is several tokens in SmolLM2's vocabulary: a stop string, not a stop id
    gemma = Renderer(tokenizer, "gemma")
    assert gemma.stop_strings[0] == "<end_of_turn>" and gemma.stop_token_ids == [im_end]


# ---- built-in templates -------------------------------------------------------------------------------------

END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "plain": "<|im_end|>"}


@pytest.mark.parametrize("name", sorted(FALLBACK_TEMPLATES))
def test_fallback_template_spans(tokenizer, name):
    r = Renderer(tokenizer, name)
    assert r.template_name == name
    enc = r.encode(chat())
    text = tokenizer.apply_chat_template(as_dicts(CONVERSATION), chat_template=FALLBACK_TEMPLATES[name], tokenize=False)
    assert enc.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]

    runs = trained_runs(tokenizer, enc)
    answers = [m.content for m in CONVERSATION if m.trained]
    assert len(runs) == len(answers)
    end = END_OF_TURN[name]
    for run, answer in zip(runs, answers):
        expected = answer + end
        # A run is exactly content + end-of-turn, except where a BPE token straddles the end of the turn
        # (llama3's "<|eot_id|>" is plain text here, and its ">" merges with the next header's "<"): that
        # token is trained too, and its surplus is the start of the next thing the template writes.
        assert run.startswith(expected), (name, run)
        surplus = run[len(expected) :]
        assert text.count(expected + surplus) >= 1 and len(surplus) <= 2, (name, run)
    assert runs[-1] == answers[-1] + end  # the last turn has nothing after it to merge with
    if name in ("chatml", "gemma", "plain"):
        assert runs == [a + end for a in answers]
    assert "3*3 is 10." not in "".join(runs)


def test_gemma_puts_system_into_first_user_turn(tokenizer):
    r = Renderer(tokenizer, "gemma")
    text = r.prompt_text(CONVERSATION[:2])
    assert text == (
        f"{tokenizer.bos_token}<start_of_turn>user\nYou answer arithmetic questions.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    enc = r.encode(chat())
    assert trained_runs(tokenizer, enc)[0] == "2+2 is 4.<end_of_turn>"
    assert "<start_of_turn>model\n2+2 is 4.<end_of_turn>\n" in tokenizer.decode(enc.input_ids)


def test_tokenizer_without_template_falls_back_to_chatml():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = None
    r = Renderer(tok)
    assert r.template_name == "chatml" and r.chat_template == FALLBACK_TEMPLATES["chatml"]
    assert trained_runs(tok, r.encode(chat())) == [
        "2+2 is 4.<|im_end|>",
        "Sorry: 3*3 is 9.\nThat one I know.<|im_end|>",
    ]
    assert r.prompt_text(CONVERSATION[1:2]) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_template_argument(tokenizer):
    assert Renderer(tokenizer).template_name == "model"
    custom = FALLBACK_TEMPLATES["chatml"].replace("<|im_start|>", "<|im_start|> ")
    r = Renderer(tokenizer, custom)
    assert r.template_name == "custom"
    assert trained_runs(tokenizer, r.encode(chat()))[0] == "2+2 is 4.<|im_end|>"
    with pytest.raises(ConfigError, match=r"unknown template 'vicuna'; expected one of chatml, llama3, gemma, plain"):
        Renderer(tokenizer, "vicuna")


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # A template that writes the number of messages first: every added message changes earlier text.
    counting = "{{ messages | length }}\n" + FALLBACK_TEMPLATES["chatml"]
    with pytest.raises(DataError) as e:
        Renderer(tokenizer, counting).encode(chat())
    assert str(e.value).startswith(
        "train.jsonl:3: the chat template given in model.chat_template does not render conversations "
        "incrementally (adding message 3 changes the text before it)"
    )
    assert "set model.chat_template to a built-in template" in str(e.value)


def test_template_errors_become_data_errors(tokenizer):
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% endfor %}" + FALLBACK_TEMPLATES["chatml"]
    )
    with pytest.raises(DataError, match=r"^train.jsonl:3: the chat template given in .* System role not supported"):
        Renderer(tokenizer, strict).encode(chat())


def test_assistant_first_is_refused(renderer):
    with pytest.raises(DataError, match=r"^x:1: the conversation starts with an assistant message"):
        renderer.encode(chat([Message("assistant", "hi")], source="x:1"))


# ---- BOS handling -----------------------------------------------------------------------------------------


def test_bos_is_prepended_when_the_tokenizer_uses_one_and_the_template_does_not(bos_tokenizer):
    r = Renderer(bos_tokenizer, "chatml")  # ChatML writes no BOS
    assert r.adds_bos
    enc = r.encode(chat())
    text = bos_tokenizer.apply_chat_template(as_dicts(CONVERSATION), chat_template=r.chat_template, tokenize=False)
    assert enc.input_ids == bos_tokenizer(text)["input_ids"]  # what the tokenizer itself would do
    assert enc.input_ids[0] == 0 and enc.labels[0] == IGNORE
    assert trained_runs(bos_tokenizer, enc) == ["2+2 is 4.<|im_end|>", "Sorry: 3*3 is 9.\nThat one I know.<|im_end|>"]
    assert r.prompt_ids(CONVERSATION[:2])[0] == 0


def test_no_double_bos_when_the_template_writes_it(bos_tokenizer):
    r = Renderer(bos_tokenizer, "llama3")  # writes {{ bos_token }} itself
    enc = r.encode(chat())
    assert enc.input_ids[0] == 0 and enc.input_ids[1] != 0
    assert r.prompt_ids(CONVERSATION[:2])[:2] == [0, enc.input_ids[1]]


# ---- completion and text --------------------------------------------------------------------------------------


def test_completion(tokenizer, renderer):
    ex = Example(kind="completion", prompt="Ticket: printer on fire\nCategory:", completion=" hardware")
    enc = renderer.encode(ex)
    p = tokenizer("Ticket: printer on fire\nCategory:", add_special_tokens=False)["input_ids"]
    c = tokenizer(" hardware", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert enc.input_ids == p + c + [eos]  # no BOS: SmolLM2's tokenizer adds none; no separator
    assert enc.labels == [IGNORE] * len(p) + c + [eos]
    assert trained_runs(tokenizer, enc) == [" hardware<|im_end|>"]


def test_completion_and_text_with_bos(bos_tokenizer):
    r = Renderer(bos_tokenizer)
    eos = bos_tokenizer.eos_token_id
    enc = r.encode(Example(kind="completion", prompt="Q: 1+1\nA:", completion=" 2"))
    p = bos_tokenizer("Q: 1+1\nA:", add_special_tokens=False)["input_ids"]
    c = bos_tokenizer(" 2", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == [0, *p, *c, eos]
    assert enc.labels == [IGNORE] * (1 + len(p)) + c + [eos]

    enc = r.encode(Example(kind="text", text="Once upon a time"))
    body = bos_tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == [0, *body, eos]
    assert enc.labels == [IGNORE, *body, eos]


def test_text(tokenizer, renderer):
    enc = renderer.encode(Example(kind="text", text="The quick brown fox."))
    body = tokenizer("The quick brown fox.", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == body + [tokenizer.eos_token_id]  # every token trained, EOS included, no BOS
    assert enc.labels == enc.input_ids
    assert enc.n_label_tokens == len(body) + 1


def test_a_preference_pair_is_encoded_as_a_pair_not_one_example(renderer):
    ex = Example(kind="preference", prompt="p", chosen="a", rejected="b", source="prefs.jsonl:7")
    with pytest.raises(DataError, match=r"^prefs.jsonl:7: a preference pair .* train.objective dpo"):
        renderer.encode(ex)
    pair = renderer.encode_pair(ex)  # a raw-text pair: like a completion row, prompt then answer then EOS
    assert pair.chosen_labels[-1] == pair.chosen[-1] == renderer.eos_token_id


# ---- truncation -----------------------------------------------------------------------------------------------


def test_truncate_cuts_ids_and_labels_together(renderer):
    full = renderer.encode(chat())
    n = len(full.input_ids)
    assert renderer.encode(chat(), max_length=n) == Encoded(full.input_ids, full.labels, truncated=False)
    cut = renderer.encode(chat(), max_length=n - 5)
    assert cut.truncated and cut.input_ids == full.input_ids[: n - 5] and cut.labels == full.labels[: n - 5]
    assert cut.n_label_tokens < full.n_label_tokens


def test_truncation_error_message(renderer):
    n = len(renderer.encode(chat()).input_ids)
    with pytest.raises(TooLong) as e:
        renderer.encode(chat(source="train.jsonl:12"), max_length=20, truncation="error")
    assert str(e.value) == (
        f"train.jsonl:12: example is {n} tokens, longer than data.max_length=20; "
        "raise data.max_length, shorten it, or set data.truncation=drop"
    )
    assert isinstance(e.value, DataError) and e.value.length == n and e.value.max_length == 20


def test_truncation_drop_raises_a_countable_error(renderer):
    n = len(renderer.encode(chat()).input_ids)
    with pytest.raises(TooLong) as e:
        renderer.encode(chat(), max_length=20, truncation="drop")
    assert e.value.length == n and e.value.source == "train.jsonl:3"
    assert str(e.value).endswith("dropped (data.truncation=drop)")
    assert renderer.encode(chat(), max_length=n, truncation="drop").input_ids  # fits: no error
    with pytest.raises(ValueError):
        renderer.encode(chat(), truncation="cut")


# ---- tokenizers without offsets ---------------------------------------------------------------------------


class NoOffsets:
    """A stand-in for a slow (Python) tokenizer: no offset mapping."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text, **kw):
        assert "return_offsets_mapping" not in kw
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("name", [None, *sorted(FALLBACK_TEMPLATES)])
def test_slow_tokenizer_path_gives_the_same_mask(tokenizer, name):
    fast = Renderer(tokenizer, name).encode(chat())
    slow = Renderer(NoOffsets(tokenizer), name)
    assert not slow.has_offsets
    assert slow.encode(chat()) == fast
