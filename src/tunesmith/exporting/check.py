"""The equivalence check every export ends with: the export, read back by an independent loader, against the run.

The reference is the run's model as tunesmith loads it (base + trained weights, float32, unmerged). On a few
prompts (rendered with the run's chat template) we take its greedy continuation, then feed prompt + that
continuation to both models and compare every logit: the largest absolute difference must be within the
export's tolerance, and the export's own greedy continuation must be the same tokens.

Readers: a merged directory is loaded by plain `AutoModelForCausalLM.from_pretrained` (no peft, no tunesmith),
an adapter by `peft.PeftModel.from_pretrained` on a freshly loaded base, a GGUF file by transformers' GGUF
loader (its own tensor-name map, Q/K un-permutation, Gemma norm shift and dequantization), which shares no code
with our writer.

Tolerances (max absolute logit difference over all prompt and answer positions), set from measurements on
SmolLM2-135M-Instruct + LoRA r=8 (3 steps), CPU float32, 3 prompts of ~40 tokens + 16 answer tokens:
- merge (float32): measured 8.6e-5. Only the order of float32 operations differs (x(W + sBA) vs xW + s(xA)B),
  accumulated over 30 layers; the tolerance 1e-4 is the one the export promises;
- gguf f32: the same weights (tiny Gemma 3 measured 1.1e-5): 1e-4;
- gguf f16: measured 0.043 (11-bit mantissas): tolerance 0.15;
- gguf q8_0: measured 1.29 (8-bit blocks of 32 values; the largest error is at the first positions of the chat
  template, where this model's logits are largest): tolerance 3.0.
The greedy outputs must be identical in every case, which is the stricter test for the quantized kinds.
"""

from __future__ import annotations

import torch

# max |logit difference| allowed, per export kind; see the module docstring for where the numbers come from
TOLERANCES = {
    "merge": 1e-4,
    "adapter": 1e-5,
    "gguf-f32": 1e-4,
    "gguf-f16": 0.15,
    "gguf-q8_0": 3.0,
}

PROMPTS = [
    "What is the capital of France?",
    "My card was charged twice for the same order. Can you help?",
    "Write one sentence about the sea.",
]
NEW_TOKENS = 16


class Reference:
    """The run's model's answers to PROMPTS: the token ids of prompt + greedy continuation, and its logits."""

    def __init__(self, source):
        from tunesmith.methods import logits_offset

        self.stop_ids = source.renderer.stop_token_ids
        self.pad_id = source.tokenizer.pad_token_id
        self.tokenizer = source.tokenizer
        self.prompts = [_prompt_ids(source, p) for p in PROMPTS]
        self.continuations = [greedy(source.model, ids, self.stop_ids, self.pad_id) for ids in self.prompts]
        self.logits = [
            logits(source.model, p + c, logits_offset(source.model)) for p, c in zip(self.prompts, self.continuations)
        ]


def compare(reference: Reference, model, kind: str) -> dict:
    """Figures for `model` (the export as read back) against the reference; `passed` says whether it holds."""
    from tunesmith.methods import logits_offset

    tolerance = TOLERANCES[kind]
    rows = []
    for prompt, cont, ref_logits in zip(reference.prompts, reference.continuations, reference.logits):
        got = greedy(model, prompt, reference.stop_ids, reference.pad_id)
        diff = (logits(model, prompt + cont, logits_offset(model)) - ref_logits).abs().max().item()
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
    return {
        "kind": kind,
        "tolerance": tolerance,
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
        f"(tolerance {result['tolerance']:g}) over {len(result['prompts'])} prompts; "
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
    x = torch.tensor([ids])
    out = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]
    return out[offset:].float()


def _prompt_ids(source, prompt: str) -> list[int]:
    """As tunesmith generate feeds a prompt: the chat template with a generation prompt, or raw text for runs
    trained on prompt/completion or plain text."""
    if source.renderer.raw_prompts:
        return source.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return source.renderer.prompt_ids([{"role": "user", "content": prompt}], add_generation_prompt=True)
