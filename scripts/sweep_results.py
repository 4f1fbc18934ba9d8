"""Keep a finished sweep's results as a record and render the sweeps section of docs/results.md.

    python scripts/sweep_results.py SWEEP_DIR --command "tunesmith sweep ..." [--note "..."]
        -> docs/results/sweeps/<sweep name>.json, then docs/results.md rebuilt from the records

Every figure is read from the sweep's sweep.json (trials, values, the test comparison) and its trials' run folders;
nothing is typed in by hand. scripts/results.py calls `section()` so that regenerating docs/results.md keeps it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "docs" / "results" / "sweeps"


def _pct(metric: str, v) -> str:
    if v is None:
        return "—"
    if metric in ("val_loss", "forgetting", "perplexity") or metric.startswith("val_"):
        return f"{v:.4f}"
    return f"{100 * v:.1f}%"


def make_record(sweep_dir: Path, command: str, note: str) -> dict:
    from tunesmith.models.precision import cpu_name

    s = json.loads((sweep_dir / "sweep.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {
        "name": sweep_dir.name,
        "command": command,
        "note": note,
        "measured": date.today().isoformat(),
        "commit": commit.strip() or None,
        "cpu": cpu_name(),
        "summary": s,
    }


def section(records_dir: Path = RECORDS) -> list[str]:
    """The '## Hyperparameter sweeps' section as markdown lines (empty when no sweep was recorded)."""
    files = sorted(records_dir.glob("*.json")) if records_dir.is_dir() else []
    if not files:
        return []
    lines = [
        "## Hyperparameter sweeps (`tunesmith sweep`)",
        "",
        "Each sweep: trial 0 is the recipe with the command's flags (the baseline); later trials sampled by TPE; the objective measured on the "
        "validation split; the winner evaluated once on the test split against trial 0 and the prompted base model "
        "(docs/sweep.md). Records in docs/results/sweeps/.",
        "",
    ]
    for f in files:
        r = json.loads(f.read_text())
        s = r["summary"]
        names = s["objective"]["names"]
        states: dict[str, int] = {}
        for t in s["trials"]:
            states[t["state"]] = states.get(t["state"], 0) + 1
        budget = f"{s['budget_seconds'] / 60:.0f} min budget" if s.get("budget_seconds") else "no budget"
        lines += [
            f"### {r['name']}",
            "",
            f"`{r['command']}` — {s['recipe']['method']} on {s['recipe']['model']}; objective "
            f"{', '.join(names)}; pruner {s['pruner']}; {budget}, {s['elapsed_seconds'] / 60:.0f} min used; "
            f"{len(s['trials'])} trials ({', '.join(f'{n} {k}' for k, n in states.items())}). "
            f"Measured {r['measured']} at commit {r['commit']} on {r['cpu']}."
            + (f" {r['note']}" if r["note"] else "")
            + (
                f" The sweep's report page: [{f.stem}.html](results/sweeps/{f.stem}.html)."
                if f.with_suffix(".html").exists()
                else ""
            ),
            "",
            "| trial | state | " + " | ".join(names) + " (validation) | params | steps | note |",
            "|---|---|" + "---|" * len(names) + "---|---|---|",
        ]
        front = set(s.get("front", []))
        best = (s.get("best") or {}).get("number")
        for t in s["trials"]:
            mark = " **best**" if t["number"] == best else (" **front**" if t["number"] in front else "")
            vals = [_pct(n, v) for n, v in zip(names, t["values"] or [])] if t["state"] == "complete" else []
            vals += ["—"] * (len(names) - len(vals))
            params = ", ".join(
                f"{k.split('.')[-1]} {v:.2e}"
                if isinstance(v, float) and k.endswith("lr")
                else f"{k.split('.')[-1]} {v:.3g}"
                if isinstance(v, float)
                else f"{k.split('.')[-1]} {v}"
                for k, v in t["params"].items()
            )
            extra = ""
            if t.get("forgetting"):
                extra = f"forgetting {t['forgetting']['verdict']}"
            note = t.get("note") or t.get("skipped") or extra
            lines.append(
                f"| {t['number']}{mark} | {t['state']} | "
                + " | ".join(vals)
                + f" | {params or ('baseline' if t['number'] == 0 else '—')} | "
                f"{t.get('steps', '—')} | {note} |"
            )
        test = s.get("test")
        if test:
            metric = test["metric"]
            lines += [
                "",
                f"Test split ({test['examples']} examples, {metric}):",
                "",
                f"| system | {metric} | forgetting (severity) |",
                "|---|---|---|",
            ]
            labels = {
                "base_zero_shot": "base, zero-shot",
                "base_few_shot": "base, few-shot",
                "base_best_prompt": "base, best prompt (chosen on validation)",
            }
            for k, v in test["base"].items():
                lines.append(f"| {labels.get(k, k)} | {_pct(metric, v)} | — |")
            for n, row in test["runs"].items():
                who = (
                    "trial 0 (baseline: the recipe with the command's flags)"
                    if n == "0"
                    else f"trial {n} (sweep winner)"
                )
                if n != "0" and int(n) != test["trials"][0]:
                    who = f"trial {n} (Pareto front)"
                lines.append(
                    f"| {who} | {_pct(metric, row['value'])} | {row['forgetting']} ({row['forgetting_severity']:.2f}) |"
                )
        lines.append("")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--command", required=True, help="the command that ran the sweep, as typed")
    ap.add_argument("--note", default="", help="a sentence printed with the sweep (conditions, caveats)")
    ap.add_argument("--name", help="record name (default: the sweep folder's name)")
    args = ap.parse_args()
    record = make_record(args.sweep_dir, args.command, args.note)
    if args.name:
        record["name"] = args.name
    RECORDS.mkdir(parents=True, exist_ok=True)
    path = RECORDS / f"{record['name']}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    report = args.sweep_dir / "report.html"
    if report.exists():  # the page tunesmith report wrote, kept beside the record
        path.with_suffix(".html").write_bytes(report.read_bytes())
        print(f"wrote {path.with_suffix('.html')}")
    rebuild()
    return 0


def rebuild(out: Path = ROOT / "docs" / "results.md") -> None:
    """docs/results.md from the records alone (no run folder is read again)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import results

    records = ROOT / "docs" / "results"
    rows = [
        results.load_record(recipe.stem, records) or {"recipe": recipe.stem, "missing": True}
        for recipe in sorted((ROOT / "recipes").rglob("*.yaml"))
    ]
    results.write_table(rows, out, argparse.Namespace(records="docs/results", note=[]))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
