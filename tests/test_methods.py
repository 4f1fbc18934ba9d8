"""Every fine-tuning method on a tiny Llama: it trains, changes only what it should, and saves/loads exactly.

One table of cases drives the main test (peft's method x save/load matrix). Trainable counts are computed
by hand from the tiny model's shapes, and pinned for the real SmolLM2-135M architecture (built on the meta
device, so no weights are needed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from tunesmith.config import Config
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods import (
    apply_method,
    describe,
    load_trainable_state_dict,
    load_trained,
    logits_offset,
    merged_for_inference,
    save_trained,
    saved_method,
    trainable_parameters,
    trainable_state_dict,
)

# the tiny model of conftest.build_tiny_model: 2 blocks, hidden 32, MLP 64, 4 heads of 8, 2 kv heads (kv width 16)
H, I, KV, L = 32, 64, 16, 2  # noqa: E741  (I: the MLP width, as in the papers)
LINEAR = {
    "q_proj": (H, H),
    "k_proj": (H, KV),
    "v_proj": (H, KV),
    "o_proj": (H, H),
    "gate_proj": (H, I),
    "up_proj": (H, I),
    "down_proj": (I, H),
}  # (in, out)
BLOCK = sum(i * o for i, o in LINEAR.values()) + 2 * H  # + input and post-attention RMSNorm
VOCAB = 49152
BASE = VOCAB * H + L * BLOCK + H  # embeddings (tied with lm_head) + blocks + final norm
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_count(r: int, names=tuple(LINEAR), dora: bool = False) -> int:
    return L * sum(r * (LINEAR[n][0] + LINEAR[n][1]) + (LINEAR[n][1] if dora else 0) for n in names)


def adapter_count(b: int, per_block: int) -> int:
    return L * per_block * (H * b + b + b * H + H)


@dataclass
class Case:
    id: str
    method: str
    settings: dict
    trainable: int  # by hand
    lr: float
    min_drop: float  # the loss must fall at least this much in STEPS steps
    added: bool = True  # trainable parameters are new (not base weights)
    changed: object = field(default=lambda name: False)  # which base parameters may change


STEPS = 10
CASES = [
    Case("full", "full", {}, BASE, 1e-2, 1.0, added=False, changed=lambda name: True),
    # last block + every parameter with "norm" in its name (block 0's two norms and the final norm)
    Case(
        "freeze",
        "freeze",
        {"freeze": {"last_n_blocks": 1, "modules": ["norm"]}},
        BLOCK + 2 * H + H,
        1e-2,
        0.3,
        added=False,
        changed=lambda name: name.startswith("model.layers.1.") or "norm" in name,
    ),
    Case("lora", "lora", {"lora": {"r": 4, "alpha": 8}}, lora_count(4), 3e-2, 0.05),
    Case("lora-attention", "lora", {"lora": {"r": 2, "target": "attention"}}, lora_count(2, ATTENTION), 3e-2, 0.05),
    Case(
        "lora-list",
        "lora",
        {"lora": {"r": 2, "target": ["v_proj", "down_proj"]}},
        lora_count(2, ("v_proj", "down_proj")),
        3e-2,
        0.05,
    ),
    Case("dora", "dora", {"lora": {"r": 4, "alpha": 8}}, lora_count(4, dora=True), 3e-2, 0.05),
    # keys and values scale their outputs (KV each), down_proj its input (I)
    Case("ia3", "ia3", {}, L * (KV + KV + I), 1.0, 0.05),
    Case("prefix", "prefix", {"prefix": {"num_virtual_tokens": 4}}, 4 * L * 2 * KV, 0.3, 0.05),
    # embedding (4 x KV) -> Linear(KV, KV) -> tanh -> Linear(KV, L*2*KV)
    Case(
        "prefix-projection",
        "prefix",
        {"prefix": {"num_virtual_tokens": 4, "projection": True}},
        4 * KV + (KV * KV + KV) + (KV * L * 2 * KV + L * 2 * KV),
        3e-2,
        0.05,
    ),
    Case("prompt", "prompt", {"prompt": {"num_virtual_tokens": 4}}, 4 * H, 0.3, 0.03),
    Case(
        "prompt-text",
        "prompt",
        {"prompt": {"num_virtual_tokens": 5, "init_text": "Classify the ticket:"}},
        5 * H,
        0.3,
        0.03,
    ),
    Case("adapter-houlsby", "adapter", {"adapter": {"bottleneck": 4}}, adapter_count(4, 2), 3e-2, 0.05),
    Case(
        "adapter-pfeiffer",
        "adapter",
        {"adapter": {"bottleneck": 4, "style": "pfeiffer", "activation": "relu"}},
        adapter_count(4, 1),
        3e-2,
        0.05,
    ),
]
PEFT = {"lora", "dora", "ia3", "prefix", "prompt"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matrices: threads only add overhead, and the test machine's cores are shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(method: str, settings: dict | None = None, model_dir=None, **sections) -> Config:
    raw = {"method": method, **(settings or {}), **sections}
    if model_dir is not None:
        raw["model"] = {"name": str(model_dir)}
    return Config.model_validate(raw)


def load_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def batch() -> torch.Tensor:
    return torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))


def train(model, lr: float, steps: int = STEPS) -> list[float]:
    ids = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch()).logits


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_method_trains_changes_only_its_weights_and_round_trips(case, tiny_model_dir, tokenizer, tmp_path):
    config = make_config(case.method, case.settings, tiny_model_dir)
    base = load_base(tiny_model_dir)
    base_params = dict(base.named_parameters())  # the objects survive peft's wrapping
    before = {name: p.detach().clone() for name, p in base_params.items()}

    torch.manual_seed(0)
    model = apply_method(base, config, tokenizer=tokenizer)
    line = describe(model, config)
    print(line)

    # (6) counts, by hand
    trainable, total = trainable_parameters(model)
    assert trainable == case.trainable
    assert total == BASE + (trainable if case.added else 0)
    assert line.endswith(f": {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    # (1) it learns
    losses = train(model, case.lr)
    assert losses[-1] < losses[0] - case.min_drop, losses

    # (2) exactly the intended parameters changed: every trainable one, and no other base weight
    changed = {name for name, p in base_params.items() if not torch.equal(p, before[name])}
    assert changed == {name for name in base_params if case.changed(name)}
    assert all(not torch.equal(p, initial[name]) for name, p in model.named_parameters() if p.requires_grad)
    trained = logits(model)

    # (3) save -> load onto a fresh base gives the same logits
    out = tmp_path / "model"
    save_trained(model, config, out)
    meta = json.loads((out / "tunesmith.json").read_text())
    assert meta["method"] == case.method and meta["base_model"] == str(tiny_model_dir)
    assert meta["trainable_parameters"] == trainable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dirs left behind
    loaded = load_trained(load_base(tiny_model_dir), out)
    assert not loaded.training
    assert_same(logits(loaded), trained)

    # (4) peft's own loader reads our peft dirs; full dirs load on their own, tied weights still tied
    if case.method in PEFT:
        from peft import PeftModel

        assert_same(logits(PeftModel.from_pretrained(load_base(tiny_model_dir), out)), trained)
    elif case.method in ("full", "freeze"):
        reloaded = load_base(out)
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
        assert_same(logits(reloaded), trained)
    else:
        settings = json.loads((out / "adapter_config.json").read_text())
        assert settings["tunesmith_method"] == "adapter" and settings["bottleneck"] == 4
        assert len(settings["positions"]) == case.trainable // adapter_count(4, 1) * L
    if case.method in ("full", "freeze"):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    # (5) the checkpoint path: trainable_state_dict -> a second freshly applied model
    second = apply_method(load_base(tiny_model_dir), config, tokenizer=tokenizer)
    load_trainable_state_dict(second, trainable_state_dict(model))
    assert_same(logits(second), trained)

    # a dir without our tunesmith.json (copied elsewhere) is still recognised from its files
    assert saved_method(out) == case.method
    (out / "tunesmith.json").unlink()
    assert saved_method(out) == ("full" if case.method == "freeze" else case.method)


@pytest.mark.parametrize("case", [c for c in CASES if c.method != "prefix"], ids=lambda c: c.id)
def test_gradient_checkpointing_gives_the_same_gradients(case, tiny_model_dir, tokenizer):
    """As the training loop does it: checkpointing enabled after apply_method, non-reentrant."""
    config = make_config(case.method, case.settings)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = apply_method(load_base(tiny_model_dir), config, tokenizer=tokenizer)
        with torch.no_grad():  # move LoRA's B off zero so every trainable weight gets a gradient
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = batch()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[1].keys() == grads[0].keys()
    for name, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-7)


def test_real_smollm2_architecture_counts():
    """Trainable counts on SmolLM2-135M's shapes (meta device: no weights, no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    expected = {
        ("full", ()): (134_515_008, 134_515_008),
        ("freeze", ()): (7_080_192, 134_515_008),
        ("lora", ()): (4_884_480, 139_399_488),
        ("lora", (("target", "attention"),)): (1_843_200, 136_358_208),
        ("dora", ()): (5_040_000, 139_555_008),
        ("ia3", ()): (57_600, 134_572_608),
        ("prefix", ()): (230_400, 134_745_408),
        ("prompt", ()): (11_520, 134_526_528),
        ("adapter", ()): (4_462_080, 138_977_088),
    }
    got = {}
    for method, lora in expected:
        with torch.device("meta"):
            model = LlamaForCausalLM(arch)
        config = make_config(method, lora=dict(lora))
        got[method, lora] = trainable_parameters(apply_method(model, config))
    assert got == expected


