"""`tunesmith report SWEEP_DIR`: one self-contained page for a sweep.

Sections: the verdict on the test split (winner vs the baseline trial and the prompted base model), the best
config against the baseline's, the Pareto front (multi-objective sweeps), the objective over the trials, the
validation curves of every trial with the pruned ones marked, each parameter against the objective, parameter
importances (fANOVA, seeded), and the table of every trial. Figures are SVG data URIs (evaluation/report_plots.py's
style); nothing is fetched.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from tunesmith.atomic import atomic_write_text
from tunesmith.errors import RunError
from tunesmith.evaluation.report_html import _CSS, _JS
from tunesmith.evaluation.report_plots import BASE, TUNED, VALIDATION, _render
from tunesmith.progress import duration

SUMMARY = "sweep.json"
STATE_COLOURS = {"complete": TUNED, "pruned": "#e6a23c", "failed": VALIDATION, "not started": BASE}


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SUMMARY).is_file() and (Path(path) / "study.db").is_file()


def write_sweep_report(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    sweep_dir = Path(sweep_dir)
    try:
        summary = json.loads((sweep_dir / SUMMARY).read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{sweep_dir}: not a finished or running sweep ({SUMMARY} unreadable: {e})") from None
    importances = _importances(sweep_dir, summary)
    page = render(sweep_dir, summary, importances, datetime.now(timezone.utc))
    path = Path(out) if out else sweep_dir / "report.html"
    atomic_write_text(path, page)
    return path


def _importances(sweep_dir: Path, summary: dict) -> dict[str, float] | None:
    """fANOVA importance of each parameter for the (first) objective, over the completed trials; None when fewer
    than 3 completed trials sampled parameters."""
    import warnings

    import optuna

    done = [t for t in summary["trials"] if t["state"] == "complete" and t["params"]]
    if len(done) < 3:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{(sweep_dir / 'study.db').resolve()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = optuna.importance.get_param_importances(
                study,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                target=lambda t: t.values[0],
            )
        except (ValueError, RuntimeError):
            return None
    return dict(result)


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return escape(str(v))
    if isinstance(v, float):
        return f"{v:.3e}" if v and abs(v) < 1e-3 else f"{v:.4g}"
    return escape(str(v))


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return ""
    return f'<img class="figure" src="{uri}" alt="{escape(alt)}">'


def render(sweep_dir: Path, summary: dict, importances: dict | None, generated: datetime) -> str:
    names = summary["objective"]["names"]
    trials = summary["trials"]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    states = ", ".join(f"{n} {s}" for s, n in counts.items())
    budget = summary.get("budget_seconds")
    title = f"tunesmith sweep: {summary['recipe'].get('name') or sweep_dir.name}"
    sections = [
        _test_section(summary),
        _best_section(sweep_dir, summary),
        _front_section(summary),
        _progress_section(summary),
        _params_section(summary, importances),
        _trials_table(summary),
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{_CSS}</style></head>
<body data-figures="pending">
<header><h1>{escape(title)}</h1>
<p class="sub">model <code>{escape(str(summary["recipe"].get("model")))}</code> · method
<code>{escape(str(summary["recipe"].get("method")))}</code> · objective <code>{escape(", ".join(names))}</code>
({escape(", ".join(summary["objective"]["directions"]))}) · pruner <code>{escape(str(summary["pruner"]))}</code> ·
{len(trials)} trials ({escape(states)}) · {duration(summary.get("elapsed_seconds"))} used
{"of " + duration(budget) if budget else "(no budget)"} · generated
<time>{generated.isoformat(timespec="seconds")}</time></p></header>
<main>
{"".join(s for s in sections if s)}
</main>
<footer>Written by <code>tunesmith report</code> from {escape(str(sweep_dir))}/sweep.json and study.db.
Self-contained: figures are embedded, nothing is fetched.</footer>
<script>{_JS}</script>
</body></html>
"""


