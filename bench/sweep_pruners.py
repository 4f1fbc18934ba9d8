"""Which pruner wastes less compute here: the same sweep (recipe, seed, budget) run with each pruner.

    .venv/bin/python bench/sweep_pruners.py RECIPE.yaml --trials 12 [--budget 20m] [--pruners median hyperband]
        [--out DIR] [-- --train.threads 1 ...]     # after --: more flags for `tunesmith sweep`
    .venv/bin/python bench/sweep_pruners.py --summarize DIR/median DIR/hyperband   # tables of finished sweeps

Each pruner's sweep runs in its own process, one after the other, on the objective val_loss (pruning follows the
validation loss). Printed per pruner: trials started, finished, pruned, not started; the training examples the
sweep went through in all and per finished trial; the share of that compute spent on trials that were then pruned;
the best validation loss found and when (trial number and minutes into the sweep). "Wastes less compute" = fewer
training examples spent on trials that did not finish, for a best result at least as good.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path


def summarize(folder: Path) -> dict:
    s = json.loads((folder / "sweep.json").read_text())
    trials = s["trials"]
    by_state: dict[str, int] = {}
    for t in trials:
        by_state[t["state"]] = by_state.get(t["state"], 0) + 1
    seen = sum(t.get("examples_seen", 0) for t in trials)
    pruned_seen = sum(t.get("examples_seen", 0) for t in trials if t["state"] == "pruned")
    done = [t for t in trials if t["state"] == "complete"]
    best = min(done, key=lambda t: t["values"][0]) if done else None
    start = min((datetime.fromisoformat(t["started"]) for t in trials if t["started"]), default=None)
    found = None
    if best and start and best.get("finished"):
        found = (datetime.fromisoformat(best["finished"]) - start).total_seconds() / 60
    return {
        "sweep": str(folder),
        "pruner": s["pruner"],
        "trials": len(trials),
        "states": by_state,
        "examples_seen": seen,
        "examples_per_finished_trial": round(seen / len(done)) if done else None,
        "share_spent_on_pruned": round(pruned_seen / seen, 3) if seen else None,
        "best_val_loss": best["values"][0] if best else None,
        "best_trial": best["number"] if best else None,
        "best_found_after_min": round(found, 1) if found is not None else None,
        "elapsed_min": round(s["elapsed_seconds"] / 60, 1),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| pruner | trials | complete / pruned / not started | training examples | per finished trial | "
        "spent on pruned | best val_loss (trial, min) | minutes |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        st = r["states"]
        lines.append(
            f"| {r['pruner']} | {r['trials']} | {st.get('complete', 0)} / {st.get('pruned', 0)} / "
            f"{st.get('not started', 0)} | {r['examples_seen']:,} | {r['examples_per_finished_trial']} | "
            f"{r['share_spent_on_pruned']:.0%} | {r['best_val_loss']:.4f} ({r['best_trial']}, "
            f"{r['best_found_after_min']}) | {r['elapsed_min']} |"
        )
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?")
    ap.add_argument("--budget", help="optional: a wall-clock budget per sweep (default: none, --trials decides)")
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--pruners", nargs="+", default=["median", "hyperband"])
    ap.add_argument("--out", default="sweeps/pruners")
    ap.add_argument("--summarize", nargs="+", type=Path)
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.summarize:
        rows = [summarize(f) for f in args.summarize]
    else:
        if not args.recipe:
            ap.error("give a recipe, or --summarize SWEEP_DIR ...")
        rows = []
        for pruner in args.pruners:
            out = Path(args.out) / pruner
            cmd = [
                sys.executable,
                "-m",
                "tunesmith",
                "sweep",
                args.recipe,
                "--objective",
                "val_loss",
                "--pruner",
                pruner,
                *(["--budget", args.budget] if args.budget else []),
                "--trials",
                str(args.trials),
                "--output",
                str(out),
                "--quiet",
                *extra,
            ]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            rows.append(summarize(out))
    print(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