# ----------------------------------------------------------------------------------------------------
# Options that cannot work fail before training, saying what to change


@pytest.mark.parametrize(
    "method, sections, message",
    [
        (
            "lora",
            {"lora": {"target": ["q_proj", "qproj"]}},
            "lora.target: 'qproj' matches no linear module of this model; its linear modules are: "
            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head",
        ),
        (
            "ia3",
            {"ia3": {"target": ["k_proj", "w2", "w3"]}},
            "ia3.target: 'w2', 'w3' match no linear module of this model; its linear modules are: "
            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head",
        ),
        (
            "ia3",
            {"ia3": {"target": ["k_proj"], "feedforward": ["down_proj"]}},
            "ia3.feedforward: 'down_proj' not in ia3.target (k_proj); feed-forward modules must be targets too",
        ),
        (
            "freeze",
            {"freeze": {"last_n_blocks": 3}},
            "freeze.last_n_blocks=3 but this model has 2 blocks; use at most 2 (or method=full to train everything)",
        ),
        (
            "freeze",
            {"freeze": {"last_n_blocks": 0, "modules": ["norm", "layernorm_x"]}},
            "freeze.modules: 'layernorm_x' matches no parameter name; the parameters are: model.embed_tokens.weight, "
            "model.layers.N.self_attn.q_proj.weight",
        ),
        (
            "freeze",
            {"freeze": {"last_n_blocks": None}},
            "method=freeze trains nothing: set freeze.last_n_blocks > 0 or list freeze.modules",
        ),
        (
            "prefix",
            {"train": {"gradient_checkpointing": True}},
            "method=prefix does not work with gradient checkpointing",
        ),
        ("prompt", {"train": {"batching": "pack"}}, "method=prompt cannot train on packed rows"),
        ("prefix", {"train": {"batching": "pack"}}, "method=prefix cannot train on packed rows"),
        (
            "prompt",
            {"prompt": {"init_text": "hi"}},
            "prompt.init_text needs the tokenizer: call apply_method(model, config, tokenizer=...)",
        ),
    ],
)
def test_bad_options_raise_config_error(method, sections, message, tiny_model_dir):
    with pytest.raises(ConfigError) as e:
        apply_method(load_base(tiny_model_dir), make_config(method, sections))
    assert str(e.value).startswith(message)


