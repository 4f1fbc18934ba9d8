"""The figures of `tunesmith report`, drawn with matplotlib and returned as self-contained SVG data URIs.

No pyplot: each figure is a `matplotlib.figure.Figure` rendered by the SVG backend directly, so nothing here
touches matplotlib's global backend or opens a window, whatever backend the caller's session uses (the
report works the same under Agg, in a notebook, or on a headless server). The SVG output is made
byte-for-byte deterministic (fixed id salt, no date in the metadata), so a report written twice from the
same run differs only in its timestamp.
"""

from __future__ import annotations

import base64
import io
import math

# colours: one per system, the same in every figure
BASE = "#8c8c8c"
FEW_SHOT = "#e6a23c"
TUNED = "#2f6db5"
VALIDATION = "#d1495b"
SYSTEM_COLOURS = {"base_zero_shot": BASE, "base_few_shot": FEW_SHOT, "fine_tuned": TUNED}

_RC = {
    "svg.hashsalt": "tunesmith-report",  # element ids derive from this instead of a random salt
    "svg.fonttype": "path",  # text as paths: renders identically without the fonts installed
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def to_data_uri(fig) -> str:
    """The figure as a `data:image/svg+xml;base64,...` URI (usable as an <img> src; no external file)."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _render(draw, width: float, height: float) -> str:
    """Build a figure under the report's style (rc settings apply while artists are created) and encode it."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _figure(width, height)
        draw(fig)
        return to_data_uri(fig)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curves(train: list[dict], evals: list[dict]) -> str | None:
    """Training loss per step (raw, and a moving average when there are many steps) and validation loss."""
    steps, loss = _series(train, "loss")
    vsteps, vloss = _series(evals, "val_loss")
    if not loss and not vloss:
        return None

    def draw(fig):
        ax = fig.add_subplot()
        if loss:
            window = len(loss) // 20 if len(loss) >= 60 else 1  # smooth only where the raw curve is noisy
            if window > 1:
                ax.plot(steps, loss, color=TUNED, alpha=0.25, linewidth=0.8, label="training loss (per step)")
                ax.plot(
                    steps,
                    _moving_average(loss, window),
                    color=TUNED,
                    linewidth=1.6,
                    label=f"training loss ({window}-step average)",
                )
            else:
                ax.plot(steps, loss, color=TUNED, linewidth=1.4, label="training loss")
        if vloss:
            ax.plot(vsteps, vloss, color=VALIDATION, marker="o", markersize=3.5, linewidth=1.4, label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats per label token)")
        ax.set_title("Loss")
        ax.legend(frameon=False)

    return _render(draw, 7.2, 3.4)


def preference_curves(train: list[dict], evals: list[dict]) -> str | None:
    """Preference training: the rewards of chosen and rejected answers and the margin (left), and the share of pairs
    whose chosen reward is higher (right), per step and on validation. None for SFT runs."""
    steps, margin = _series(train, "reward_margin")
    vsteps, vacc = _series(evals, "val_reward_accuracy")
    if not margin and not vacc:
        return None

    def draw(fig):
        left, right = fig.subplots(1, 2)
        window = max(1, len(margin) // 20) if len(margin) >= 60 else 1
        for key, label, color in (
            ("reward_chosen", "chosen", TUNED),
            ("reward_rejected", "rejected", BASE),
            ("reward_margin", "margin", VALIDATION),
        ):
            st, vals = _series(train, key)
            if vals:
                left.plot(st, _moving_average(vals, window), color=color, linewidth=1.4, label=f"{label} (training)")
            vst, vvals = _series(evals, f"val_{key}")
            if vvals:
                left.plot(
                    vst,
                    vvals,
                    color=color,
                    marker="o",
                    markersize=3.5,
                    linestyle="--",
                    linewidth=1.0,
                    label=f"{label} (validation)",
                )
        left.axhline(0, color="#999", linewidth=0.6)
        left.set_xlabel("optimizer step")
        left.set_ylabel("reward (the objective's)")
        left.set_title("Rewards")
        left.legend(frameon=False, fontsize=7)
        st, acc = _series(train, "reward_accuracy")
        if acc:
            right.plot(st, _moving_average(acc, window), color=TUNED, linewidth=1.4, label="training")
        if vacc:
            right.plot(vsteps, vacc, color=VALIDATION, marker="o", markersize=3.5, linewidth=1.4, label="validation")
        right.set_ylim(0, 1.02)
        right.set_xlabel("optimizer step")
        right.set_ylabel("share of pairs")
        right.set_title("Chosen reward above rejected")
        right.legend(frameon=False, fontsize=7)

    return _render(draw, 9.0, 3.4)


def lr_curve(train: list[dict]) -> str | None:
    steps, lr = _series(train, "lr")
    if not lr:
        return None

    def draw(fig):
        ax = fig.add_subplot()
        ax.plot(steps, lr, color=TUNED, linewidth=1.4)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate")
        ax.set_title("Learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_ylim(bottom=0)

    return _render(draw, 3.6, 2.8)


def throughput(train: list[dict]) -> str | None:
    steps, tps = _series(train, "tokens_per_s")
    if not tps:
        return None

    def draw(fig):
        ax = fig.add_subplot()
        ax.plot(steps, tps, color=TUNED, linewidth=1.0, alpha=0.8)
        mean = sum(tps) / len(tps)
        ax.axhline(mean, color=BASE, linestyle="--", linewidth=1.0, label=f"mean {mean:,.0f} tokens/s")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("tokens per second")
        ax.set_title("Throughput")
        ax.set_ylim(bottom=0)
        ax.legend(frameon=False, loc="lower right")

    return _render(draw, 3.6, 2.8)


def primary_bars(systems: list[dict], metric: str, as_percent: bool) -> str | None:
    """One bar per system for the headline metric."""
    rows = [
        (plain(s.get("name") or s["key"]), s["metrics"][metric], SYSTEM_COLOURS.get(s["key"], BASE))
        for s in systems
        if _is_number(s.get("metrics", {}).get(metric))
    ]
    if not rows:
        return None

    def draw(fig):
        ax = fig.add_subplot()
        names = [r[0] for r in rows]
        values = [r[1] * (100 if as_percent else 1) for r in rows]
        bars = ax.barh(names, values, color=[r[2] for r in rows], height=0.6)
        ax.invert_yaxis()
        ax.bar_label(bars, labels=[f"{v:.1f}%" if as_percent else f"{v:.4g}" for v in values], padding=3)
        if as_percent:
            ax.set_xlim(0, 110)
        ax.set_xlabel(plain(metric) + (" (%)" if as_percent else ""))
        ax.grid(axis="y", visible=False)

    return _render(draw, 6.0, 0.55 * len(rows) + 0.9)


def confusion_matrix(labels: list[str], matrix: list[list[int]], title: str) -> str:
    """Counts annotated in each cell; colour is the share of the row (the reference label), so classes of
    different sizes read alike."""
    n = len(labels)
    labels = [plain(label) for label in labels]

    def draw(fig):
        ax = fig.add_subplot()
        shares = [[(c / sum(row)) if sum(row) else 0.0 for c in row] for row in matrix]
        ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        ax.grid(False)
        ax.set_xticks(range(n), labels, rotation=40, ha="right")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
        ax.set_title(plain(title))
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(matrix[i][j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if shares[i][j] > 0.5 else "black",
                )

    side = min(6.0, 1.3 + 0.38 * n)  # three 5-label matrices fit side by side on a laptop screen
    return _render(draw, side + 0.3, side)


def category_bars(by_category: dict[str, dict]) -> str | None:
    """General-question score by category, base vs fine-tuned, side by side."""
    cats = [c for c, v in by_category.items() if _is_number(v.get("base")) and _is_number(v.get("fine_tuned"))]
    if not cats:
        return None

    def draw(fig):
        ax = fig.add_subplot()
        xs = range(len(cats))
        width = 0.38
        ax.bar([x - width / 2 for x in xs], [by_category[c]["base"] for c in cats], width, color=BASE, label="base")
        ax.bar(
            [x + width / 2 for x in xs],
            [by_category[c]["fine_tuned"] for c in cats],
            width,
            color=TUNED,
            label="fine-tuned",
        )
        ax.set_xticks(list(xs), [f"{plain(c)}\n(n={by_category[c].get('n', '?')})" for c in cats])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("mean score")
        ax.set_title("General questions by category")
        ax.grid(axis="x", visible=False)
        ax.legend(frameon=False, ncols=2, loc="upper right")

    return _render(draw, max(5.0, 1.1 * len(cats) + 1.5), 3.0)


def plain(text) -> str:
    """User text shown as is: matplotlib would read `$...$` as math and fail on bad TeX, so escape the dollars."""
    return str(text).replace("$", r"\$")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
