"""`tunesmith eval` on one run in float32 and in bfloat16: wall time of each stage, the metrics, and how often the
bf16 predictions agree with the fp32 ones.

    .venv/bin/python bench/eval_precision.py runs/demo-ticket-triage            # the whole default eval, both dtypes
    .venv/bin/python bench/eval_precision.py RUN --dtypes float32 --repeats 2   # one dtype, timed twice

Each evaluation is `tunesmith eval RUN --dtype D --quiet` with the run's defaults (task systems, prompt selection,
forgetting probe) in its own process, on a copy of the run directory, so both write full eval/ folders and neither
sees the other's. The dtypes alternate when repeated. Agreement is per system of task.json: the share of test
examples whose output (the predicted label for label scoring, the generated text otherwise) is the same in both
dtypes; and for the forgetting probe, the share of the probe's answers that are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# a benchmark times measuring: never reuse a stored measurement (tunesmith/evaluation/memo.py)
os.environ["TUNESMITH_EVAL_CACHE"] = "0"

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished run directory")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra", default="", help="more `tunesmith eval` flags, e.g. '--no-forgetting'")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "model").is_dir():
        sys.exit(f"error: {run} is not a finished run (no model/); train one first, e.g. `make demo`")
    sys.path.insert(0, str(ROOT / "bench"))
    from train_speed import cpu_bf16, cpu_name

    print(f"CPU: {cpu_name()}; native bf16: {', '.join(cpu_bf16()) or 'none (bf16 is emulated)'}", flush=True)
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    results: dict[str, list[dict]] = {d: [] for d in dtypes}
    with tempfile.TemporaryDirectory(prefix="tunesmith-evalbench-") as work:
        for rep in range(args.repeats):
            for dtype in dtypes:
                copy = Path(work) / f"{dtype}-{rep}"
                shutil.copytree(run, copy, ignore=shutil.ignore_patterns("eval", "checkpoints", "report.html"))
                result = _eval(copy, dtype, args)
                results[dtype].append(result)
                stages = "  ".join(f"{k} {v:.0f}s" for k, v in result["stages"].items())
                print(f"repeat {rep + 1} {dtype:<9} {result['wall_s']:6.0f} s   {stages}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    _table(results)
    if len(dtypes) == 2:
        _agreement(results[dtypes[0]][0], results[dtypes[1]][0], dtypes)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _eval(run: Path, dtype: str, args) -> dict:
    cmd = [sys.executable, "-m", "tunesmith", "eval", str(run), "--dtype", dtype, "--quiet", *args.extra.split()]
    env = os.environ | {"TUNESMITH_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    stamps = []  # (seconds since start, line): the stage lines eval logs as it goes
    for line in proc.stdout:
        stamps.append((time.perf_counter() - t0, line.rstrip()))
    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(
            f"error: eval --dtype {dtype} failed (exit {proc.returncode}):\n"
            + "\n".join(line for _, line in stamps[-40:])
        )
    task = json.loads((run / "eval" / "task.json").read_text())
    examples = [json.loads(line) for line in (run / "eval" / "task_examples.jsonl").read_text().splitlines()]
    forgetting_file = run / "eval" / "forgetting.json"
    forgetting = None
    if forgetting_file.is_file():
        f = json.loads(forgetting_file.read_text())
        probe = [json.loads(line) for line in (run / "eval" / "forgetting_examples.jsonl").read_text().splitlines()]
        forgetting = {
            "perplexity": f["perplexity"],
            "kl_per_token": f["kl"]["mean_per_token"],
            "questions": {k: f["questions"][k] for k in ("base", "fine_tuned", "change")},
            "verdict": f["verdict"],
            "answers": {side: [r["outputs"][side] for r in probe] for side in ("base", "fine_tuned")},
        }
    return {
        "wall_s": wall,
        "stages": _stages(stamps, wall),
        "task": {e["key"]: e["metrics"][task["primary"]] for e in task["systems"]},
        "primary": task["primary"],
        "dtype": task.get("dtype"),
        "outputs": {str(r["id"]): r["outputs"] for r in examples},
        "forgetting": forgetting,
    }


def _stages(stamps: list[tuple[float, str]], wall: float) -> dict:
    """Seconds from the start to the task metrics, then the forgetting probe (from eval's log lines)."""
    task_end = next((t for t, line in stamps if "wrote" in line and "task.json" in line), None)
    out = {}
    if task_end is not None:
        out["task"] = task_end
        if any(re.search(r"forgetting", line) for _, line in stamps):
            out["forgetting"] = wall - task_end
    return out


def _table(results: dict[str, list[dict]]) -> None:
    import statistics

    print()
    first = next(iter(results.values()))[0]
    keys = list(first["task"])
    print(f"{'dtype':<9} {'wall s':>7} " + " ".join(f"{k:>17}" for k in keys) + f"   ({first['primary']})")
    for dtype, rs in results.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        print(f"{dtype:<9} {wall:>7.0f} " + " ".join(f"{rs[0]['task'][k]:>17.4f}" for k in keys))
        f = rs[0]["forgetting"]
        if f:
            summary = {k: v for k, v in f.items() if k != "answers"}
            print(f"          forgetting: {json.dumps(summary)}")


def _agreement(a: dict, b: dict, names: list[str]) -> None:
    print()
    print(f"agreement of {names[1]} with {names[0]} (same output on the same test example):")
    ids = [i for i in a["outputs"] if i in b["outputs"]]
    for key in a["task"]:
        same = sum(a["outputs"][i].get(key) == b["outputs"][i].get(key) for i in ids)
        delta = b["task"][key] - a["task"][key]
        print(f"  {key:<18} {same}/{len(ids)} = {same / max(len(ids), 1):.1%}   {a['primary']} {delta:+.4f}")
    fa, fb = a["forgetting"], b["forgetting"]
    if fa and fb:
        for side in fa["answers"]:
            xa, xb = fa["answers"][side], fb["answers"].get(side, [])
            same = sum(x == y for x, y in zip(xa, xb))
            print(f"  probe answers {side:<10} {same}/{len(xa)} identical")


if __name__ == "__main__":
    main()
