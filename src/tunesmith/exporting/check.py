"""The equivalence check every export ends with: the export, read back by an independent loader, against the run.

The reference is the run's model as tunesmith loads it (base + trained weights, float32, unmerged). On a few
prompts (rendered with the run's chat template) we take its greedy continuation, then feed prompt + that
continuation to both models and compare every logit: the largest absolute difference must be within the
export's tolerance, and the export's own greedy continuation must be the same tokens.

Readers: a merged directory is loaded by plain `AutoModelForCausalLM.from_pretrained` (no peft, no tunesmith),
an adapter by `peft.PeftModel.from_pretrained` on a freshly loaded base, a GGUF file by transformers' GGUF
loader (its own tensor-name map, Q/K un-permutation, Gemma norm shift and dequantization), which shares no code
with our writer.

Tolerances (max absolute logit difference over all prompt and answer positions):
- merge and gguf f32 (the run's weights in float32, merged or not): compared in float64, within 4x the float32
  floor of the exported model (`rounding_floor`: how far its logits move when every weight moves one float32
  ulp). Merging must store W + s*B*A in float32, which no comparison can take back, and how far that moves the
  logits grows with their size, the depth and the adapter: a fixed 1e-4 on float32 logits refused an ordinary
  SmolLM2-135M-Instruct LoRA (r=16, 6 steps, lr 2e-4; issue #21). Measured on that run, 3 prompts: float32
  compare 1.7e-4 (what the fixed 1e-4 saw; nine tenths of it the order of float32 operations, x(W + sBA) vs
  xW + s(xA)B, over 30 layers), float64 compare 1.7e-5, floor 5.2e-5 (tolerance 2.1e-4, 12x the difference);
  one merged weight with its sign flipped: 3.9e-3, caught. (One weight off by 1e-3 of the layer's largest moved
  the logits 1.3e-4: within what float32 storage does, and not caught.) Harder adapters on SmolLM2: r=16 for 60
  steps at lr 2e-3, 8.4e-6 against a floor of 2.4e-5 (0.35x); the 6-step run's B scaled x10, 3.5e-5 against
  5.2e-5 (0.68x). On tiny models 0.02x-0.5x the floor, 1.3x at worst (B scaled x30, where peft's float32 merge
  adds a few ulps of its own), hence the factor 4. The float64 passes need twice the model's memory;
- adapter: the same files on the same base: 1e-5 (measured 0);
- gguf f16: measured 0.043 (11-bit mantissas): tolerance 0.15;
- gguf q8_0: measured 1.29 (8-bit blocks of 32 values; the largest error is at the first positions of the chat
  template, where this model's logits are largest): tolerance 3.0.
The greedy outputs (computed in the same dtype as the logits) must be identical in every case, which is the
stricter test for the quantized kinds.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# max |logit difference| allowed, per export kind; see the module docstring for where the numbers come from
TOLERANCES = {
    "adapter": 1e-5,
    "gguf-f16": 0.15,
    "gguf-q8_0": 3.0,
}
# exports whose weights are the run's in float32 (merged or not): compared in float64, within FLOOR_FACTOR times the
# float32 floor of the exported model (`rounding_floor`); see the module docstring
FLOAT64_KINDS = ("merge", "gguf-f32")
FLOOR_FACTOR = 4.0
MIN_TOLERANCE = 1e-9  # float64 arithmetic noise, for a model whose floor is 0

PROMPTS = [
    "What is the capital of France?",
    "My card was charged twice for the same order. Can you help?",
    "Write one sentence about the sea.",
]
NEW_TOKENS = 16


class Reference:
    """The run's model's answers to PROMPTS: the token ids of prompt + greedy continuation, and its logits, both
    computed in the dtype the export `kind` is checked in (float64 for FLOAT64_KINDS, else float32)."""

    def __init__(self, source, kind: str):
        from tunesmith.methods import logits_offset

        self.kind = kind
        self.dtype = torch.float64 if kind in FLOAT64_KINDS else torch.float32
        self.stop_ids = source.renderer.stop_token_ids
        self.pad_id = source.tokenizer.pad_token_id
        self.tokenizer = source.tokenizer
        self.prompts = [_prompt_ids(source, p) for p in PROMPTS]
        with computing_in(source.model, self.dtype):
            self.continuations = [greedy(source.model, ids, self.stop_ids, self.pad_id) for ids in self.prompts]
            self.logits = [
                logits(source.model, p + c, logits_offset(source.model))
                for p, c in zip(self.prompts, self.continuations)
            ]
        self.logit_scale = max(x.abs().max().item() for x in self.logits)


def compare(reference: Reference, model, kind: str) -> dict:
    """Figures for `model` (the export as read back) against the reference; `passed` says whether it holds."""
    from tunesmith.methods import logits_offset

    if kind != reference.kind:
        raise ValueError(f"the reference was made for a {reference.kind} export, not {kind}")
    rows, exported = [], []
    for prompt, cont, ref_logits in zip(reference.prompts, reference.continuations, reference.logits):
        with computing_in(model, reference.dtype):
            got = greedy(model, prompt, reference.stop_ids, reference.pad_id)
            exported.append(logits(model, prompt + cont, logits_offset(model)))
        diff = (exported[-1] - ref_logits).abs().max().item()
        rows.append(
            {
                "prompt_tokens": len(prompt),
                "max_abs_logit_diff": diff,
                "greedy_identical": got == cont,
                "run_greedy": reference.tokenizer.decode(cont),
                "export_greedy": reference.tokenizer.decode(got),
            }
        )
    worst = max(r["max_abs_logit_diff"] for r in rows)
    identical = all(r["greedy_identical"] for r in rows)
    floor = None
    if kind in FLOAT64_KINDS:
        floor = rounding_floor(model, [p + c for p, c in zip(reference.prompts, reference.continuations)], exported)
        tolerance = max(FLOOR_FACTOR * floor, MIN_TOLERANCE)
    else:
        tolerance = TOLERANCES[kind]
    return {
        "kind": kind,
        "compared_in": str(reference.dtype).removeprefix("torch."),
        "tolerance": tolerance,
        "float32_floor": floor,
        "max_abs_logit": reference.logit_scale,
        "max_abs_logit_diff": worst,
        "greedy_identical": identical,
        "greedy_new_tokens": NEW_TOKENS,
        "prompts": [dict(prompt=p, **r) for p, r in zip(PROMPTS, rows)],
        "passed": bool(worst <= tolerance and identical),
    }


def summary(result: dict) -> str:
    verdict = "passed" if result["passed"] else "FAILED"
    greedy = "identical" if result["greedy_identical"] else "DIFFERENT"
    return (
        f"equivalence check {verdict}: max |logit diff| {result['max_abs_logit_diff']:.3g} "
        f"(tolerance {result['tolerance']:.3g}, in {result['compared_in']}) over {len(result['prompts'])} prompts; "
        f"greedy outputs ({NEW_TOKENS} tokens) {greedy}"
    )


@torch.no_grad()
def greedy(model, ids: list[int], stop_ids: list[int], pad_id) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=stop_ids or None,
        pad_token_id=pad_id,
        top_p=None,
        top_k=None,
        temperature=None,
    )
    return out[0, len(ids) :].tolist()


@torch.no_grad()
def logits(model, ids: list[int], offset: int = 0) -> torch.Tensor:
    """The model's logits at every position of `ids`, in the dtype it computes in (at least float32)."""
    x = torch.tensor([ids])
    out = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]
    return out[offset:] if out.dtype == torch.float64 else out[offset:].float()