def _test_section(summary: dict) -> str:
    test = summary.get("test")
    if not test:
        if summary["recipe"].get("test"):
            return (
                '<section id="test"><h2>Test split</h2><p>Not evaluated yet: the sweep evaluates its winner on '
                "the test split once, when it ends.</p></section>"
            )
        return (
            '<section id="test"><h2>Test split</h2><p>The recipe has no <code>data.test</code>: the winner was not '
            "evaluated on held-out data. Set data.test and run <code>tunesmith eval</code> on its trial.</p></section>"
        )
    metric = test["metric"]
    rows = []
    labels = {"base_zero_shot": "base model, zero-shot", "base_few_shot": "base model, few-shot"}
    labels["base_best_prompt"] = "base model, best prompt (chosen on validation)"
    for key, value in test["base"].items():
        rows.append(f"<tr><td>{escape(labels.get(key, key))}</td><td>{_fmt(value)}</td><td>-</td></tr>")
    for number, row in test["runs"].items():
        who = "baseline (the recipe with the command's flags)" if number == "0" else "sweep winner"
        if number != "0" and number != str(test["trials"][0]):
            who = "Pareto front"
        rows.append(
            f"<tr><td>trial {escape(number)}: {who}</td><td>{_fmt(row['value'])}</td>"
            f"<td>{escape(str(row['forgetting']))} ({_fmt(row['forgetting_severity'])})</td></tr>"
        )
    winner, baseline = test["runs"].get(str(test["trials"][0])), test["runs"].get("0")
    verdict = ""
    if len(summary["objective"]["names"]) > 1:
        verdict = (
            f"<p>The Pareto front holds {len(summary.get('front', []))} trials (each best at its level of forgetting "
            "on validation); every one is measured here on the test split, with forgetting.</p>"
        )
    elif winner and baseline and str(test["trials"][0]) != "0":
        d = winner["value"] - baseline["value"]
        verdict = (
            f"<p>The winner scores {_fmt(winner['value'])} {escape(metric)} against the baseline's "
            f"{_fmt(baseline['value'])} on {test['examples']} test examples ({'+' if d >= 0 else ''}{d:.4g}).</p>"
        )
    elif str(test["trials"][0]) == "0":
        verdict = "<p>No sampled trial beat the baseline on the validation split: the baseline (the recipe with the command's flags) won.</p>"
    return (
        f'<section id="test"><h2>Test split ({test["examples"]} examples, {escape(metric)})</h2>{verdict}'
        "<table><tr><th>system</th><th>"
        + escape(metric)
        + "</th><th>forgetting (severity)</th></tr>"
        + "".join(rows)
        + "</table><p class='sub'>Forgetting on a slice of the general-ability probe; severity 1.0 is the 'high' "
        "threshold, 0.33 'moderate'.</p></section>"
    )


def _best_section(sweep_dir: Path, summary: dict) -> str:
    chosen = summary.get("test_trials")
    if not chosen:
        return ""
    best = next(t for t in summary["trials"] if t["number"] == chosen[0])
    base = next((t for t in summary["trials"] if t["number"] == 0), None)
    base_cfg = _resolved(sweep_dir / "trial-000")
    best_cfg = _resolved(sweep_dir / f"trial-{best['number']:03d}")
    keys = [p["key"] for p in summary.get("space", [])]
    rows = []
    for key in keys:
        rows.append(
            f"<tr><td><code>{escape(key)}</code></td><td>{_shown(key, base_cfg, {})}</td>"
            f"<td>{_shown(key, best_cfg, best['params'])}</td></tr>"
        )
    values = ", ".join(f"{n} {_fmt(v)}" for n, v in zip(summary["objective"]["names"], best["values"] or []))
    base_values = ", ".join(
        f"{n} {_fmt(v)}" for n, v in zip(summary["objective"]["names"], (base or {}).get("values") or [])
    )
    recipe = "best.yaml"
    title = "Most accurate trial of the Pareto front" if len(summary["objective"]["names"]) > 1 else "Best config"
    return (
        f'<section id="best"><h2>{title}: trial {best["number"]}</h2>'
        f"<p>Validation: {escape(values)} (baseline: {escape(base_values or 'not finished')}). Its fully resolved "
        f"config is <code>{escape(str(sweep_dir / recipe))}</code>: <code>tunesmith train {escape(str(sweep_dir / recipe))}</code>.</p>"
        "<table><tr><th>key</th><th>baseline (resolved)</th><th>best</th></tr>" + "".join(rows) + "</table></section>"
    )


def _shown(key: str, resolved: dict, params: dict) -> str:
    """A key's value in a trial: what was sampled, else what its config resolved (alpha as a ratio of r, warmup
    given in steps when it was resolved to steps)."""
    if key in params:
        return _fmt(params[key])
    if key == "lora.alpha_ratio":
        alpha, r = _get(resolved, "lora.alpha"), _get(resolved, "lora.r")
        return _fmt(alpha / r) if isinstance(alpha, (int, float)) and r else "-"
    value = _get(resolved, key)
    if key == "train.warmup" and isinstance(value, (int, float)) and value >= 1:
        return f"{int(value)} steps"
    return _fmt(value)