def test_freeze_lm_head_trains_the_tied_embedding(tiny_model_dir):
    config = make_config("freeze", freeze={"last_n_blocks": 0, "modules": ["lm_head"]})
    model = apply_method(load_base(tiny_model_dir), config)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.weight"]
    assert describe(model, config) == (
        "freeze: train parameters named like lm_head (lm_head is tied to embed_tokens: both train): "
        "1,572,864 trainable of 1,591,456 (98.83%)"
    )


def test_all_linear_lora_leaves_the_tied_lm_head_alone(tiny_model_dir):
    model = apply_method(load_base(tiny_model_dir), make_config("lora"))
    assert type(model.get_base_model().lm_head).__name__ == "Linear"
    assert not any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)


def test_untrained_adapter_is_the_base_model(tiny_model_dir):
    base_logits = logits(load_base(tiny_model_dir))
    exact = apply_method(load_base(tiny_model_dir), make_config("adapter", adapter={"init_scale": 0.0}))
    assert torch.equal(logits(exact), base_logits)
    near = apply_method(load_base(tiny_model_dir), make_config("adapter"))  # init_scale 1e-3
    assert 0 < (logits(near) - base_logits).abs().max() < 1e-2
    # adapter keys sit where they act; base keys are untouched
    keys = list(trainable_state_dict(near))
    assert keys[:2] == ["model.layers.0.self_attn.adapter.down.weight", "model.layers.0.self_attn.adapter.down.bias"]
    assert set(near.state_dict()) - set(keys) == set(load_base(tiny_model_dir).state_dict())


