"""The model an export starts from: the run's fine-tuned model in float32 on the CPU, and how to merge it.

Merging rules (what can become a plain transformers model that needs neither peft nor tunesmith):
- lora, dora, ia3: peft's `merge_and_unload` folds the adapter into the weights it modifies;
- full, freeze: the run saved a complete model already;
- prefix, prompt: the trained part is a sequence of virtual tokens (key/values or input embeddings) that is
  prepended at run time; no weight of the base model can hold it, so they export as adapters only;
- adapter (tunesmith's bottleneck adapters): `x + up(act(down(x)))` after attention/MLP outputs is a
  nonlinear function of its input, so it cannot be folded into the neighbouring linear weights, and peft-based
  servers do not load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import RunError
from tunesmith.run_dir import RunDir

MERGEABLE = ("lora", "dora", "ia3", "full", "freeze")
PEFT_ADAPTERS = ("lora", "dora", "ia3", "prefix", "prompt")

WHY_NOT_MERGEABLE = {
    "prefix": "prefix tuning trains virtual key/value tokens that are prepended at run time; no base weight can hold "
    "them",
    "prompt": "prompt tuning trains virtual input embeddings that are prepended at run time; no base weight can hold "
    "them",
    "adapter": "bottleneck adapters add a nonlinear function (x + up(act(down(x)))) after attention/MLP outputs, "
    "which cannot be folded into the model's linear weights",
}


@dataclass
class Source:
    run_dir: Path
    config: object  # tunesmith.config.Config
    method: str
    model: object  # the fine-tuned model (a PeftModel for peft methods), float32, CPU, eval mode
    tokenizer: object
    renderer: object  # its raw_prompts says whether the run is prompted with raw text


def check_exportable(run_dir: Path, kind: str) -> str:
    """The run's method, or RunError when `kind` ("merge", "gguf", "adapter") cannot be made from it."""
    from tunesmith.methods import saved_method

    method = saved_method(RunDir(run_dir).require_model("export"))
    if kind in ("merge", "gguf") and method not in MERGEABLE:
        why = WHY_NOT_MERGEABLE.get(method, f"method {method!r} cannot be merged")
        if method in PEFT_ADAPTERS:
            fix = f"export the adapter instead: tunesmith export {run_dir} --adapter-only --out DIR (peft's format)"
        else:
            fix = (
                "this run can only be used through tunesmith (tunesmith generate/chat/serve); retrain with "
                "method=lora to get a mergeable model"
            )
        what = "merged" if kind == "merge" else "written as GGUF (which needs merged weights)"
        raise RunError(f"{run_dir}: a {method} run cannot be {what}: {why}. {fix[0].upper()}{fix[1:]}")
    if kind == "adapter" and method not in PEFT_ADAPTERS:
        if method in ("full", "freeze"):
            fix = f"export the whole model instead: tunesmith export {run_dir} --merge --out DIR"
        else:
            fix = (
                "a merged export is not possible either, since " + WHY_NOT_MERGEABLE["adapter"] + "; use this run "
                "through tunesmith (tunesmith generate/chat), or retrain with method=lora"
            )
        raise RunError(
            f"{run_dir}: --adapter-only writes a peft adapter (what vLLM, LoRAX and peft load), but this run used "
            f"method={method}, which has no peft adapter. {fix[0].upper()}{fix[1:]}"
        )
    return method


def load_source(run_dir: Path, config, method: str) -> Source:
    """The run's fine-tuned model in float32 on the CPU (exports and their checks are done in full precision)."""
    from tunesmith import methods, models
    from tunesmith.data.templates import Renderer

    model, tokenizer = models.load(config.model.name, dtype="float32", device="cpu")
    model = methods.load_trained(model, run_dir / "model").eval()
    raw = RunDir(run_dir).raw_prompts
    renderer = Renderer(tokenizer, config.model.chat_template, config.data.system_prompt, raw_prompts=raw)
    return Source(run_dir, config, method, model, tokenizer, renderer)


def merged(source: Source):
    """A plain transformers model with the run's weights (peft adapters folded in). Consumes `source.model`."""
    model = source.model
    if source.method in ("lora", "dora", "ia3"):
        model = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaNs instead of writing them
    source.model = None
    return model.eval()
