"""Export a run's model for use outside tunesmith, and prove the export computes what the run computes.

    export_run("runs/tickets", "exports/tickets", kind="merge")              # HF dir: transformers alone loads it
    export_run("runs/tickets", "exports/tickets-gguf", kind="gguf", quant="q8_0")   # one .gguf for llama.cpp
    export_run("runs/tickets", "exports/tickets-adapter", kind="adapter")    # peft adapter (vLLM, LoRAX)

Every export is written into a temporary directory next to `out`, read back by an independent loader and
compared with the run's own model (see `check`); only when the check passes is the directory renamed to `out`,
so a failed or interrupted export leaves nothing behind. The figures go to OUT/equivalence.json and a model
card with the training summary to OUT/README.md.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from tunesmith.atomic import atomic_dir
from tunesmith.errors import RunError, TunesmithError
from tunesmith.run_dir import RunDir

KINDS = ("merge", "gguf", "adapter")
CHECK_FILE = "equivalence.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SPECIAL_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding", "eot": "eot"}  # GGUF key names


class ExportCheckFailed(TunesmithError):
    """The export does not reproduce the run's model within tolerance; nothing was written."""

    exit_code = 1


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    kind: str,
    quant: str = "f16",
    force: bool = False,
    llama_cpp: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Export `run_dir` into the directory `out` as `kind` (merge, gguf, adapter); returns the check's figures
    with `out` and `files`. llama_cpp (gguf only): also run the file in llama.cpp (exporting/llama_cpp.py) and
    require its greedy answers to be the run's. Raises RunError for unusable input and ExportCheckFailed when the
    check fails."""
    from tunesmith.exporting import check
    from tunesmith.exporting import source as src

    run_dir, out = Path(run_dir), Path(out)
    if kind not in KINDS:
        raise RunError(f"unknown export kind {kind!r}; use one of {', '.join(KINDS)}")
    config = RunDir.open(run_dir).config
    _check_out(run_dir, out, force)
    if kind == "gguf":
        from tunesmith.exporting.gguf_file import QUANTS

        if quant not in QUANTS:
            raise RunError(f"--quant {quant!r} is not supported; use one of {', '.join(QUANTS)}")
    if llama_cpp:
        from tunesmith.exporting.llama_cpp import require

        if kind != "gguf":
            raise RunError("--llama-cpp runs a GGUF file in llama.cpp: add --format gguf")
        require()
    method = src.check_exportable(run_dir, kind)

    started = time.perf_counter()
    log(f"loading {run_dir} ({method} on {config.model.name}) in float32")
    source = src.load_source(run_dir, config, method)
    log(f"reference: the run's model on {len(check.PROMPTS)} prompts ({check.NEW_TOKENS} greedy tokens each)")
    reference = check.Reference(source, f"gguf-{quant}" if kind == "gguf" else kind)

    with atomic_dir(out) as tmp:
        if kind == "merge":
            result = _export_merged(source, reference, tmp, log)
        elif kind == "gguf":
            result = _export_gguf(source, reference, tmp, quant, log, llama_cpp)
        else:
            result = _export_adapter(source, reference, tmp, log)
        files = sorted(p.name for p in tmp.iterdir()) + [CHECK_FILE, "README.md"]
        result.update(_provenance(run_dir, config, method, quant if kind == "gguf" else None))
        (tmp / CHECK_FILE).write_text(json.dumps(result, indent=2) + "\n")
        log(check.summary(result))
        if not result["passed"]:
            raise ExportCheckFailed(_failure(result, out))
        from tunesmith.exporting.card import model_card

        (tmp / "README.md").write_text(
            model_card(run_dir, config, method, kind, files, result, quant if kind == "gguf" else None)
        )
    log(f"exported to {out} in {time.perf_counter() - started:.0f} s: {', '.join(files)}")
    return {**result, "out": str(out), "files": files}


# ---- the three exports ----------------------------------------------------------------------------------------


def _export_merged(source, reference, tmp: Path, log) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.exporting import check
    from tunesmith.exporting.source import merged

    log("merging" if source.method in ("lora", "dora", "ia3") else f"{source.method} run: the weights are complete")
    model = merged(source)
    _set_generation_config(model, source)
    model.save_pretrained(tmp)
    del model
    tokenizer = source.tokenizer
    tokenizer.chat_template = source.renderer.chat_template
    tokenizer.save_pretrained(tmp)

    log("checking: reloading the directory with transformers alone")
    exported = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    result = check.compare(reference, exported, "merge")
    result["reader"] = "transformers AutoModelForCausalLM.from_pretrained (no peft, no tunesmith)"
    result["tokenizer"] = _tokenizer_check(source, AutoTokenizer.from_pretrained(tmp))
    result["passed"] = result["passed"] and result["tokenizer"]["passed"]
    return result


def _export_gguf(source, reference, tmp: Path, quant: str, log, llama_cpp: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.exporting import check
    from tunesmith.exporting.gguf_file import architecture, write_gguf
    from tunesmith.exporting.source import merged
    from tunesmith.exporting.vocab import build_vocab

    if source.method in ("lora", "dora", "ia3"):
        log("merging")
    model = merged(source)
    architecture(model)  # refuse an unsupported architecture before any work
    renderer = source.renderer
    vocab = build_vocab(
        source.tokenizer, model.config.vocab_size, renderer.chat_template, renderer.adds_bos, renderer.stop_token_ids
    )
    for warning in vocab.warnings:
        log(f"warning: {warning}")
    name = f"{source.run_dir.resolve().name}-{quant}.gguf"
    info = write_gguf(model, vocab, tmp / name, quant, source.run_dir.resolve().name, log)
    in_llama_cpp = None
    if llama_cpp:
        from tunesmith.exporting import llama_cpp as lc

        log("checking: running the GGUF in llama.cpp (greedy) against the run's float32 logits along its tokens")
        in_llama_cpp = lc.check_in_llama_cpp(model, tmp / name, reference.prompts, f"gguf-{quant}", check.NEW_TOKENS)
        log(lc.summary(in_llama_cpp))
    del model

    log("checking: reading the GGUF back with transformers' GGUF loader")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=name, dtype=torch.float32).eval()
    result = check.compare(reference, exported, f"gguf-{quant}")
    result["reader"] = "transformers GGUF loader (from_pretrained(dir, gguf_file=...)), dequantizing with gguf-py"
    result["gguf"] = {"file": name, **info}
    result["tokenizer"] = _gguf_tokenizer_check(tmp / name, vocab)
    result["warnings"] = vocab.warnings
    result["passed"] = result["passed"] and result["tokenizer"]["passed"]
    if in_llama_cpp is not None:
        result["llama_cpp"] = in_llama_cpp
        result["passed"] = result["passed"] and in_llama_cpp["passed"]
    return result


def _export_adapter(source, reference, tmp: Path, log) -> dict:
    from peft import PeftModel

    from tunesmith import models
    from tunesmith.exporting import check

    model_dir = source.run_dir / "model"
    for name in ADAPTER_FILES:
        shutil.copy2(model_dir / name, tmp / name)
    source.model = None  # free it before loading a second base model

    log("checking: loading the adapter with peft onto a fresh base model")
    base, _ = models.load(source.config.model.name, dtype="float32", device="cpu")
    exported = PeftModel.from_pretrained(base, tmp).eval()
    result = check.compare(reference, exported, "adapter")
    result["reader"] = "peft PeftModel.from_pretrained on the base model"
    result["adapter"] = json.loads((tmp / "adapter_config.json").read_text()).get("peft_type")
    return result


# ---- pieces -----------------------------------------------------------------------------------------------------


def _set_generation_config(model, source) -> None:
    """Stop at the end of the assistant's turn, as tunesmith generate does, and decode greedily by default."""
    gen = model.generation_config
    stops = source.renderer.stop_token_ids
    if stops:
        gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = source.tokenizer.pad_token_id