@torch.no_grad()
def rounding_floor(model, sequences: list[list[int]], computed: list[torch.Tensor], seed: int = 0) -> float:
    """How far float32 storage alone moves `model`'s logits: the max |logit change| (computed in float64, as
    `computed` was for `sequences`) when every weight moves by one float32 ulp, each up or down at random (seeded).

    A float32 export of exact (float64) weights is off by at most half an ulp per weight, so its logits sit within
    about this distance of the exact ones; it grows with the logits' size, the depth and how much the model
    amplifies small changes, which a fixed number cannot follow. `model` is float32 and is left as it came
    (the moves are undone exactly: nextafter one way, then the other)."""
    from tunesmith.methods import logits_offset

    _nudge(model, seed, undo=False)
    try:
        with computing_in(model, torch.float64):
            moved = [logits(model, ids, logits_offset(model)) for ids in sequences]
    finally:
        _nudge(model, seed, undo=True)
    return max((a - b).abs().max().item() for a, b in zip(moved, computed))


def _nudge(model, seed: int, undo: bool) -> None:
    """Move every floating weight of `model` one float32 ulp, up or down by a seeded coin (undo: back)."""
    inf = torch.tensor(float("inf"))
    for i, p in enumerate(model.parameters()):
        if p.dtype != torch.float32:
            continue
        up = torch.rand(p.shape, generator=torch.Generator().manual_seed(seed + i), device="cpu").to(p.device) < 0.5
        if undo:
            up = ~up
        p.copy_(torch.nextafter(p, torch.where(up, inf.to(p.device), -inf.to(p.device))))


@contextmanager
def computing_in(model, dtype: torch.dtype):
    """`model` (float32) with its weights cast to `dtype` for the block, then back: float32 -> float64 -> float32
    is exact, so the model leaves as it came. Costs twice the model's memory while in float64."""
    if dtype == torch.float32:
        yield model
        return
    model.to(dtype)
    try:
        yield model
    finally:
        model.to(torch.float32)


def _prompt_ids(source, prompt: str) -> list[int]:
    """As tunesmith generate feeds a prompt: the chat template with a generation prompt, or raw text for runs
    trained on prompt/completion or plain text."""
    if source.renderer.raw_prompts:
        return source.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return source.renderer.prompt_ids([{"role": "user", "content": prompt}], add_generation_prompt=True)
