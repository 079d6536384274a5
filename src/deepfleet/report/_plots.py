"""The report's plots: small aggregated frames in, PNG bytes out.

Plots never see raw measurement rows: latency distributions arrive as percentiles (drawn as
box plots from those statistics), Pareto plots as one point per candidate. That keeps a
100 000-row report fast and its HTML small. Figures are built with ``matplotlib.figure.Figure``
directly (no pyplot): no global state, no GUI backend, safe in any thread.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from deepfleet.report._analysis import ENERGY_COLUMNS

__all__ = ["drift_png", "latency_box_png", "layers_png", "objectives_png", "pareto_png"]

_DPI = 90  # ~50 kB per figure: sharp enough on screen, small enough to embed a dozen


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _legend_below(fig: Figure, axes: Any) -> None:
    """One legend for the whole figure, below its panels (outside every axes, so it never hides
    a point: the original's star often sits in a corner a legend inside would take), with each
    label once, in as many columns as the figure's width holds (about 1.9 inches each)."""
    entries: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        ncols = max(1, min(len(entries), int(fig.get_figwidth() / 1.9)))
        fig.legend(list(entries.values()), list(entries), loc="outside lower center",
                   ncols=ncols, fontsize=7, frameon=False)


def _maybe_log(ax: Axes, values: np.ndarray, axis: str = "x") -> None:
    """Log scale when the positive values span more than 8x (compressed models often do)."""
    v = values[np.isfinite(values) & (values > 0)]
    if len(v) and v.max() / v.min() > 8:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        # plain numbers at 1-2-5 steps: matplotlib's default minor labels (2x10^0, 3x10^0, ...)
        # collide on a narrow panel
        target = ax.xaxis if axis == "x" else ax.yaxis
        target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        target.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
        target.set_minor_formatter(NullFormatter())


def _pareto_panel(ax: Axes, pts: pd.DataFrame, column: str, front: str, label: str,
                  baseline: Mapping[str, Any] | None, chosen: Mapping[str, Any] | None,
                  accuracy_floor: float | None) -> None:
    x = pts[column].to_numpy(dtype=float)
    y = pts["accuracy_val"].to_numpy(dtype=float)
    feasible = pts["feasible"].to_numpy(dtype=bool)
    on_front = pts[front].to_numpy(dtype=bool)
    ax.scatter(x[~feasible], y[~feasible], marker="x", s=14, c="#999999", label="infeasible")
    ax.scatter(x[feasible], y[feasible], s=14, c="#4c78a8", alpha=0.7, label="feasible")
    order = np.argsort(x[on_front])
    ax.step(x[on_front][order], y[on_front][order], where="post", c="#e45756", lw=1.5,
            label="Pareto front (feasible)")
    if baseline is not None and not math.isnan(float(baseline.get(column, math.nan))):
        ax.scatter([baseline[column]], [baseline["accuracy_val"]], marker="*", s=160, c="black",
                   label="original", zorder=5)
    if chosen is not None:
        ax.scatter([chosen[column]], [chosen["accuracy_val"]], s=150, facecolors="none",
                   edgecolors="#d62728", linewidths=2.2, label=f"chosen (trial {chosen['trial']})",
                   zorder=6)
    if accuracy_floor is not None:
        ax.axhline(accuracy_floor, ls="--", c="#555555", lw=0.8, label="accuracy limit")
    base_x = float(baseline.get(column, math.nan)) if baseline is not None else math.nan
    _maybe_log(ax, np.append(x, base_x))  # the original is often 10x off to the right
    ax.set_xlabel(label)
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)