def _tokenizer_check(source, exported) -> dict:
    """The exported tokenizer splits the prompts into the same ids, and its chat template renders them the same."""
    from tunesmith.exporting.check import PROMPTS

    ids_same = template_same = True
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = source.renderer.prompt_text(messages, add_generation_prompt=True)
        ids_same &= (
            exported(text, add_special_tokens=False)["input_ids"]
            == source.tokenizer(text, add_special_tokens=False)["input_ids"]
        )
        if not source.config.data.system_prompt:  # the template alone does not add the run's system prompt
            template_same &= exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    return {"same_ids": ids_same, "same_chat_template_output": template_same, "passed": ids_same and template_same}


def _gguf_tokenizer_check(path: Path, vocab) -> dict:
    """Read the tokenizer metadata back with gguf-py's reader and compare it with what we meant to write."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def strings(key):
        field = reader.fields.get(key)
        return None if field is None else [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def scalar(key):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    checks = {
        "model": scalar("tokenizer.ggml.model") == vocab.model,
        "pre": scalar("tokenizer.ggml.pre") == vocab.pre,
        "tokens": strings("tokenizer.ggml.tokens") == vocab.tokens,
        "merges": (strings("tokenizer.ggml.merges") or []) == vocab.merges,
        "chat_template": scalar("tokenizer.chat_template") == vocab.chat_template,
        "special_ids": all(scalar(f"tokenizer.ggml.{SPECIAL_KEYS[k]}_token_id") == v for k, v in vocab.special.items()),
    }
    return {
        "tokenizer_model": vocab.model,
        "pre_tokenizer": vocab.pre,
        "tokens": len(vocab.tokens),
        "merges": len(vocab.merges),
        **{f"same_{k}": v for k, v in checks.items()},
        "passed": all(checks.values()),
    }


def _provenance(run_dir: Path, config, method: str, quant: str | None) -> dict:
    import torch
    import transformers

    import tunesmith

    return {
        "run": str(run_dir.resolve()),
        "method": method,
        "base_model": config.model.name,
        "quant": quant,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "tunesmith": tunesmith.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }


def _failure(result: dict, out: Path) -> str:
    lines = [
        f"the export does not match the run, so nothing was written to {out}:",
        f"max |logit diff| {result['max_abs_logit_diff']:.4g} (tolerance {result['tolerance']:.3g}), "
        f"greedy outputs {'identical' if result['greedy_identical'] else 'different'}",
    ]
    for p in result["prompts"]:
        if not p["greedy_identical"]:
            lines.append(f"  {p['prompt']!r}: run {p['run_greedy']!r} vs export {p['export_greedy']!r}")
    for what in ("tokenizer",):
        if what in result and not result[what]["passed"]:
            lines.append(f"  {what} check failed: {result[what]}")
    if "llama_cpp" in result and not result["llama_cpp"]["passed"]:
        from tunesmith.exporting.llama_cpp import summary

        lines.append(f"  {summary(result['llama_cpp'])}")
        for prompt, row in zip(result["prompts"], result["llama_cpp"]["prompts"]):
            if row["first_difference"] is not None and row["margin_there"] > result["llama_cpp"]["near_tie"]:
                lines.append(
                    f"  {prompt['prompt']!r}: llama.cpp first differs at token {row['first_difference']}, where the "
                    f"run prefers its own token by {row['margin_there']:.3g} (not a near-tie)"
                )
    quantized = result["kind"] in ("gguf-f16", "gguf-q8_0")
    if quantized and result["max_abs_logit_diff"] <= result["tolerance"] and result.get("tokenizer", {}).get("passed"):
        lines.append(
            "The logits agree within the tolerance, but rounding the weights changed which token wins "
            "somewhere (two candidates nearly tied); export with a finer --quant (f16, f32) to keep the "
            "run's outputs."
        )
    else:
        lines.append("This is a bug in tunesmith's exporter; please report it with the run's config.yaml.")
    return "\n".join(lines)


def _check_out(run_dir: Path, out: Path, force: bool) -> None:
    run, target = run_dir.resolve(), out.resolve()
    if target == run or target in run.parents:
        raise RunError(
            f"--out {out} would replace the run directory {run_dir} (or a folder holding it); choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RunError(
            f"--out {out} already exists and is not empty; choose another --out, or pass --force to replace it"
        )
