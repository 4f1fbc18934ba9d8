"""Memory of one training micro-batch on raw text: chunked LM head + cross-entropy against the plain head.

    .venv/bin/python bench/lm_memory.py                      # 2 Debian passages per micro-batch, LoRA r16
    .venv/bin/python bench/lm_memory.py --examples 8 --method full

Each variant runs in its own process (so its peak RSS is its own): load the model, apply the method, build
one packed micro-batch from data/debian-docs (every position labelled), run tunesmith's training forward and
backward once; variants alternate, `--repeats` times (peak RSS moves by a few hundred MB between identical
runs, so one run says little). Printed per variant (medians): bytes autograd saved for the backward pass (counted once per storage
through `saved_tensors_hooks`), peak RSS, its rise over the loaded model, and the loss (both variants must
agree). `activation_bytes_per_token` (training/auto.py, the auto micro-batch's memory cap) is printed beside
the measured rise per token, to check the estimate.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(ROOT / "data" / "debian-docs" / "train.jsonl"))
    parser.add_argument("--examples", type=int, default=2, help="passages in the micro-batch")
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, interleaved; medians are shown")
    parser.add_argument("--worker", choices=["chunked", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return
    runs: dict[str, list[dict]] = {"chunked": [], "plain": []}
    for _ in range(args.repeats):
        for variant in runs:
            cmd = [sys.executable, __file__, "--worker", variant]
            for key in ("model", "data", "examples", "method", "threads"):
                cmd += [f"--{key}", str(getattr(args, key))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"error: the {variant} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(lines[-1][len("RESULT ") :]))
            r = runs[variant][-1]
            print(f"{variant:<8} peak RSS {r['peak_rss_mb']:6.0f} MB  rise {r['rise_mb']:6.0f} MB", flush=True)
    rows = [
        {**v[0], **{k: statistics.median(r[k] for r in v) for k in ("saved_mb", "peak_rss_mb", "rise_mb")}}
        for v in runs.values()
    ]
    r0 = rows[0]
    if not r0["engaged"]:
        print("note: the chunked path did not engage (too few labelled positions): both rows ran the plain head")
    print(
        f"{args.method}, {r0['tokens']} tokens in {args.examples} passages, {r0['labelled']} labelled, "
        f"vocabulary {r0['vocab']:,}; estimate (auto.activation_bytes_per_token): {r0['estimate_mb_per_token']:.2f} MB/token"
    )
    print(
        f"{'variant':<8} {'saved for backward':>19} {'peak RSS':>9} {'rise over model':>16} {'rise/token':>11} {'loss':>10}"
    )
    for r in rows:
        print(
            f"{r['variant']:<8} {r['saved_mb']:>16.0f} MB {r['peak_rss_mb']:>6.0f} MB {r['rise_mb']:>13.0f} MB "
            f"{r['rise_mb'] / r['tokens']:>8.2f} MB {r['loss']:>10.6f}"
        )
    plain, chunked = rows[1], rows[0]
    print(
        f"chunked / plain: saved {chunked['saved_mb'] / plain['saved_mb']:.2f}x, peak RSS "
        f"{chunked['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x, rise {chunked['rise_mb'] / plain['rise_mb']:.2f}x"
    )


def run_worker(args) -> dict:
    import torch

    from tunesmith import methods, models
    from tunesmith.config import validate_config
    from tunesmith.data.batching import make_batches
    from tunesmith.data.formats import read_examples
    from tunesmith.data.templates import Renderer
    from tunesmith.training import chunked_loss, loop
    from tunesmith.training.auto import activation_bytes_per_token

    torch.set_num_threads(args.threads)
    if args.worker == "plain":
        chunked_loss.should_chunk = lambda model, n_keep: False
    cfg = validate_config(
        {
            "model": {"name": args.model},
            "method": args.method,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target": "all-linear"},
        }
    )
    model, tokenizer = models.load(args.model, dtype="float32", device="cpu")
    renderer = Renderer(tokenizer, cfg.model.chat_template, cfg.data.system_prompt)
    examples = read_examples(args.data, "auto")[: args.examples]
    encoded = [renderer.encode(e, max_length=512, truncation="error") for e in examples]
    torch.manual_seed(0)
    model = methods.apply_method(model, cfg, tokenizer=tokenizer).train()
    (batch,) = make_batches(encoded, "pack", len(encoded), tokenizer.pad_token_id, 512, 0, 512)
    before = _peak_rss_mb()

    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() not in seen:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ctx = type(
        "Ctx",
        (),
        {
            "model": model,
            "kl": None,
            "virtual_tokens": 0,
            "device": torch.device("cpu"),
            "dtype": torch.float32,
            "autocast": False,
        },
    )()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loop._forward(ctx, batch)
    (loss / batch.n_targets).backward()
    saved = sum(n for ptr, n in seen.items() if ptr not in params)
    head = model.get_output_embeddings()
    return {
        "variant": args.worker,
        "engaged": chunked_loss.should_chunk(model, int(batch.n_targets)),
        "tokens": int(batch.n_tokens),
        "labelled": int(batch.n_targets),
        "vocab": head.out_features,
        "saved_mb": saved / 2**20,
        "peak_rss_mb": _peak_rss_mb(),
        "rise_mb": _peak_rss_mb() - before,
        "loss": loss.item() / batch.n_targets,
        "estimate_mb_per_token": activation_bytes_per_token(model.config) / 2**20,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
