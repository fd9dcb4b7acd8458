"""Figures for training and evaluation, drawn with matplotlib: the loss curve and the sweep panels.

Built on ``matplotlib.figure.Figure`` directly (no pyplot): no display, no global state, no backend
to select, safe inside a training process or a server. Each figure function returns its Figure (so
tests can read the axes) and writes a PNG when given a path; each panel is one function of an Axes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import (FixedLocator, Formatter, FuncFormatter, LogLocator, MaxNLocator, NullFormatter,
                               NullLocator)

from .sampling import interval_label

LOG_SPAN = 5.0  # a value axis whose data spans more than this ratio gets a log scale
FLOOR_STYLE = {"linestyle": "--", "linewidth": 1.2, "alpha": 0.8}
_plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.2, 5, 1000: never 10^-1 or 2.322


# ------------------------------------------------------------------------------------------ axes
def steps_axis(ax: Axes, steps: Sequence[int], min_gap: float = 0.07) -> None:
    """Log x axis with a tick at each step count run, labelled as the integer count (see _spaced)."""
    ticks = sorted({int(s) for s in steps})
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) == 1:  # a lone point: give it room on both sides
        ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)
    ax.xaxis.set_major_formatter(_labels_for(_spaced(ticks, math.log10, min_gap), "{:.0f}"))
    ax.set_xlabel("sampler steps (log scale)")


def guidance_axis(ax: Axes, scales: Sequence[float], min_gap: float = 0.05) -> None:
    """Linear x axis with a tick at each guidance scale run (see _spaced)."""
    ticks = sorted(set(scales))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(_labels_for(_spaced(ticks, float, min_gap), "{:g}"))
    ax.set_xlabel("guidance scale (1 = conditional only)")


def _spaced(ticks: Sequence[float], pos, min_gap: float) -> list[float]:
    """The ticks to label, roundest first, skipping any closer than ``min_gap`` of the axis to one kept.

    Crowded values (15 next to 20 steps, 1.1 next to 1.2 on a 1..6 axis) keep their tick mark but
    only the rounder one keeps its label, so labels never run into each other.
    """
    span = (pos(max(ticks)) - pos(min(ticks))) * 1.1 or 1.0
    kept: list[float] = []
    for t in sorted(ticks, key=lambda t: (-_roundness(t), t)):
        if all(abs(pos(t) - pos(u)) >= min_gap * span for u in kept):
            kept.append(t)
    return kept


def _roundness(x: float) -> int:
    """How many of 10, 5, 2, 1, 0.5 divide x: 20 (5) before 15 (3) before 7 (2) before 1.2 (0)."""
    return sum(abs(x / d - round(x / d)) < 1e-9 for d in (10, 5, 2, 1, 0.5))


def _labels_for(kept: list[float], fmt: str) -> FuncFormatter:
    return FuncFormatter(lambda v, _: fmt.format(v) if any(math.isclose(v, k) for k in kept) else "")


class PercentTicks(Formatter):
    """Fractions as percentages with just the decimals the tick spacing needs: 99.5%, 99.92%, never 99.920%."""

    ticks: list[float] = []

    def set_locs(self, locs) -> None:
        self.ticks = sorted(locs)

    def __call__(self, x: float, pos: int | None = None) -> str:
        locs = self.ticks
        step = min((b - a for a, b in zip(locs, locs[1:])), default=0.01) * 100
        decimals = max(0, math.ceil(-math.log10(step) - 1e-9)) if step > 0 else 1
        return f"{x * 100:.{decimals}f}%"


def percent_axis(ax: Axes, values: Sequence[float], label: str) -> None:
    """y in [0, 1] shown as percentages; never above 100% (a flat 100% line gets a sliver of room)."""
    vals = [v for v in values if math.isfinite(v)]
    if vals:
        lo, hi = min(vals), max(vals)
        pad = max((hi - lo) * 0.08, 0.001)
        ax.set_ylim(lo - pad, min(hi + pad, 1.0 + pad / 2))
    ax.yaxis.set_major_locator(MaxNLocator(7, steps=[1, 2, 5, 10], min_n_ticks=4))  # spacings PercentTicks can print exactly
    ax.yaxis.set_major_formatter(PercentTicks())
    ax.set_ylabel(f"{label} (%)")


def value_axis(ax: Axes, values: Sequence[float], label: str) -> None:
    """Plain-number y axis; logarithmic when the values span more than LOG_SPAN x (FLD at g=1 vs g=6)."""
    pos = [v for v in values if math.isfinite(v) and v > 0]
    if pos and max(pos) / min(pos) > LOG_SPAN:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
        ax.yaxis.set_minor_formatter(NullFormatter())
        label += " (log scale)"
    else:
        ax.yaxis.set_major_locator(MaxNLocator(6, steps=[1, 2, 2.5, 5, 10]))
    ax.yaxis.set_major_formatter(_plain)
    ax.set_ylabel(label)


def _legend_below(ax: Axes) -> None:
    """Legend under the axes, outside the data area, so it can never cover a point."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize="small", frameon=False)


