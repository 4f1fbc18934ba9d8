"""Memory per process of full fine-tuning on 1 process and on 2 (FSDP2), measured by the training code itself.

    python bench/fsdp_memory.py [--model smollm2-135m-instruct] [--steps 3]

Runs `tunesmith train --method full` through torch.distributed.run with 1 and then 2 processes (the same command
a user runs, with TUNESMITH_REPORT_MEMORY=1), a few short steps on the bundled ticket data, and prints what each
process held after its first optimizer step: its weights, gradients and AdamW state (FSDP: its shards; counted
from the tensors, so exact), and its peak RSS (which also holds the Python process, torch, the tokenizer, the
data, activations, one all-gathered layer and allocator slack). The run directories go to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"memory (after the first step|at the end), rank (\d+): (.*)")


def run(nproc: int, model: str, steps: int, out: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["-m", "tunesmith", "train", "--model", model, "--method", "full", "--data"]
    cmd += [str(ROOT / "data/ticket-triage/train.jsonl"), "--data.val_fraction", "0", "--output", str(out)]
    cmd += ["--max-steps", str(steps), "--batch-size", "4", "--data.max_length", "128", "--train.threads", "1"]
    cmd += ["--train.precision", "fp32", "--quiet"]
    env = {**os.environ, "TUNESMITH_REPORT_MEMORY": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    found: dict = {}
    for line in proc.stdout.splitlines():
        m = LINE.search(line)
        if m:
            print(line.strip())
            values = dict(re.findall(r"(\w+) ([\d.]+) MiB", m.group(3)))
            found.setdefault(int(m.group(2)), {}).update(
                {("end_" if m.group(1) == "at the end" else "") + k: float(v) for k, v in values.items()}
            )
    print(" ".join(cmd[1:]))
    return found, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2):
            found, elapsed = run(nproc, args.model, args.steps, Path(tmp) / f"n{nproc}")
            for rank, v in sorted(found.items()):
                rows.append((nproc, rank, v, elapsed))
    print(
        "\n| processes | rank | weights MiB | gradients MiB | AdamW state MiB | sum MiB | RSS after step 1 MiB "
        "| peak RSS MiB | wall s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for nproc, rank, v, elapsed in rows:
        total = v["weights"] + v["grads"] + v["optimizer"]
        print(
            f"| {nproc} | {rank} | {v['weights']:.1f} | {v['grads']:.1f} | {v['optimizer']:.1f} | {total:.1f} | "
            f"{v['rss']:.0f} | {v['end_peak_rss']:.0f} | {elapsed:.0f} |"
        )


if __name__ == "__main__":
    main()