def pareto_png(pts: pd.DataFrame, *, title: str, baseline: Mapping[str, Any] | None,
               chosen: Mapping[str, Any] | None, accuracy_floor: float | None) -> bytes:
    """Accuracy vs p50 latency, and vs energy of each kind that has values, side by side.

    ``pts`` comes from :func:`~deepfleet.report._analysis.pareto_points`; ``baseline`` and
    ``chosen`` are rows with the same columns (or None); ``accuracy_floor`` draws the limit.
    """
    panels = [("p50_ms", "front_latency", "p50 latency (ms)")]
    for kind, column in ENERGY_COLUMNS.items():
        if pts[column].notna().any():
            panels.append((column, f"front_{column}", f"energy per run, {kind.upper().replace('_', ' ')} (mJ)"))
    fig = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (column, front, label) in zip(axes, panels):
        _pareto_panel(ax, pts, column, front, label, baseline, chosen, accuracy_floor)
    _legend_below(fig, axes)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def latency_box_png(stats: pd.DataFrame, *, title: str) -> bytes:
    """Box plots from precomputed percentiles (``latency_table`` rows), one panel per role
    (artifact) with its own scale, one box per device: box q1..q3, line p50, whiskers p1..p99,
    a tick at p90. Separate panels because a compressed model is often 10x faster than the
    original: on a shared axis its boxes would be flat lines."""
    roles = sorted(set(stats["role"]), key=lambda r: (r != "original", r))  # original first
    cols = min(3, len(roles))
    nrows = math.ceil(len(roles) / cols)
    devices = stats.groupby("role").size().max()  # boxes: one per (device, runtime)
    fig = Figure(figsize=(cols * max(3.2, 0.55 * devices + 1.4), 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, role in zip(axes, roles):
        g = stats.loc[stats["role"] == role].sort_values("device", kind="stable")
        g = g.sort_values(["device", "backend"], kind="stable")
        boxes = [{"label": f"{d} ({b})", "med": p50, "q1": q1, "q3": q3, "whislo": p1, "whishi": p99,
                  "fliers": []}
                 for d, b, p50, q1, q3, p1, p99 in zip(g["device"], g["backend"], g["p50_ms"], g["q1_ms"],
                                                       g["q3_ms"], g["p1_ms"], g["p99_ms"])]
        ax.bxp(boxes, showfliers=False, patch_artist=True,
               boxprops={"facecolor": "#c6dbef", "edgecolor": "#2171b5"},
               medianprops={"color": "#d62728", "lw": 1.5})
        ax.scatter(np.arange(1, len(boxes) + 1), g["p90_ms"], marker="_", s=80, c="black",
                   label="p90", zorder=4)
        # heavy tails (a busy device: p99 20x the median) would squash the box on a linear axis
        _maybe_log(ax, g[["p1_ms", "p99_ms"]].to_numpy(dtype=float).ravel(), axis="y")
        ax.set_title(role if len(role) < 40 else role[:37] + "...", fontsize=9)
        ax.set_ylabel("latency per run (ms)")
        ax.tick_params(axis="x", labelsize=7, rotation=45)
        ax.grid(axis="y", alpha=0.3)
    _legend_below(fig, axes)
    for ax in axes[len(roles):]:
        ax.set_visible(False)
    fig.suptitle(title + "  (box: q1-q3, whiskers: p1-p99)", fontsize=10)
    return _png(fig)


def layers_png(layers: pd.DataFrame, *, title: str) -> bytes:
    """Units per layer before and after compression (grouped bars, kept % written on top)."""
    x = np.arange(len(layers))
    before = layers["units_before"].to_numpy(dtype=float)
    after = layers["units_after"].to_numpy(dtype=float)
    fig = Figure(figsize=(max(5.0, 0.9 * len(layers) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    ax.bar(x - 0.2, before, 0.4, label="units before", color="#bdbdbd")
    ax.bar(x + 0.2, after, 0.4, label="units kept", color="#3182bd")
    for xi, b, a in zip(x, before, after):
        if b > 0:
            ax.text(xi + 0.2, a, f"{100 * a / b:.0f}%", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [str(n) for n in layers["layer"]], rotation=30, fontsize=8)
    _maybe_log(ax, before, axis="y")
    ax.set_ylabel("units (neurons / filters / hidden units)")
    _legend_below(fig, ax)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def objectives_png(candidates: pd.DataFrame, chosen_trials: set[int]) -> bytes | None:
    """Each objective (the candidates' ``objectives``) against the trial number, one panel per
    objective, measured and predicted values marked apart; None when there are no objectives."""
    rows = candidates.loc[candidates["trial"].notna() & candidates["objectives"].notna()]
    values: dict[str, list[tuple[int, float, str]]] = {}
    for trial, told, source in zip(rows["trial"], rows["objectives"], rows["values_source"]):
        for o in told:
            label, v = o["metric"] + (f" on {o['device_class']}" if o["device_class"] else ""), o["value"]
            if v is not None:
                values.setdefault(label, []).append(
                    (int(trial), float(v), source if isinstance(source, str) else "unknown"))
    if not values:
        return None
    labels = sorted(values)
    cols = min(3, len(labels))
    nrows = math.ceil(len(labels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, label in zip(axes, labels):
        data = values[label]
        for source, marker in (("measured", "o"), ("predicted", "^"), ("placeholder", "x"),
                               ("unknown", ".")):
            pts = [(t, v) for t, v, s in data if s == source]
            if pts:
                t, v = zip(*pts)
                ax.scatter(t, v, s=12, marker=marker, alpha=0.7, label=source)
        picked = [(t, v) for t, v, _ in data if t in chosen_trials]
        if picked:
            t, v = zip(*picked)
            ax.scatter(t, v, s=120, facecolors="none", edgecolors="#d62728", lw=2, label="chosen")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("trial")
        ax.grid(alpha=0.3)
    _legend_below(fig, axes)
    for ax in axes[len(labels):]:
        ax.set_visible(False)
    return _png(fig)


def _binned(times: np.ndarray, values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``bins`` points: consecutive runs of checks replaced by their medians."""
    if len(times) <= bins:
        return times, values
    chunks = np.array_split(np.arange(len(times)), bins)
    return (np.array([times[c[len(c) // 2]] for c in chunks]),
            np.array([np.median(values[c]) for c in chunks]))


def drift_png(reference: pd.DataFrame, max_points: int = 150) -> bytes:
    """p50 of the drift-check rows against time, one line per (device, reference artifact);
    a line with more than ``max_points`` checks shows medians of consecutive checks. The time
    axis spans the checks plus 5 % (at least a minute each side): matplotlib alone stretches a
    single instant to years."""
    fig = Figure(figsize=(8.0, 3.6), layout="constrained")
    ax = fig.subplots()
    times = reference["started_at"].dt.tz_localize(None)
    for (device, h), g in reference.groupby(["device", "artifact_hash"], sort=True):
        g = g.sort_values("started_at")
        t, v = _binned(g["started_at"].dt.tz_localize(None).to_numpy(),
                       g["p50_ms"].to_numpy(dtype=float), max_points)
        ax.plot(t, v, marker=".", ms=3, lw=1, label=f"{device} ({h[:8]})")
    if len(times):
        first, last = times.min(), times.max()
        pad = max((last - first) * 0.05, pd.Timedelta(minutes=1))
        ax.set_xlim(first - pad, last + pad)
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_ylabel("reference p50 (ms)")
    ax.set_xlabel("time (UTC)")
    ax.grid(alpha=0.3)
    _legend_below(fig, ax)
    ax.set_title("drift checks: the same reference model measured again over time", fontsize=10)
    return _png(fig)