def _resolved(run_dir: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, ValueError):
        return {}


def _get(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _front_section(summary: dict) -> str:
    names = summary["objective"]["names"]
    if len(names) < 2:
        return ""
    done = [t for t in summary["trials"] if t["state"] == "complete"]
    front = set(summary.get("front", []))

    def draw(fig):
        ax = fig.add_subplot()
        for t in done:
            on = t["number"] in front
            ax.scatter(t["values"][1], t["values"][0], color=TUNED if on else BASE, s=40 if on else 18, zorder=3)
            ax.annotate(
                str(t["number"]),
                (t["values"][1], t["values"][0]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        pts = sorted((t["values"][1], t["values"][0]) for t in done if t["number"] in front)
        if len(pts) > 1:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=TUNED, alpha=0.5)
        for x, label in ((1 / 3, "moderate"), (1.0, "high")):
            ax.axvline(x, color=VALIDATION, alpha=0.4, linestyle="--")
            ax.text(x, ax.get_ylim()[0], f" {label}", fontsize=7, color=VALIDATION, va="bottom")
        ax.set_xlabel("forgetting severity (lower is better)")
        ax.set_ylabel(f"{names[0]} on validation")
        ax.set_title("accuracy against forgetting: the Pareto front in blue")

    rows = "".join(
        f"<tr><td>{t['number']}</td><td>{_fmt(t['values'][0])}</td><td>{_fmt(t['values'][1])}</td>"
        f"<td>{escape(str((t.get('forgetting') or {}).get('verdict', '-')))}</td>"
        f"<td>{escape(_params(t['params']))}</td></tr>"
        for t in sorted(done, key=lambda t: t["values"][1])
        if t["number"] in front
    )
    return (
        f'<section id="front"><h2>Pareto front: {escape(names[0])} against forgetting</h2>'
        "<p>Each front trial is best at its level of forgetting: pick how much general ability to trade for task "
        "accuracy. Recipes: <code>pareto/trial-NNN.yaml</code>.</p>"
        + _img(_render(draw, 6.5, 3.6), "Pareto front")
        + f"<table><tr><th>trial</th><th>{escape(names[0])}</th><th>forgetting severity</th><th>verdict</th>"
        "<th>params</th></tr>" + rows + "</table></section>"
    )


def _params(params: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) or "baseline"


def _progress_section(summary: dict) -> str:
    names, directions = summary["objective"]["names"], summary["objective"]["directions"]
    trials = summary["trials"]
    done = [t for t in trials if t["state"] == "complete"]
    maximize = directions[0] == "maximize"

    def objective_plot(fig):
        ax = fig.add_subplot()
        best, xs, ys = None, [], []
        for t in trials:
            if t["state"] == "complete":
                v = t["values"][0]
                ax.scatter(t["number"], v, color=TUNED, s=22, zorder=3)
                best = v if best is None or (v > best if maximize else v < best) else best
            if best is not None:
                xs.append(t["number"])
                ys.append(best)
            if t["state"] == "pruned" and t["intermediate"]:
                last = list(t["intermediate"].values())[-1]
                if names[0] not in ("val_loss",) and maximize:
                    continue  # a pruned trial's reports are validation losses, not the metric
                ax.scatter(t["number"], last, color=STATE_COLOURS["pruned"], marker="x", s=22, zorder=3)
        if xs:
            ax.step(xs, ys, where="post", color=TUNED, alpha=0.6, label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(names[0])
        ax.set_title(f"{names[0]} per trial (x: pruned, at its last report)")

    def curves(fig):
        ax = fig.add_subplot()
        per_epoch = summary.get("evals_per_epoch", 1)
        for t in trials:
            points = t["intermediate"]
            if not points:
                continue
            xs = [int(k) / per_epoch for k in points]
            ys = list(points.values())
            if directions[0] == "maximize" and names[0] not in (
                "val_token_acc",
                "val_reward_accuracy",
                "val_reward_margin",
            ):
                ys = [-y for y in ys]  # reported negated so that higher is better; plot the validation loss
            colour = STATE_COLOURS.get(t["state"], BASE)
            ax.plot(
                xs, ys, color=colour, alpha=0.8 if t["number"] == 0 else 0.5, linewidth=2 if t["number"] == 0 else 1
            )
        ax.set_xlabel("epoch (every trial validated at the same fractions of an epoch)")
        ax.set_ylabel(
            "validation loss"
            if names[0] not in ("val_token_acc", "val_reward_accuracy", "val_reward_margin")
            else names[0]
        )
        ax.set_title("validation curves: blue complete, orange pruned, thick the baseline")

    if not done and not any(t["intermediate"] for t in trials):
        return ""
    figures = _img(_render(objective_plot, 6.5, 3.2), "objective per trial") if done else ""
    if any(t["intermediate"] for t in trials):
        figures += _img(_render(curves, 6.5, 3.2), "validation curves")
    pruned = [t for t in trials if t["state"] == "pruned"]
    seen = sum(t.get("examples_seen", 0) for t in trials)
    saved = ""
    if pruned:
        pruned_seen = sum(t.get("examples_seen", 0) for t in pruned)
        saved = (
            f"<p>{len(pruned)} trials pruned after {pruned_seen:,} of the {seen:,} training examples the sweep went "
            "through ("
            + ", ".join(f"trial {t['number']}: {escape(t.get('note', ''))}" for t in pruned[:6])
            + (" ..." if len(pruned) > 6 else "")
            + ").</p>"
        )
    return f'<section id="progress"><h2>Objective over the trials</h2>{saved}{figures}</section>'


def _params_section(summary: dict, importances: dict | None) -> str:
    names = summary["objective"]["names"]
    done = [t for t in summary["trials"] if t["state"] == "complete" and t["params"]]
    keys = [p["key"] for p in summary.get("space", [])]
    if not done or not keys:
        return ""
    log_keys = {p["key"] for p in summary.get("space", []) if p.get("log")}

    def draw(fig):
        cols = min(3, len(keys))
        rows = math.ceil(len(keys) / cols)
        for i, key in enumerate(keys):
            ax = fig.add_subplot(rows, cols, i + 1)
            pts = [(t["params"][key], t["values"][0]) for t in done if key in t["params"]]
            xs = [p[0] for p in pts]
            if any(isinstance(x, str) for x in xs):
                cats = sorted({str(x) for x in xs})
                xs = [cats.index(str(x)) for x in xs]
                ax.set_xticks(range(len(cats)), cats)
            ax.scatter(xs, [p[1] for p in pts], color=TUNED, s=14)
            if key in log_keys:
                ax.set_xscale("log")
            ax.set_title(key, fontsize=8)
            if i % cols == 0:
                ax.set_ylabel(names[0])

    rows_n = math.ceil(len(keys) / min(3, len(keys)))
    out = _img(_render(draw, 7.5, 2.2 * rows_n), "each parameter against the objective")
    if importances:

        def bars(fig):
            ax = fig.add_subplot()
            items = sorted(importances.items(), key=lambda kv: kv[1])
            ax.barh([k for k, _ in items], [v for _, v in items], color=TUNED)
            ax.set_xlabel(f"importance for {names[0]} (fANOVA, sums to 1)")

        out += _img(_render(bars, 6.0, 0.35 * len(importances) + 1.0), "parameter importances")
    else:
        out += "<p>Parameter importances need at least 3 completed sampled trials.</p>"
    return f'<section id="params"><h2>Parameters against {escape(names[0])}</h2>{out}</section>'


def _trials_table(summary: dict) -> str:
    names = summary["objective"]["names"]
    rows = []
    for t in summary["trials"]:
        values = ", ".join(_fmt(v) for v in t["values"]) if t["values"] and t["state"] == "complete" else "-"
        note = t.get("note") or t.get("skipped") or ""
        rows.append(
            f"<tr><td>{t['number']}</td><td>{escape(t['state'])}</td><td>{values}</td>"
            f"<td>{escape(_params(t['params']))}</td><td>{t.get('steps', '-')}</td>"
            f"<td>{duration(t.get('train_seconds'))}</td><td>{duration(t.get('measure_seconds'))}</td>"
            f"<td>{escape(note)}</td></tr>"
        )
    return (
        '<section id="trials"><h2>Every trial</h2><table><tr><th>trial</th><th>state</th>'
        f"<th>{escape(', '.join(names))}</th><th>params</th><th>steps</th><th>training</th><th>measuring</th>"
        "<th>note</th></tr>" + "".join(rows) + "</table></section>"
    )