def test_prompt_init_text_uses_the_text_embeddings(tiny_model_dir, tokenizer):
    config = make_config("prompt", prompt={"num_virtual_tokens": 7, "init_text": "Classify the ticket:"})
    model = apply_method(load_base(tiny_model_dir), config, tokenizer=tokenizer)
    ids = tokenizer("Classify the ticket:", add_special_tokens=False)["input_ids"]
    ids = (ids * 7)[:7]
    soft = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(soft, model.word_embeddings.weight[ids])
    assert logits_offset(model) == 7
    assert logits(model).shape[1] == batch().shape[1] + 7


@pytest.mark.parametrize(
    "method,sections",
    [("prefix", {"prefix": {"num_virtual_tokens": 3}}), ("prompt", {"prompt": {"num_virtual_tokens": 3}})],
)
def test_prompt_learning_decodes_as_it_scores(method, sections, tiny_model_dir, tokenizer):
    """Prefix/prompt tuning put virtual tokens in front of every row. tunesmith decodes them as a cache prefix
    (evaluation.generate.virtual_cache) with the base model, left-padded batches and a shared prompt prefix: the
    tokens must be those of a no-cache argmax loop through peft's own forward, row by row, and not the base model's;
    inside disable_adapter() the same loop must give the base model's tokens."""
    from tunesmith.evaluation.generate import decode_greedy, encode_prefix, encode_prompts

    model = apply_method(load_base(tiny_model_dir), make_config(method, **sections))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)  # virtual tokens that change what the model says
    model.eval()
    ids = batch()
    prompts = [ids[0, :6].tolist(), ids[0, :3].tolist() + ids[1, :6].tolist()]  # 6 and 9 tokens: left padding

    def reference(rows) -> list[list[int]]:
        out = []
        with torch.no_grad():
            for row in rows:
                seq = torch.tensor([row])
                for _ in range(6):
                    logits = model(input_ids=seq, use_cache=False).logits  # prompt tuning: virtual positions first
                    seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
                out.append(seq[0, len(row) :].tolist())
        return out

    def ours(rows, prefix_len=0) -> list[list[int]]:
        got: list[list[int]] = [[] for _ in rows]
        cache = encode_prefix(model, rows[0][:prefix_len]) if prefix_len else None
        state = encode_prompts(model, rows, pad=0, prefix_len=prefix_len, prefix_cache=cache)
        decode_greedy(model, tokenizer, state, stop_ids=[], max_new_tokens=6, on_token=lambda i, t: got[i].append(t))
        return got

    expected = reference(prompts)
    assert ours(prompts) == expected
    shared = [prompts[0], prompts[0][:3] + prompts[1][3:]]  # the first 3 tokens shared
    assert ours(shared, prefix_len=3) == reference(shared)
    with torch.no_grad():
        tuned = model(input_ids=ids[:1, :6]).logits[:, -1]
        with model.disable_adapter():
            assert ours(prompts) == reference(prompts)
            base = model(input_ids=ids[:1, :6]).logits[:, -1]
    assert (tuned - base).abs().max() > 1e-2  # the virtual tokens matter


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_generate_stream_and_sampling(method, tiny_model_dir, tokenizer):
    """The user-facing paths of a prefix/prompt-tuned model (run.generate's generate_batch, chat's stream) use the same
    cached decoding: greedy answers equal decode_greedy's, stream yields the same text, a seeded sampled answer is
    reproducible and differs from greedy."""
    from tunesmith.data.templates import Renderer
    from tunesmith.evaluation.generate import (
        decode_greedy,
        encode_prompts,
        generate_batch,
        prompt_ids,
        stream,
    )

    model = apply_method(load_base(tiny_model_dir), make_config(method, **{method: {"num_virtual_tokens": 4}}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    model.eval()
    renderer = Renderer(tokenizer)
    prompts = ["Where is the invoice?", "My card was charged twice and nobody answers"]
    greedy = generate_batch(model, tokenizer, renderer, prompts, max_new_tokens=8)
    ids = [prompt_ids(tokenizer, renderer, p) for p in prompts]
    direct = [
        decode_greedy(
            model,
            tokenizer,
            encode_prompts(model, [row], pad=0),
            stop_ids=renderer.stop_token_ids,
            stop_strings=renderer.stop_strings,
            max_new_tokens=8,
        )[0]
        for row in ids
    ]
    assert greedy == direct and any(greedy)
    assert "".join(stream(model, tokenizer, renderer, prompts[1], max_new_tokens=8)) == greedy[1]
    sampled = [
        generate_batch(model, tokenizer, renderer, prompts, max_new_tokens=8, temperature=1.5, seed=3) for _ in "ab"
    ]
    assert sampled[0] == sampled[1] != greedy


def test_load_trainable_state_dict_is_strict(tiny_model_dir):
    config = make_config("lora", lora={"r": 2})
    model = apply_method(load_base(tiny_model_dir), config)
    state = dict(trainable_state_dict(model))
    name = next(iter(state))
    state["stray.weight"] = state.pop(name)
    with pytest.raises(ModelError) as e:
        load_trainable_state_dict(model, state)
    assert "1 missing, 1 unexpected, 0 of another shape" in str(e.value)
    assert f"missing: {name}" in str(e.value) and "unexpected: stray.weight" in str(e.value)


def test_save_trained_replaces_an_existing_dir(tiny_model_dir, tmp_path):
    config = make_config("lora", lora={"r": 2}, model_dir=tiny_model_dir)
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    save_trained(apply_method(load_base(tiny_model_dir), config), config, out)
    assert not (out / "stale.txt").exists()
    assert {"adapter_config.json", "adapter_model.safetensors", "tunesmith.json"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize(
    "method, sections, merges",
    [
        ("lora", {}, True),
        ("dora", {}, True),
        ("ia3", {}, True),
        ("prefix", {"prefix": {"num_virtual_tokens": 4}}, False),
        ("adapter", {}, False),
    ],
)
def test_merged_for_inference_folds_fp32_adapters_only(method, sections, merges, tiny_model_dir):
    """Evaluation folds a LoRA/DoRA/IA3 adapter into fp32 weights (one matmul per layer) with the same outputs; other
    methods, and any adapter on bf16 weights (the update would be rounded away), are left as they are."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    torch.manual_seed(0)
    model = apply_method(load_base(tiny_model_dir), make_config(method, **sections))
    if method in ("lora", "dora"):  # a trained-looking adapter: B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
    if method == "ia3":
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.data.normal_(1, 0.2)
    before = logits(model)
    merged = merged_for_inference(model)
    if merges:
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        assert (before - logits(load_base(tiny_model_dir))).abs().max() > 1e-3  # the adapter changes something
        torch.testing.assert_close(logits(merged), before, rtol=1e-5, atol=1e-5)
    else:
        assert merged is model

    bf16 = apply_method(load_base(tiny_model_dir).to(torch.bfloat16), make_config(method, **sections))
    assert merged_for_inference(bf16) is bf16