def _floor(ax: Axes, value: float | None, label: str, color: str = "0.35", percent: bool = False) -> None:
    """A dashed reference line at a real-data floor; its value goes in the legend (it may sit between ticks)."""
    if value is not None and math.isfinite(value):
        ax.axhline(value, color=color, label=f"{label} ({value:.2%})" if percent else f"{label} ({value:.3g})", **FLOOR_STYLE)


def _line(ax: Axes, xs: Sequence[float], ys: Sequence[float], label: str, **kw) -> str:
    pts = sorted((x, y) for x, y in zip(xs, ys) if math.isfinite(y))
    (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **{"marker": "o", "markersize": 4, **kw})
    return line.get_color()


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# ------------------------------------------------------------------------------------------ loss
def loss_plot(steps: Sequence[float], losses: Sequence[float], path: str | Path | None = None,
              title: str = "training loss") -> Figure:
    """Training loss against optimizer step (one point per logged interval)."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    _line(ax, steps, losses, "loss", markersize=2 if len(steps) > 50 else 4)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    value_axis(ax, losses, "training loss (mean over the log interval)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if path is not None:
        save_figure(fig, path)
    return fig


# ------------------------------------------------------------------------------------------ sweep panels
def interval_groups(runs: list[dict], num_timesteps: int | None = None) -> list[tuple[str | None, list[dict]]]:
    """Guidance runs split into lines, in sweep order, as (label, runs): one per guidance interval ("t in
    [100, 800]", "every step") and per swept setting (a run's ``label``, from ``sweep --vary``). A single
    group (label None) when the runs share both, or carry neither (older sweeps)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        iv = r.get("guidance_interval")
        groups.setdefault((None if iv is None else tuple(iv), r.get("label")), []).append(r)
    if len(groups) <= 1:
        return [(None, runs)]
    several_intervals = len({iv for iv, _ in groups}) > 1

    def name(iv: tuple | None, label: str | None) -> str:
        parts = [interval_label(iv, num_timesteps)] if several_intervals or not label else []
        return ", ".join(parts + ([label] if label else []))

    return [(name(iv, label), rs) for (iv, label), rs in groups.items()]


def _named(metric: str, group: str | None) -> str:
    return metric if group is None else f"{metric}, {group}"


def _pair_panel(ax: Axes, runs: list[dict], floor: dict, keys: tuple[str, str], names: tuple[str, str],
                floor_names: tuple[str, str], num_timesteps: int | None) -> None:
    """Two metrics against guidance scale, a line pair per guidance interval, each metric with its floor.

    One interval: two colours, each floor in its metric's colour. Several: one colour per interval, the
    second metric dotted, the floors grey.
    """
    groups = interval_groups(runs, num_timesteps)
    multi = len(groups) > 1
    for group, rs in groups:
        gx = [r["guidance_scale"] for r in rs]
        c1 = _line(ax, gx, [r["metrics"][keys[0]] for r in rs], _named(names[0], group))
        c2 = _line(ax, gx, [r["metrics"][keys[1]] for r in rs], _named(names[1], group),
                   **({"color": c1, "linestyle": ":"} if multi else {}))
    for key, name, color in zip(keys, floor_names, ("0.35", "0.6") if multi else (c1, c2)):
        _floor(ax, floor.get(key), name, color, percent=key.endswith("accuracy"))
    guidance_axis(ax, [r["guidance_scale"] for r in runs])


def guidance_accuracy_panel(ax: Axes, runs: list[dict], floor: dict, num_timesteps: int | None = None) -> None:
    """Conditional accuracy (all digits and the worst class) against guidance scale, a pair per interval."""
    _pair_panel(ax, runs, floor, ("accuracy", "worst_class_accuracy"), ("accuracy", "worst class"),
                ("classifier on real test digits", "its worst class"), num_timesteps)
    percent_axis(ax, [r["metrics"][k] for r in runs for k in ("accuracy", "worst_class_accuracy")]
                 + [floor.get("accuracy", math.nan), floor.get("worst_class_accuracy", math.nan)], "accuracy")
    ax.set_title("accuracy vs guidance")


def guidance_metric_panel(ax: Axes, runs: list[dict], floor: dict, key: str, label: str,
                          num_timesteps: int | None = None) -> None:
    """One distance (FLD, per-class FLD) against guidance scale, a line per interval, with its real-data floor."""
    groups = interval_groups(runs, num_timesteps)
    for group, rs in groups:
        c = _line(ax, [r["guidance_scale"] for r in rs], [r["metrics"][key] for r in rs], group or label)
    ys = [r["metrics"][key] for r in runs]
    _floor(ax, floor.get(key), "real-data floor", c if len(groups) == 1 else "0.35")
    guidance_axis(ax, [r["guidance_scale"] for r in runs])
    value_axis(ax, ys + [floor.get(key, math.nan)], label)
    ax.set_title(f"{label} vs guidance (lower is better)")


def guidance_precision_recall_panel(ax: Axes, runs: list[dict], floor: dict, num_timesteps: int | None = None) -> None:
    """Precision (fidelity) and recall (diversity) against guidance scale, a pair per interval, with floors."""
    _pair_panel(ax, runs, floor, ("precision", "recall"), ("precision", "recall"), ("precision floor", "recall floor"),
                num_timesteps)
    ax.yaxis.set_major_formatter(_plain)
    ax.set_ylabel(f"precision / recall (k={runs[0]['metrics'].get('k', 3)})" if runs else "precision / recall")
    ax.set_title("precision and recall vs guidance")


def steps_panel(ax: Axes, runs: list[dict], floor: dict, key: str, label: str) -> None:
    """One metric against sampler steps, a line per sampler, with the real-data floor."""
    by_sampler: dict[str, list[dict]] = {}
    for r in runs:
        by_sampler.setdefault(r["sampler"], []).append(r)
    for name, rs in by_sampler.items():
        _line(ax, [r["steps"] for r in rs], [r["metrics"][key] for r in rs], name)
    _floor(ax, floor.get(key), "classifier on real test digits" if key == "accuracy" else "real-data floor",
           percent=key == "accuracy")
    steps_axis(ax, [r["steps"] for r in runs])
    values = [r["metrics"][key] for r in runs] + [floor.get(key, math.nan)]
    if key.endswith("accuracy"):
        percent_axis(ax, values, label)
    else:
        value_axis(ax, values, label)
    ax.set_title(f"{label} vs steps")


# ------------------------------------------------------------------------------------------ sweep figure
def guidance_like_settings(sweep: dict) -> list[dict]:
    """A --settings sweep's rows when they differ only in guidance scale and interval, over at least two scales
    (so the guidance panels draw them as guidance runs); [] otherwise, which these panels cannot show."""
    rows = sweep.get("settings") or []
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("setting"), dict) for r in rows):
        return []  # not what `sweep --settings` writes
    rest = [{k: v for k, v in r["setting"].items() if k not in ("guidance_scale", "guidance_interval")} for r in rows]
    if len({r["setting"].get("guidance_scale") for r in rows}) < 2 or any(r != rest[0] for r in rest):
        return []  # a single guidance scale is no curve
    return [{k: v for k, v in r.items() if k != "label"} for r in rows]  # one line per interval, not per setting


