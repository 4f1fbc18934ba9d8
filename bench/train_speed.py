"""Training speed: tunesmith against Hugging Face Trainer + peft on the same data, in one invocation.

    .venv/bin/python bench/train_speed.py                 # defaults: what `make bench` runs
    .venv/bin/python bench/train_speed.py --repeats 5 --steps 10 --json out.json

Every measured run is its own subprocess (so its peak RSS, `ru_maxrss`, is its own), and the variants are
interleaved: repeat 1 runs each variant once, then repeat 2, ... so load that comes and goes on a shared
machine hits all of them alike. What is held identical (bench/RESULTS.md and shared/BENCHMARKING.md):
model and tokenizer, the chat template and loss mask (tunesmith's Renderer encodes the examples for both),
max length, the examples and their seeded order (the baseline gets tunesmith's epoch order with a
sequential sampler), the effective batch (no accumulation), the LoRA config and its initialisation
(tunesmith.methods.apply_method, i.e. peft's get_peft_model after the same seed), AdamW (torch, betas
0.9/0.999, eps 1e-8, no weight decay), a constant learning rate, gradient clipping at 1.0, fp32, threads.

Variants:
  ts          tunesmith: packed rows, LM head only at labelled positions, shared prefix encoded once
  ts-noshare  tunesmith without prefix sharing (what the shared prefix is worth)
  ts-nochunk  tunesmith with the LM head and loss in one piece (what chunked cross-entropy is worth; it only
              engages with many labelled positions: run with --data data/debian-docs)
  ts-nofuse   tunesmith with peft's own LoRA forward instead of the fused one (what methods/lora_fused.py is worth)
  ts-noseg    tunesmith with attention over whole packed rows under their block-diagonal mask, instead of per
              example (what models/segments.py is worth)
  hf          Trainer + peft (peft's own LoRA forward), dynamic padding (DataCollatorForSeq2Seq), examples in
              the same order
  hf-group    the same with train_sampling_strategy="group_by_length" (Trainer's length grouping)
  ts-full / hf-full   full fine-tuning, tunesmith and Trainer
  ts-bf16     tunesmith with train.precision bf16-mixed (autocast to bf16; fp32 weights, AdamW state, LM head, loss)
  hf-bf16     Trainer + peft with bf16=True (its autocast to bf16: the fair counterpart of ts-bf16)
  ts-full-bf16 / hf-full-bf16   full fine-tuning in bf16-mixed / Trainer bf16=True

Every variant without -bf16 runs in fp32 (tunesmith's train.precision auto would pick bf16-mixed on a CPU with
native bf16). The bf16 variants need such a CPU to mean anything: the header says which bf16 instructions the
CPU has (AVX512-BF16, AMX-BF16) or that it has none, in which case bf16 is emulated and slow.

Useful tokens: the tokens of the training examples (no padding), counted once per example even where
tunesmith encodes a shared prefix once. Per-step useful tokens/s are taken from step 2 on (step 1 is
warm-up) and their median is the run's figure; the table shows the median over repeats. GFLOP/s is work
actually done (forward + backward matmuls: 4 FLOPs per parameter per token for LoRA, 6 for full
fine-tuning, counting padded positions and the LM head only where it runs; attention scores left out)
against a 2048x2048 fp32 matmul timed in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = (
    "ts",
    "ts-noshare",
    "ts-nochunk",
    "ts-nofuse",
    "ts-noseg",
    "hf",
    "hf-group",
    "ts-full",
    "hf-full",
    "ts-bf16",
    "hf-bf16",
    "ts-full-bf16",
    "hf-full-bf16",
)
SEED = 42


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--data", default=str(ROOT / "data" / "ticket-triage"), help="folder with train/validation.jsonl"
    )
    parser.add_argument("--examples", type=int, default=64, help="training examples (steps x batch at most)")
    parser.add_argument("--val", type=int, default=32, help="validation examples for the final validation loss")
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step (no accumulation)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per LoRA run")
    parser.add_argument("--full-steps", type=int, default=4, help="optimizer steps per full fine-tuning run")
    parser.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate (full: a tenth of it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="ts,ts-noshare,hf,hf-group,ts-full,hf-full")
    parser.add_argument("--full-repeats", type=int, default=2, help="repeats of the full fine-tuning variants")
    parser.add_argument("--json", help="also write every run's numbers here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run_worker(args.worker, args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    full_repeats = args.full_repeats
    print(
        f"load average before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}", flush=True
    )
    ceiling = matmul_gflops(args.threads)
    print(f"fp32 2048x2048 matmul, {args.threads} threads: {ceiling:.1f} GFLOP/s", flush=True)
    print(f"CPU: {cpu_name()}; native bf16: {', '.join(cpu_bf16()) or 'none (bf16 is emulated)'}", flush=True)
    if any("bf16" in v for v in variants):
        print(f"bf16 2048x2048 matmul: {matmul_gflops(args.threads, dtype='bfloat16'):.1f} GFLOP/s", flush=True)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as work:
        for rep in range(max(args.repeats, full_repeats)):
            for v in variants:
                if rep >= (full_repeats if _full(v) else args.repeats):
                    continue
                result = spawn(v, args, Path(work) / f"{v}-{rep}")
                runs[v].append(result)
                print(
                    f"repeat {rep + 1} {v:<10} {result['tokens_per_s']:7.1f} useful tok/s  "
                    f"peak RSS {result['peak_rss_mb']:6.0f} MB  first loss {result['first_loss']:.6f}  "
                    f"val loss {result['val_loss']:.6f}  ({result['wall_s']:.0f} s)",
                    flush=True,
                )
    ceiling_after = matmul_gflops(args.threads)
    print(f"fp32 matmul again at the end: {ceiling_after:.1f} GFLOP/s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "matmul_gflops": [ceiling, ceiling_after], "runs": runs}, indent=2)
        )
    print_table(runs, (ceiling + ceiling_after) / 2)


# ----------------------------------------------------------------------------------------------------
# The parent: spawn, summarise, print


def spawn(variant: str, args, workdir: Path) -> dict:
    workdir.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir)]
    for key in ("model", "data", "examples", "val", "batch", "steps", "full_steps", "lr", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(
            f"error: the {variant} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = time.perf_counter() - t0
    return result


def print_table(runs: dict[str, list[dict]], ceiling: float) -> None:
    def med(v, key):
        return statistics.median(r[key] for r in runs[v])

    print()
    print(
        f"{'variant':<11} {'runs':>4} {'useful tok/s':>12} {'vs hf':>6} {'vs group':>8} {'peak RSS MB':>11} {'vs hf':>6}"
        f" {'first loss':>10} {'val loss':>9} {'GFLOP/s':>8} {'of matmul':>9}"
    )
    for v, rs in runs.items():
        if not rs:
            continue
        base = _baseline(v)
        group = None if _full(v) else "hf-group"
        tps = med(v, "tokens_per_s")
        ratio = lambda b, key, v=v: f"{med(v, key) / med(b, key):.2f}x" if runs.get(b) else "-"  # noqa: E731
        gflops = med(v, "gflops")
        print(
            f"{v:<11} {len(rs):>4} {tps:>12.1f} {ratio(base, 'tokens_per_s'):>6} "
            f"{ratio(group, 'tokens_per_s') if group else '-':>8} {med(v, 'peak_rss_mb'):>11.0f} "
            f"{ratio(base, 'peak_rss_mb'):>6} {rs[0]['first_loss']:>10.6f} {med(v, 'val_loss'):>9.5f} "
            f"{gflops:>8.1f} {gflops / ceiling:>8.0%}"
        )
    for v in runs:
        base = _baseline(v)
        if v != base and runs[v] and runs.get(base):
            d_first = abs(runs[v][0]["first_loss"] - runs[base][0]["first_loss"])
            d_val = abs(med(v, "val_loss") - med(base, "val_loss")) / med(base, "val_loss")
            print(f"{v}: first-step loss differs from {base} by {d_first:.2e}; final validation loss by {d_val:.2%}")
    for mixed, plain in (
        ("ts-bf16", "ts"),
        ("ts-full-bf16", "ts-full"),
        ("hf-bf16", "hf"),
        ("hf-full-bf16", "hf-full"),
    ):
        if runs.get(mixed) and runs.get(plain):
            speed = med(mixed, "tokens_per_s") / med(plain, "tokens_per_s")
            rss = med(mixed, "peak_rss_mb") / med(plain, "peak_rss_mb")
            d_first = abs(runs[mixed][0]["first_loss"] - runs[plain][0]["first_loss"]) / runs[plain][0]["first_loss"]
            d_val = (med(mixed, "val_loss") - med(plain, "val_loss")) / med(plain, "val_loss")
            print(
                f"{mixed} vs {plain} (fp32): {speed:.2f}x useful tok/s, {rss:.2f}x peak RSS, first-step loss "
                f"{d_first:.2e} relative, validation loss {d_val:+.2%}"
            )


def cpu_name() -> str:
    from tunesmith.models.precision import cpu_name as name

    return name()


def cpu_bf16() -> list[str]:
    from tunesmith.models.precision import cpu_bf16_features

    return cpu_bf16_features()


def matmul_gflops(threads: int, n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------------------------------
# The workers: one measured run each, in its own process


def run_worker(variant: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    train_file, val_file = _subset(args, workdir)
    if variant.startswith("ts"):
        return _tunesmith_run(variant, args, workdir, train_file, val_file)
    return _hf_run(variant, args, workdir, train_file, val_file)


def _subset(args, workdir: Path) -> tuple[Path, Path]:
    """The first N training and validation lines, written where both tools read them."""
    data = Path(args.data)
    out = []
    for name, n in (("train", args.examples), ("validation", args.val)):
        lines = (data / f"{name}.jsonl").read_text().splitlines()[:n]
        path = workdir / f"{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        out.append(path)
    return out[0], out[1]


def _full(variant: str) -> bool:
    return "-full" in variant


def _baseline(variant: str) -> str:
    """The Trainer run a variant is compared with: same method and precision."""
    return ("hf-full" if _full(variant) else "hf") + ("-bf16" if variant.endswith("bf16") else "")


def _steps(variant: str, args) -> int:
    return args.full_steps if _full(variant) else args.steps


def _lr(variant: str, args) -> float:
    return args.lr / 10 if _full(variant) else args.lr


def _tunesmith_run(variant: str, args, workdir: Path, train_file: Path, val_file: Path) -> dict:
    import tunesmith
    from tunesmith.training import prefix

    if variant == "ts-noshare":
        prefix.MIN_PREFIX_TOKENS = 0  # 0 turns sharing off (training/loop.py reads it per run)
    if variant == "ts-nochunk":
        from tunesmith.training import chunked_loss

        chunked_loss.should_chunk = lambda model, n_keep: False
    if variant == "ts-noseg":
        from tunesmith.models import segments

        segments.usable = lambda model: False
    if variant == "ts-nofuse":
        from tunesmith.methods import lora_fused

        lora_fused.fuse_lora = lambda model: 0  # peft_methods imports it at call time
    steps = _steps(variant, args)
    config = {
        "model": {"name": args.model},
        "method": "full" if _full(variant) else "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target": "all-linear"},
        "data": {"train": str(train_file), "validation": str(val_file)},
        "train": {
            "batch_size": args.batch,
            "micro_batch_size": args.batch,
            "max_steps": steps,
            "lr": _lr(variant, args),
            "warmup": 0,
            "schedule": "constant",
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": SEED,
            "eval_every": steps,
            "save_every": steps,
            "threads": args.threads,
            "batching": "pack",
            "precision": "bf16-mixed" if variant.endswith("bf16") else "fp32",
        },
        "output": str(workdir / "run"),
    }
    run = tunesmith.train(config, quiet=True, log=lambda *a: None)
    peak = _peak_rss_mb()  # before _work_flops loads the model again
    records = [json.loads(line) for line in (Path(run.path) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    return _summary(
        [r["tokens_per_s"] for r in train],
        train[0]["loss"],
        evals[-1]["val_loss"],
        _work_flops(variant, run.path, args),
        peak,
    )


def _work_flops(variant: str, run_dir, args) -> float:
    """FLOPs per useful token actually done by tunesmith's layout: rebuild the batches of the run's steps."""
    from tunesmith import models
    from tunesmith.data.batching import make_batches, step_indices
    from tunesmith.training import loop, prefix

    model, tokenizer = models.load(args.model, dtype="float32", device="cpu")
    encoded = _encode(args.model, tokenizer, Path(args.workdir) / "train.jsonl")
    lengths = [len(e.input_ids) for e in encoded]
    steps = step_indices(lengths, args.batch, SEED, 0, "pack")[: _steps(variant, args)]
    body, head = _param_counts(model)
    k = 6 if _full(variant) else 4
    flops = useful = 0
    for step in steps:
        for b in make_batches(
            [encoded[i] for i in step],
            "pack",
            args.batch,
            0,
            loop.ROW_TOKENS,
            prefix.MIN_PREFIX_TOKENS,
            loop.SHARED_ROW_TOKENS,
        ):
            computed = b.input_ids.numel() + (b.prefix_ids.numel() if b.prefix_ids is not None else 0)
            flops += k * (body * computed + head * b.n_targets)
            useful += b.n_tokens
    return flops / useful


def _param_counts(model) -> tuple[int, int]:
    """Parameters used per token in the body (embedding lookups are free) and in the LM head."""
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return total - embed - (0 if tied else head), head


def _encode(model_name: str, tokenizer, path: Path):
    from tunesmith.config import validate_config
    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer

    cfg = validate_config({"model": {"name": model_name}})
    renderer = Renderer(tokenizer, cfg.model.chat_template, cfg.data.system_prompt)
    return [renderer.encode(e, max_length=2048, truncation="error") for e in read_examples(str(path), "auto")]


def _hf_run(variant: str, args, workdir: Path, train_file: Path, val_file: Path) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from tunesmith import methods, models
    from tunesmith.config import validate_config
    from tunesmith.data.batching import epoch_order
    from tunesmith.methods import lora_fused

    lora_fused.fuse_lora = lambda model: 0  # Trainer + peft as peft computes it, not with tunesmith's fused layer
    model, tokenizer = models.load(args.model, dtype="float32", device="cpu")
    tokenizer.padding_side = "right"  # positions count from 0 in every row, as in training
    body, head = _param_counts(model)
    full = _full(variant)
    if not full:
        # the same peft LoRA, initialised from the same seed, as the tunesmith run
        cfg = validate_config(
            {"model": {"name": args.model}, "method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}
        )
        torch.manual_seed(SEED)
        model = methods.apply_method(model, cfg, tokenizer=tokenizer)
    encoded = _encode(args.model, tokenizer, train_file)
    order = epoch_order(len(encoded), SEED, 0)  # tunesmith's order for epoch 0
    train = [
        {"input_ids": encoded[i].input_ids, "labels": encoded[i].labels, "attention_mask": [1] * len(encoded[i])}
        for i in order
    ]

    seq2seq = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    shapes: list[tuple[int, int]] = []  # (useful tokens, padded positions) of each batch, in step order

    def collate(features):
        batch = seq2seq(features)
        shapes.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    class LossTrainer(Trainer):
        losses: list[float] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if return_outputs else out
            self.losses.append(float(loss.detach()))
            return out

    steps = _steps(variant, args)
    training_args = TrainingArguments(
        output_dir=str(workdir / "hf"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=_lr(variant, args),
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        train_sampling_strategy="group_by_length" if variant == "hf-group" else "sequential",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=SEED,
        use_cpu=True,
        bf16=variant.endswith("bf16"),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    clock = Clock()
    trainer = LossTrainer(
        model=model, args=training_args, train_dataset=train, data_collator=collate, callbacks=[clock]
    )
    trainer.train()
    useful = [u for u, _ in shapes[:steps]]
    padded = [p for _, p in shapes[:steps]]
    k = 6 if full else 4
    flops_per_useful = k * (body + head) * sum(padded) / sum(useful)
    val_loss = _hf_val_loss(model, tokenizer, _encode(args.model, tokenizer, val_file), seq2seq, args.batch)
    peak = _peak_rss_mb()
    return _summary([u / t for u, t in zip(useful, clock.times)], trainer.losses[0], val_loss, flops_per_useful, peak)


def _hf_val_loss(model, tokenizer, encoded, collator, batch_size: int) -> float:
    """Mean cross-entropy over the labelled tokens of the validation examples (tunesmith's val_loss)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            batch = collator(
                [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e)} for e in chunk]
            )
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
                )
            )
            n += int((targets != -100).sum())
    return total / n


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _summary(
    step_rates: list[float], first_loss: float, val_loss: float, flops_per_useful_token: float, peak_rss_mb: float
) -> dict:
    steady = step_rates[1:] or step_rates
    tps = statistics.median(steady)
    return {
        "tokens_per_s": tps,
        "step_tokens_per_s": step_rates,
        "peak_rss_mb": peak_rss_mb,
        "first_loss": first_loss,
        "val_loss": val_loss,
        "flops_per_useful_token": flops_per_useful_token,
        "gflops": tps * flops_per_useful_token / 1e9,
    }


if __name__ == "__main__":
    main()
