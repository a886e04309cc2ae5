"""Figures as base64 PNG (matplotlib's Agg canvas, imported on first use, no pyplot state).

Per dataset: the test metric against peak saved-activation memory and against train time, one
point per group with seed error bars and the Pareto front marked; and learning curves.
"""

from __future__ import annotations

import base64
import io
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from nnarena.bench.report import units

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["curves_png", "tradeoff_png"]

_PANELS = (
    ("peak_saved_activation_bytes", "pareto_memory", "peak saved activations", "bytes"),
    ("train_seconds", "pareto_time", "train wall time", "seconds"),
)
_FRONT_COLOR = "#d62728"


def tradeoff_png(entries: Sequence[dict[str, Any]]) -> str | None:
    """Metric vs memory and vs time for one dataset's groups (``None`` when nothing to plot)."""
    if not any(_finite(e["metric_mean"]) for e in entries):
        return None
    fig = _figure(11.5, 4.6)
    for ax, (cost, flag, label, kind) in zip(fig.subplots(1, 2), _PANELS, strict=True):
        xs = [e[f"{cost}_mean"] for e in entries if _finite(e[f"{cost}_mean"])]
        factor, unit = units.scale(max(xs, default=0.0), kind)
        _tradeoff_panel(ax, entries, cost, flag, factor)
        first = entries[0]
        better = "higher" if first["higher_is_better"] else "lower"
        ax.set_title(_text(f"{first['dataset']}: test {first['metric']} vs {label}"))
        ax.set_xlabel(f"{label} ({unit})")
        ax.set_ylabel(_text(f"test {first['metric']} ({better} is better)"))
    return _png(fig)


def curves_png(entries: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]
               ) -> str | None:
    """Validation metric vs epoch, mean over each group's seeds (``None`` without histories)."""
    fig = _figure(11.5, 4.2)
    ax = fig.subplots()
    plotted = False
    for color, entry in zip(_colors(), entries, strict=False):
        curve = _mean_curve([r for r in rows if r["group"] == entry["group"]
                             and r["status"] != "failed"], f"val_{entry['metric']}")
        if curve:
            epochs, values = zip(*curve, strict=True)
            ax.plot(epochs, values, marker=".", color=color, label=_text(entry["label"]),
                    linestyle="--" if entry["is_baseline"] else "-")
            plotted = True
    if not plotted:
        return None
    first = entries[0]
    ax.set_title(_text(f"{first['dataset']}: learning curves (mean over seeds)"))
    ax.set_xlabel("epoch")
    ax.set_ylabel(_text(f"val {first['metric']}"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _png(fig)


def _tradeoff_panel(ax: Axes, entries: Sequence[dict[str, Any]], cost: str, flag: str,
                    factor: float) -> None:
    """One point per group at (cost / ``factor``, metric), the Pareto front highlighted."""
    front = []
    for i, (color, entry) in enumerate(zip(_colors(), entries, strict=False)):
        x, y = entry[f"{cost}_mean"], entry["metric_mean"]
        if not (_finite(x) and _finite(y)):
            continue
        x /= factor
        on_front = entry[flag]
        ax.errorbar(x, y, xerr=(entry[f"{cost}_std"] or 0.0) / factor,
                    yerr=entry["metric_std"] or 0.0, fmt="s" if entry["is_baseline"] else "o",
                    color=color, capsize=3, markersize=8 if on_front else 6, zorder=3,
                    markeredgecolor=_FRONT_COLOR if on_front else color, markeredgewidth=2)
        ax.annotate(_text(entry["label"]), (x, y), textcoords="offset points",
                    xytext=(6, 5 if i % 2 else -11),
                    fontsize=8)
        if on_front:
            front.append((x, y))
    if front:
        xs, ys = zip(*sorted(front), strict=True)
        ax.step(xs, ys, where="post", color=_FRONT_COLOR, alpha=0.6, zorder=2,
                label="Pareto front")
        ax.legend(fontsize=8, loc="best", frameon=False)
    xs = [e[f"{cost}_mean"] for e in entries if _finite(e[f"{cost}_mean"])]
    ax.margins(x=0.15, y=0.12)
    if xs and min(xs) > 0 and max(xs) / min(xs) > 30:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0)
    ax.grid(alpha=0.3)


def _mean_curve(runs: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for log in run.get("history") or ():
            if _finite(log.get(key)):
                by_epoch.setdefault(log["epoch"], []).append(log[key])
    return [(epoch, math.fsum(v) / len(v)) for epoch, v in sorted(by_epoch.items())]


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _colors() -> Iterator[tuple[float, ...]]:
    from matplotlib import colormaps

    return itertools.cycle(colormaps["tab10"].colors)


def _text(text: str) -> str:
    """Labels are shown as written: ``$`` would start matplotlib mathtext."""
    return str(text).replace("$", r"\$")


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
