"""`tunesmith report RUN_DIR`: one self-contained report.html answering "fine-tune or just prompt?".

(~700 lines after formatting: one page, one module, one function per section; its inputs are read and checked in
report_inputs.py and its figures drawn in report_plots.py.)

Reads what the other commands left in the run directory (see docs/architecture.md and docs/eval-format.md):
config.yaml, data.json, metrics.jsonl (training), eval/task.json + eval/task_examples.jsonl (task metrics),
eval/forgetting.json (what fine-tuning cost the model). Any of them may be missing or unreadable; the
report then says so in that section and names the command that fills it, and still shows the rest.

The page needs no network and no other file: figures are SVG data URIs (report_plots.py), the CSS and a
few lines of JS are inline. Every string that comes from user data is HTML-escaped. Apart from the
timestamp in its <time> element, the output is a deterministic function of the run directory.

Our own code rather than a templating library: the page is a handful of tables and figures, and plain
f-strings with one escaping helper keep every escape visible at the place the value is written.
"""

from __future__ import annotations

import json
import math
import shlex
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from tunesmith.errors import RunError
from tunesmith.evaluation.report_inputs import Inputs, read_inputs

FLIPPED_SHOWN = 20  # rows per flipped-examples table; the counts are always complete
TEXT_SHOWN = 400  # characters of an example's text shown in a table cell (the full text is in its tooltip)
SYSTEM_ORDER = ("base_zero_shot", "base_few_shot", "base_best_prompt", "fine_tuned")
BASE_SYSTEMS = ("base_zero_shot", "base_few_shot", "base_best_prompt")
# metric names whose values are not rates even when they happen to fall in 0..1
NOT_RATES = ("loss", "perplexity", "ppl", "kl", "seconds", "tokens", "latency")
BOOTSTRAP_SAMPLES = 2000


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html), atomically, and return its path."""
    from tunesmith.atomic import atomic_write_text

    inputs = read_inputs(run_dir)
    out = Path(out) if out is not None else inputs.run_dir / "report.html"
    if out.is_dir():
        raise RunError(f"{out}: is a directory; give a file path for the report, e.g. {out / 'report.html'}")
    page = render(inputs, generated=datetime.now(timezone.utc))
    try:
        atomic_write_text(out, page)
    except OSError as e:
        raise RunError(f"{out}: cannot write the report ({e.strerror or e}); choose another place with --out") from None
    return out


# ---------------------------------------------------------------------------------------------- formatting


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_rate(metric: str, values: list) -> bool:
    name = metric.lower()
    return (not any(w in name for w in NOT_RATES)) and bool(values) and all(_num(v) and 0 <= v <= 1 for v in values)


def _fmt(v, rate: bool = False) -> str:
    if not _num(v):
        return "–"
    if rate:
        return f"{v * 100:.1f}%"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1 or v == 0:
        return f"{v:.2f}"
    return f"{v:.3f}" if abs(v) >= 0.01 else f"{v:.3g}"


def _fmt_delta(d: float, rate: bool) -> str:
    if d == 0:
        return "±0"
    if rate:
        return f"{d * 100:+.1f} pts"
    if abs(d) >= 100:
        return f"{d:+,.0f}"
    return f"{d:+.3g}" if abs(d) < 1 else f"{d:+.2f}"


def _direction_class(d: float, higher_is_better: bool | None) -> str:
    if higher_is_better is None or abs(d) < 1e-12:
        return "same"
    return "better" if (d > 0) == higher_is_better else "worse"


def _short(text, limit: int = TEXT_SHOWN) -> str:
    """A cell for user text: escaped, cut to `limit` characters, the whole text in the tooltip."""
    text = "" if text is None else text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    shown = text if len(text) <= limit else text[:limit] + "…"
    return f'<td class="text" title="{escape(text)}">{escape(shown)}</td>'


def _system_label(s: dict) -> str:
    if s["key"] == "base_few_shot" and _num(s.get("shots")):
        return f"{int(s['shots'])}-shot"
    if s["key"] == "base_best_prompt":
        prompt = s.get("prompt") if isinstance(s.get("prompt"), dict) else {}
        return f"best prompt ({prompt['name']})" if isinstance(prompt.get("name"), str) else "best prompt"
    return {"base_zero_shot": "zero-shot", "base_few_shot": "few-shot", "fine_tuned": "fine-tuned"}.get(
        s["key"], s["key"]
    )


def _missing(what: str, command: str) -> str:
    return f'<p class="missing">{escape(what)} Run <code>{escape(command)}</code> to fill this section.</p>'


def _problem(text: str) -> str:
    return f'<p class="problem">{escape(text)}</p>'


def _figure(uri: str | None, alt: str) -> str:
    if uri is None:
        return ""
    return (
        f'<figure><img class="figure" src="{uri}" alt="{escape(alt)}"><figcaption>{escape(alt)}</figcaption></figure>'
    )


# ---------------------------------------------------------------------------------------------- headline


def paired_difference(a: list[float], b: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over paired examples and its 95% paired-bootstrap interval (fixed seed: deterministic)."""
    import numpy as np

    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(BOOTSTRAP_SAMPLES, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def paired_scores(examples: list[dict] | None, key_a: str, key_b: str) -> tuple[list[float], list[float]]:
    a, b = [], []
    for row in examples or []:
        scores = row.get("scores") if isinstance(row.get("scores"), dict) else {}
        if _num(scores.get(key_a)) and _num(scores.get(key_b)):
            a.append(float(scores[key_a]))
            b.append(float(scores[key_b]))
    return a, b


def headline(inp: Inputs) -> str:
    """The answer to "fine-tune or just prompt?", claiming only what the numbers support."""
    if inp.task is None:
        why = inp.task_problem or "The task evaluation has not been run yet."
        return (
            f'<div class="headline unknown"><h2>Fine-tune or just prompt? Not measured yet.</h2>'
            f"<p>{escape(why)} Run <code>{escape(inp.eval_command)}</code> to compare the fine-tuned model "
            f"with the base model prompted zero-shot and few-shot.</p>{_forgetting_line(inp)}</div>"
        )
    systems = inp.systems()
    metric = inp.task["primary"]
    hib = inp.task.get("metrics_info", {}).get(metric, {}).get("higher_is_better")
    tuned = systems.get("fine_tuned")
    bases = [systems[k] for k in BASE_SYSTEMS if k in systems and _num(systems[k]["metrics"].get(metric))]
    if tuned is None or not _num(tuned["metrics"].get(metric)) or not bases:
        return (
            f'<div class="headline unknown"><h2>Fine-tune or just prompt? Not enough systems evaluated.</h2>'
            f"<p>eval/task.json needs {escape(metric)} for the fine-tuned model and at least one prompted base "
            f"system; run <code>{escape(inp.eval_command)}</code>.</p>{_forgetting_line(inp)}</div>"
        )

    rate = _is_rate(metric, [s["metrics"].get(metric) for s in systems.values()])
    sign = 1 if hib is not False else -1  # unknown direction: assume higher is better, and say so below
    # the prompt chosen on the validation split; choosing the best base system by its test score would flatter
    # prompting (eval files written before prompt selection existed have no such system)
    chosen = [s for s in bases if s["key"] == "base_best_prompt"]
    best = chosen[0] if chosen else max(bases, key=lambda s: sign * s["metrics"][metric])
    gap = tuned["metrics"][metric] - best["metrics"][metric]
    figures = ", ".join(f"{_fmt(s['metrics'][metric], rate)} {escape(_system_label(s))}" for s in bases)
    detail = f"fine-tuned: {_fmt(tuned['metrics'][metric], rate)} {escape(metric)} vs {figures}"

    a, b = paired_scores(inp.examples, best["key"], "fine_tuned")
    if len(a) >= 2:
        mean, lo, hi = paired_difference(a, b)
        if sign * lo > 0 and sign * hi > 0:
            verdict = "win" if sign * gap > 0 else "unknown"
        elif sign * lo < 0 and sign * hi < 0:
            verdict = "lose" if sign * gap < 0 else "unknown"
        else:
            verdict = "tie"
        ci = (
            f"per-example difference vs {escape(_system_label(best))} {_fmt_delta(mean, rate)} "
            f"(95% interval {_fmt_delta(lo, rate)} to {_fmt_delta(hi, rate)}, paired bootstrap over {len(a)} "
            f"test examples)"
        )
    else:
        verdict = "untested"
        ci = "no per-example scores in eval/task_examples.jsonl, so the gap is not tested against noise"
    title = {
        "win": "Fine-tune: the fine-tuned model beats prompting the base model.",
        "lose": f"Just prompt: the base model prompted {_system_label(best)} beats the fine-tuned model.",
        "tie": "No clear winner: the fine-tuned model and the prompted base model are within noise of each other.",
        "unknown": "Mixed result: the overall metric and the per-example scores disagree; read the tables below.",
        "untested": (
            "The fine-tuned model scores "
            + ("higher" if sign * gap > 0 else "lower" if gap else "the same")
            + f" than the best prompt ({_system_label(best)}); the gap is not tested against noise."
        ),
    }[verdict]
    direction = "" if hib is not None else f" (direction of {escape(metric)} unknown: higher taken as better)"
    lines = [f"<p>{detail}; {ci}.{direction}</p>", _cost_line(systems), _forgetting_line(inp)]
    return f'<div class="headline {verdict}"><h2>{escape(title)}</h2>{"".join(lines)}</div>'


def _cost_line(systems: dict[str, dict]) -> str:
    parts = []
    for key, unit, fmt in (
        ("prompt_tokens_per_example", "prompt tokens", "{:,.0f}"),
        ("seconds_per_example", "s", "{:.3g}"),
    ):
        vals = [(s, s.get(key)) for k, s in systems.items() if _num(s.get(key))]
        if len(vals) >= 2 and "fine_tuned" in {s["key"] for s, _ in vals}:
            parts.append(" vs ".join(f"{fmt.format(v)} {unit} {escape(_system_label(s))}" for s, v in vals))
    if not parts:
        return ""
    return f"<p>Cost per example: {'; '.join(parts)}.</p>"


def _forgetting_line(inp: Inputs) -> str:
    f = inp.forgetting
    if f is None:
        why = inp.forgetting_problem or "not measured yet"
        return f"<p>Forgetting: {escape(why)} (<code>{escape(inp.eval_command)}</code>).</p>"
    parts = []
    ppl = f.get("perplexity") or {}
    if _num(ppl.get("change")):
        parts.append(f"perplexity on general text {ppl['change'] * 100:+.1f}%")
    q = f.get("questions") or {}
    if _num(q.get("change")):
        parts.append(f"general-question score {q['change'] * 100:+.1f} pts")
    kl = f.get("kl") or {}
    if _num(kl.get("mean_per_token")):
        parts.append(f"KL to the base model {kl['mean_per_token']:.3g} nats/token")
    return (
        f'<p>Forgetting: <span class="badge {escape(f["verdict"])}">{escape(f["verdict"])}</span> '
        f"{escape(', '.join(parts))}.</p>"
    )


# ---------------------------------------------------------------------------------------------- sections


def _task_section(inp: Inputs) -> str:
    from tunesmith.evaluation import report_plots

    head = '<section id="task"><h2>Task metrics: prompted base model vs fine-tuned</h2>'
    if inp.task is None:
        body = _problem(inp.task_problem) if inp.task_problem else ""
        return head + body + _missing("No task evaluation (eval/task.json) yet.", inp.eval_command) + "</section>"
    task = inp.task
    systems = sorted(task["systems"], key=lambda s: SYSTEM_ORDER.index(s["key"]) if s["key"] in SYSTEM_ORDER else 9)
    info = task.get("metrics_info") or {}
    names = [m for m in info if any(m in s["metrics"] for s in systems)]
    names += sorted({m for s in systems for m in s["metrics"]} - set(names))
    rates = {m: _is_rate(m, [s["metrics"].get(m) for s in systems if m in s["metrics"]]) for m in names}
    ref = next((s for s in systems if s["key"] == "base_zero_shot"), None)

    cols = [
        (m, (info.get(m) or {}).get("higher_is_better"), rates[m], lambda s, m=m: s["metrics"].get(m)) for m in names
    ]
    cols += [
        ("prompt tokens / example", False, False, lambda s: s.get("prompt_tokens_per_example")),
        ("seconds / example", False, False, lambda s: s.get("seconds_per_example")),
    ]
    rows = []
    for s in systems:
        cells = [f'<th scope="row">{escape(s.get("name") or s["key"])}</th>']
        for name, hib, rate, get in cols:
            v = get(s)
            delta = ""
            if ref is not None and s is not ref and _num(v) and _num(get(ref)):
                d = v - get(ref)
                delta = f'<span class="delta {_direction_class(d, hib)}">{_fmt_delta(d, rate)}</span>'
            primary = ' class="primary"' if name == task["primary"] else ""
            cells.append(f"<td{primary}>{_fmt(v, rate)}{delta}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = "".join(f"<th>{escape(c[0])}</th>" for c in cols)
    table = (
        f'<table class="metrics"><thead><tr><th>system</th>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )

    data = task.get("data") or {}
    about = (
        f'<p class="about">Task <b>{escape(str(task.get("task", "?")))}</b>, primary metric '
        f"<b>{escape(task['primary'])}</b>, on {escape(str(data.get('examples', '?')))} examples of "
        f"<code>{escape(str(data.get('path', '?')))}</code>"
        + (f" (sha256 {escape(str(data['sha256'])[:12])}…)" if data.get("sha256") else "")
        + ". Deltas are against the base model zero-shot; green is better, red is worse."
        + _reused_note(systems)
        + "</p>"
    )
    legend = "".join(
        f"<dt>{escape(m)}</dt><dd>{escape(str((info.get(m) or {}).get('description', '')))}"
        f"{' (higher is better)' if (info.get(m) or {}).get('higher_is_better') is True else ''}"
        f"{' (lower is better)' if (info.get(m) or {}).get('higher_is_better') is False else ''}</dd>"
        for m in names
        if m in info
    )
    bars = report_plots.primary_bars(systems, task["primary"], rates.get(task["primary"], False))
    parts = [head, about, table, _figure(bars, f"{task['primary']} by system"), _selection_table(task)]
    if legend:
        parts.append(f"<details><summary>What the metrics mean</summary><dl>{legend}</dl></details>")
    parts.append(_per_label_table(task, systems))
    return "".join(parts) + "</section>"


def _reused_note(systems: list[dict]) -> str:
    """Which systems this evaluation did not measure itself but reused from an identical earlier measurement."""
    reused = [s for s in systems if s.get("reused")]
    if not reused:
        return ""
    which = ", ".join(f"{escape(s.get('name') or s['key'])} ({escape(str(s['reused']))})" for s in reused)
    return (
        f" Reused from an identical earlier measurement (same model weights, prompts, data, settings and code; "
        f"their seconds are that measurement's): {which}."
    )


def _selection_table(task: dict) -> str:
    """How the best prompt was chosen: every variant's score on the validation split and its cost."""
    sel = task.get("prompt_selection")
    if not isinstance(sel, dict) or not isinstance(sel.get("variants"), list):
        return ""
    metric = str(sel.get("metric", task["primary"]))
    values = [v.get("value") for v in sel["variants"] if isinstance(v, dict)]
    rate = _is_rate(metric, values)
    rows = []
    for v in sel["variants"]:
        if not isinstance(v, dict):
            continue
        mark = ' class="chosen"' if v.get("key") == sel.get("chosen") else ""
        rows.append(
            f'<tr{mark}><th scope="row">{escape(str(v.get("name", v.get("key"))))}'
            f"{' (chosen)' if mark else ''}</th><td>{_fmt(v.get('value'), rate)}</td>"
            f"<td>{_fmt(v.get('prompt_tokens_per_example'))}</td><td>{_fmt(v.get('seconds_per_example'))}</td></tr>"
        )
    return (
        f"<details open><summary>Best prompt: chosen on {escape(str(sel.get('examples', '?')))} validation "
        f"examples ({escape(str(sel.get('split', '')))}), never on the test split</summary>"
        f'<table class="metrics"><thead><tr><th>prompt variant</th><th>{escape(metric)} (validation)</th>'
        f"<th>prompt tokens / example</th><th>seconds / example</th></tr></thead><tbody>{''.join(rows)}"
        f"</tbody></table></details>"
    )


def _per_label_table(task: dict, systems: list[dict]) -> str:
    labels = task.get("labels") or []
    with_labels = [s for s in systems if isinstance(s.get("per_label"), dict)]
    if not labels or not with_labels:
        return ""
    head = "".join(f'<th colspan="3">{escape(s.get("name") or s["key"])}</th>' for s in with_labels)
    sub = "".join("<th>precision</th><th>recall</th><th>F1</th>" for _ in with_labels)
    rows = []
    for label in labels:
        support = next(
            (
                s["per_label"].get(label, {}).get("support")
                for s in with_labels
                if _num(s["per_label"].get(label, {}).get("support"))
            ),
            None,
        )
        cells = "".join(
            f"<td>{_fmt(s['per_label'].get(label, {}).get(k), True)}</td>"
            for s in with_labels
            for k in ("precision", "recall", "f1")
        )
        rows.append(
            f'<tr><th scope="row">{escape(str(label))}</th><td>{_fmt(support) if support is not None else "–"}'
            f"</td>{cells}</tr>"
        )
    return (
        f'<details><summary>Per-label precision, recall and F1</summary><table class="per-label"><thead>'
        f'<tr><th rowspan="2">label</th><th rowspan="2">support</th>{head}</tr><tr>{sub}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></details>"
    )


def _confusion_section(inp: Inputs) -> str:
    from tunesmith.evaluation import report_plots

    if inp.task is None or inp.task.get("task") != "classification":
        return ""  # classification only; a missing task file is already reported in the task section
    labels = [str(label) for label in inp.task["labels"]]
    figs = [
        _figure(
            report_plots.confusion_matrix(labels, s["confusion"], s.get("name") or s["key"]),
            f"confusion matrix: {s.get('name') or s['key']}",
        )
        for key in SYSTEM_ORDER
        if (s := inp.systems().get(key)) and isinstance(s.get("confusion"), list)
    ]
    body = f'<div class="row">{"".join(figs)}</div>' if figs else _problem("eval/task.json has no confusion matrices.")
    return (
        '<section id="confusion"><h2>Confusion matrices</h2><p class="about">Rows: the reference label; '
        "columns: the predicted label; colour: share of the row.</p>" + body + "</section>"
    )


def _flipped_section(inp: Inputs) -> str:
    head = '<section id="flipped"><h2>Flipped examples: base zero-shot vs fine-tuned</h2>'
    if inp.task is None:
        return head + _missing("No per-example results yet.", inp.eval_command) + "</section>"
    flipped = inp.task.get("flipped") or {}
    parts = [head]
    if inp.examples_problem:
        parts.append(_problem(inp.examples_problem))
    if isinstance(inp.task.get("flip_rule"), str):
        parts.append(f'<p class="about">{escape(inp.task["flip_rule"])}.</p>')
    for kind, title in (
        ("improved", "Improved: fails with the base model zero-shot, passes fine-tuned"),
        ("regressed", "Regressed: passes with the base model zero-shot, fails fine-tuned"),
    ):
        rows = [r for r in flipped.get(kind) or [] if isinstance(r, dict)]
        shown = rows[:FLIPPED_SHOWN]
        count = f"{len(rows)} example{'s' if len(rows) != 1 else ''}"
        if len(rows) > len(shown):
            count += f", the first {len(shown)} shown"
        parts.append(f'<h3>{escape(title)}: <span class="count {kind}">{count}</span></h3>')
        if shown:
            body = "".join(
                f'<tr><td class="id">{escape(str(r.get("id", "")))}</td>{_short(r.get("input"))}'
                f"{_short(r.get('reference'))}{_short(r.get('base'))}{_short(r.get('tuned'))}</tr>"
                for r in shown
            )
            parts.append(
                f'<table class="examples {kind}"><thead><tr><th>id</th><th>input</th><th>reference</th>'
                f"<th>base zero-shot</th><th>fine-tuned</th></tr></thead><tbody>{body}</tbody></table>"
            )
    return "".join(parts) + "</section>"


def _forgetting_section(inp: Inputs) -> str:
    from tunesmith.evaluation import report_plots

    head = '<section id="forgetting"><h2>Forgetting: what fine-tuning cost the model</h2>'
    f = inp.forgetting
    if f is None:
        body = _problem(inp.forgetting_problem) if inp.forgetting_problem else ""
        return (
            head
            + body
            + _missing("No forgetting measurement (eval/forgetting.json) yet.", inp.eval_command)
            + "</section>"
        )
    ppl, kl, q = f.get("perplexity") or {}, f.get("kl") or {}, f.get("questions") or {}
    probe = f.get("probe") or {}
    rows = [
        (
            "perplexity on general text",
            _fmt(ppl.get("base")),
            _fmt(ppl.get("fine_tuned")),
            f"{ppl['change'] * 100:+.1f}%" if _num(ppl.get("change")) else "–",
            _direction_class(ppl["change"], False) if _num(ppl.get("change")) else "same",
        ),
        (
            f"general questions ({q.get('metric', 'score')})",
            _fmt(q.get("base"), True),
            _fmt(q.get("fine_tuned"), True),
            _fmt_delta(q["change"], True) if _num(q.get("change")) else "–",
            _direction_class(q["change"], True) if _num(q.get("change")) else "same",
        ),
    ]
    table = "".join(
        f'<tr><th scope="row">{escape(n)}</th><td>{b}</td><td>{t}</td><td><span class="delta {cls}">{c}'
        f"</span></td></tr>"
        for n, b, t, c, cls in rows
    )
    kl_tokens = f"{kl['tokens']:,}" if isinstance(kl.get("tokens"), int) else "?"
    kl_text = (
        f"{kl['mean_per_token']:.4g} nats per token over {kl_tokens} tokens" if _num(kl.get("mean_per_token")) else "–"
    )
    verdict = escape(f["verdict"])
    parts = [
        head,
        f'<p class="verdict">Verdict: <span class="badge {verdict}">forgetting {verdict}</span> '
        f"{escape(str(f.get('explanation', '')))}</p>",
        f'<table class="forgetting"><thead><tr><th></th><th>base</th><th>fine-tuned</th><th>change</th></tr></thead>'
        f'<tbody>{table}<tr><th scope="row">KL(base ‖ fine-tuned)</th><td colspan="3">{escape(kl_text)}</td></tr>'
        "</tbody></table>",
        f'<p class="about">Probe <code>{escape(str(probe.get("name", "?")))}</code>: '
        f"{escape(str(probe.get('text_tokens', '?')))} tokens of general text, {escape(str(probe.get('questions', '?')))} "
        f"general questions. Thresholds: {escape(str(f.get('thresholds', '–')))}</p>",
    ]
    by_cat = q.get("by_category")
    if isinstance(by_cat, dict):
        by_cat = {str(k): v for k, v in by_cat.items() if isinstance(v, dict)}
        parts.append(
            _figure(report_plots.category_bars(by_cat), "general-question score by category, base vs fine-tuned")
        )
    return "".join(parts) + "</section>"


def _training_section(inp: Inputs) -> str:
    from tunesmith.evaluation import report_plots

    head = '<section id="training"><h2>Training</h2>'
    train = [r for r in inp.metrics if r.get("kind", "train") == "train"]
    evals = [r for r in inp.metrics if r.get("kind") == "eval"]
    parts = [head]
    if inp.metrics_problem:
        parts.append(_problem(inp.metrics_problem))
    if not train and not evals:
        cmd = f"tunesmith train --resume {shlex.quote(str(inp.run_dir))}"
        return head + _missing("No training metrics (metrics.jsonl is missing or empty).", cmd) + "</section>"
    facts = []
    if train:
        last = train[-1]
        facts.append(
            (
                "optimizer steps",
                f"{last.get('step', '?')}" + (f" ({last['epoch']:.2f} epochs)" if _num(last.get("epoch")) else ""),
            )
        )
        losses = [r["loss"] for r in train if _num(r.get("loss"))]
        if losses:
            tail = losses[-max(1, len(losses) // 10) :]
            facts.append(
                (
                    "training loss",
                    f"{losses[0]:.3f} at the first step → {sum(tail) / len(tail):.3f} "
                    f"(mean of the last {len(tail)} steps)",
                )
            )
        tokens = max((r["tokens"] for r in train if _num(r.get("tokens"))), default=0)  # a running total
        seconds = sum(r["step_time"] for r in train if _num(r.get("step_time")))
        if tokens:
            facts.append(("tokens trained on", f"{tokens:,.0f}"))
        if seconds:
            facts.append(
                (
                    "time in training steps",
                    f"{seconds / 60:.1f} min ({tokens / seconds:,.0f} tokens/s)"
                    if tokens
                    else f"{seconds / 60:.1f} min",
                )
            )
    scored = [r for r in evals if _num(r.get("val_loss"))]
    if scored:
        best = min(scored, key=lambda r: r["val_loss"])
        facts.append(
            (
                "validation loss",
                f"{scored[0]['val_loss']:.3f} at step {scored[0].get('step')} → best "
                f"{best['val_loss']:.3f} at step {best.get('step')}, last "
                f"{scored[-1]['val_loss']:.3f}",
            )
        )
        if _num(scored[-1].get("val_token_acc")):
            facts.append(("validation token accuracy (last)", f"{scored[-1]['val_token_acc'] * 100:.1f}%"))
        if _num(scored[-1].get("val_reward_accuracy")):
            facts.append(
                (
                    "validation preference (last)",
                    f"chosen reward above rejected in {scored[-1]['val_reward_accuracy'] * 100:.1f}% of pairs, "
                    f"mean margin {scored[-1].get('val_reward_margin', float('nan')):.3f}",
                )
            )
    parts.append(
        '<table class="facts">'
        + "".join(f'<tr><th scope="row">{escape(k)}</th><td>{escape(v)}</td></tr>' for k, v in facts)
        + "</table>"
    )
    parts.append(_figure(report_plots.loss_curves(train, evals), "training and validation loss"))
    preference = report_plots.preference_curves(train, evals)
    if preference is not None:
        parts.append(_figure(preference, "preference rewards and accuracy"))
    parts.append(
        '<div class="row">'
        + _figure(report_plots.lr_curve(train), "learning rate")
        + _figure(report_plots.throughput(train), "throughput (tokens per second)")
        + "</div>"
    )
    return "".join(parts) + "</section>"


def _config_section(inp: Inputs) -> str:
    parts = [
        '<section id="config"><h2>Configuration and data</h2>',
        f"<details><summary>Resolved config (config.yaml)</summary><pre>{escape(inp.config_text)}</pre></details>",
    ]
    if inp.data is None:
        what = inp.data_problem or "data.json is missing; it is written by tunesmith train."
        parts.append(_problem(what))
    else:
        parts.append(
            f"<details><summary>Data summary (data.json)</summary>{_data_tables(inp.data)}"
            f"<pre>{escape(json.dumps(inp.data, indent=2, ensure_ascii=False))}</pre></details>"
        )
    return "".join(parts) + "</section>"


def _data_tables(data: dict) -> str:
    splits = {k: v for k, v in data.items() if isinstance(v, dict) and "examples" in v}
    if not splits:
        return ""
    cols = sorted(
        {c for v in splits.values() for c in v if _num(v[c])},
        key=lambda c: (
            ["examples", "dropped", "truncated", "tokens", "label_tokens"].index(c)
            if c in ("examples", "dropped", "truncated", "tokens", "label_tokens")
            else 9
        ),
    )
    head = "".join(f"<th>{escape(c.replace('_', ' '))}</th>" for c in cols)
    body = "".join(
        f'<tr><th scope="row">{escape(k)}</th>'
        + "".join(f"<td>{_fmt(v.get(c)) if not isinstance(v.get(c), int) else f'{v[c]:,}'}</td>" for c in cols)
        + "</tr>"
        for k, v in splits.items()
    )
    files = data.get("files") if isinstance(data.get("files"), dict) else {}
    file_rows = "".join(
        f'<tr><th scope="row">{escape(k)}</th><td><code>{escape(str(v.get("path", "")))}</code></td>'
        f"<td><code>{escape(str(v.get('sha256', ''))[:16])}</code></td></tr>"
        for k, v in files.items()
        if isinstance(v, dict)
    )
    out = f'<table class="data"><thead><tr><th>split</th>{head}</tr></thead><tbody>{body}</tbody></table>'
    if file_rows:
        out += (
            f'<table class="files"><thead><tr><th>file</th><th>path</th><th>sha256</th></tr></thead>{file_rows}</table>'
        )
    return out


# ---------------------------------------------------------------------------------------------- page


def render(inp: Inputs, generated: datetime) -> str:
    cfg = inp.config
    name = str(cfg.get("name") or inp.run_dir.name)
    model = cfg.get("model")
    model = model.get("name", "?") if isinstance(model, dict) else model or "?"  # `model: NAME` is a shorthand
    method = str(cfg.get("method", "?"))
    sections = [
        _task_section(inp),
        _confusion_section(inp),
        _flipped_section(inp),
        _forgetting_section(inp),
        _training_section(inp),
        _config_section(inp),
    ]
    nav = "".join(
        f'<a href="#{sid}">{title}</a>'
        for sid, title in (
            ("task", "task metrics"),
            ("confusion", "confusion"),
            ("flipped", "flipped examples"),
            ("forgetting", "forgetting"),
            ("training", "training"),
            ("config", "config and data"),
        )
        if f'id="{sid}"' in "".join(sections)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tunesmith report: {escape(name)}</title>
<style>{_CSS}</style></head>
<body data-figures="pending">
<header><h1>tunesmith report: {escape(name)}</h1>
<p class="sub">model <code>{escape(str(model))}</code> · method <code>{escape(method)}</code> · run
<code>{escape(str(inp.run_dir))}</code> · generated <time>{generated.isoformat(timespec="seconds")}</time></p>
<nav>{nav}</nav></header>
<main>
{headline(inp)}
{"".join(sections)}
</main>
<footer>Written by <code>tunesmith report</code>. Self-contained: figures are embedded, nothing is fetched.</footer>
<script>{_JS}</script>
</body></html>
"""


# once every figure has loaded, record how many decoded (naturalWidth > 0) on <body data-figures="ok/total">;
# the browser test reads it, and a figure that fails to decode is outlined in red for a human reader
_JS = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img.figure"), ok = 0;
  imgs.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; } else { img.classList.add("broken"); }
  });
  document.body.setAttribute("data-figures", ok + "/" + imgs.length);
});
"""

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;margin:0;background:#fafafa}
header{background:#fff;border-bottom:1px solid #ddd;padding:16px 28px 8px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:0 0 10px}h3{font-size:15px;margin:18px 0 6px}
.sub{color:#555;margin:0 0 8px}nav a{margin-right:14px;color:#2f6db5;text-decoration:none}
main{padding:16px 28px;max-width:1200px}
section{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:14px 18px;margin:0 0 16px}
.headline{border-radius:6px;padding:14px 18px;margin:0 0 16px;border-left:6px solid #999;background:#f1f1f1}
.headline.win{border-color:#2e8540;background:#eaf5ec}.headline.lose{border-color:#c0392b;background:#fbecea}
.headline.tie,.headline.untested,.headline.unknown{border-color:#b8860b;background:#fdf6e3}
.headline p{margin:4px 0}
table{border-collapse:collapse;margin:6px 0 10px}th,td{border-bottom:1px solid #e6e6e6;padding:4px 10px;
text-align:left;vertical-align:top}thead th{background:#f4f4f4}
table.metrics td,table.forgetting td,table.data td,table.per-label td{text-align:right;white-space:nowrap}
td.primary{font-weight:600}
.delta{display:block;font-size:12px}.delta.better{color:#2e8540}.delta.worse{color:#c0392b}.delta.same{color:#777}
td.text{max-width:320px;white-space:pre-wrap;word-break:break-word}td.id{white-space:nowrap;color:#555}
.count.improved{color:#2e8540}.count.regressed{color:#c0392b}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;color:#fff;font-weight:600;background:#777}
.badge.low{background:#2e8540}.badge.moderate{background:#d08c00}.badge.high{background:#c0392b}
.missing{color:#555;background:#f7f7f7;border:1px dashed #bbb;padding:8px 12px;border-radius:4px}
.problem{color:#8a1f11;background:#fdecea;padding:8px 12px;border-radius:4px}
.about{color:#444}.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:6px 0}figcaption{color:#666;font-size:12px}img.figure{max-width:100%;height:auto}
img.figure.broken{outline:3px solid #c0392b}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px}
details{margin:8px 0}summary{cursor:pointer;color:#2f6db5}dt{font-weight:600}dd{margin:0 0 6px 16px}
footer{color:#777;font-size:12px;padding:0 28px 24px}
"""