def sweep_has_curves(sweep: dict) -> bool:
    """Whether ``sweep_plot`` has anything to draw: guidance or sampler runs, or guidance-like --settings."""
    def runs(key: str) -> bool:  # a list of run records, as `sweep --out` writes (an `ldm --out` file has a number here)
        rows = sweep.get(key)
        return isinstance(rows, list) and bool(rows) and all(isinstance(r, dict) and isinstance(r.get("metrics"), dict)
                                                             for r in rows)

    return runs("guidance") or runs("sampler") or bool(guidance_like_settings(sweep))


def sweep_plot(sweep: dict, floor: dict, path: str | Path | None = None) -> Figure:
    """The sweep as one 2x3 figure: four panels against guidance scale, then two against sampler steps.

    ``sweep`` is what ``python -m latentdiff.evaluate sweep --out`` writes (its "guidance" and "sampler"
    run lists); ``floor`` the real-data metrics at the same N. Guidance runs at several guidance
    intervals draw one line per interval on each guidance panel. A sweep of ``--settings`` alone is drawn
    when its settings differ only in guidance scale and interval (``guidance_like_settings``).
    """
    g, s = sweep.get("guidance", []) or guidance_like_settings(sweep), sweep.get("sampler", [])
    T = sweep.get("num_timesteps")
    n = (g or s)[0]["metrics"].get("n") if (g or s) else None
    fig = Figure(figsize=(15, 9.5), layout="constrained")
    axes = fig.subplots(2, 3)
    if g:
        guidance_accuracy_panel(axes[0, 0], g, floor, T)
        guidance_metric_panel(axes[0, 1], g, floor, "fld", "FLD", T)
        guidance_metric_panel(axes[0, 2], g, floor, "fld_per_class_mean", "mean per-class FLD", T)
        guidance_precision_recall_panel(axes[1, 0], g, floor, T)
    if s:
        steps_panel(axes[1, 1], s, floor, "fld", "FLD")
        steps_panel(axes[1, 2], s, floor, "accuracy", "accuracy")
    for ax in axes.flat:
        if ax.has_data():
            ax.grid(alpha=0.3)
            _legend_below(ax)
        else:
            ax.set_axis_off()
    n_text = f"; N = {n:,} samples per point (floors at the same N)" if n else ""
    spacing = f" ({sweep['spacing']} spacing)" if "spacing" in sweep else ""  # sweeps from before intervals: neither
    interval = f", {interval_label(sweep['sampler_interval'], T)}" if "sampler_interval" in sweep else ""
    fig.suptitle(f"guidance sweep at {sweep.get('default_sampler', '?')}{spacing}; sampler sweep at guidance "
                 f"{sweep.get('sampler_guidance', math.nan):g}{interval}{n_text}")
    if path is not None:
        save_figure(fig, path)
    return fig
