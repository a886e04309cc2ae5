"""The leaderboard's columns as text for people, shared by the table, Markdown and HTML."""

from __future__ import annotations

from typing import Any

from nnarena.bench.report import units
from nnarena.bench.report.summary import STATUSES

__all__ = ["COLUMNS", "COMPACT", "cells", "runs_cell"]

COLUMNS = (
    "dataset", "model", "rule", "sparsity", "runs", "metric", "test metric", "Δ base",
    "train time", "× time", "act. memory", "× mem", "params ≠0", "× params", "FLOPs/sample",
    "× FLOPs", "inference", "samples/s", "front", "notes",
)
# The text table: one per dataset (no dataset and metric columns), notes printed below it.
COMPACT = tuple(c for c in COLUMNS if c not in ("dataset", "metric", "params ≠0", "FLOPs/sample",
                                                "samples/s", "notes"))


def cells(entry: dict[str, Any]) -> dict[str, str]:
    """Column name -> formatted cell for one `summarize` entry."""
    metric = entry["metric"]
    value = units.metric(entry["metric_mean"], entry["metric_std"])
    if not entry["n_measured"]:
        value = ", ".join(s for s in STATUSES if entry["statuses"][s])
    front = [name for name, key in (("mem", "pareto_memory"), ("time", "pareto_time"))
             if entry[key]]
    return {
        "dataset": entry["dataset"],
        "model": entry["model"],
        "rule": entry["rule"],
        "sparsity": entry["sparsity"],
        "runs": runs_cell(entry),
        "metric": f"{metric} {'↑' if entry['higher_is_better'] else '↓'}" if metric else units.DASH,
        "test metric": value,
        "Δ base": "baseline" if entry["is_baseline"] else units.delta(entry["delta_metric"]),
        "train time": units.seconds(entry["train_seconds_mean"], entry["train_seconds_std"]),
        "× time": units.ratio(entry["x_time"]),
        "act. memory": units.nbytes(entry["peak_saved_activation_bytes_mean"],
                                    entry["peak_saved_activation_bytes_std"]),
        "× mem": units.ratio(entry["x_memory"]),
        "params ≠0": units.count(entry["params_nonzero_mean"]),
        "× params": units.ratio(entry["x_params"]),
        "FLOPs/sample": units.count(entry["flops_per_sample_mean"]),
        "× FLOPs": units.ratio(entry["x_flops"]),
        "inference": units.seconds(entry["inference_seconds_mean"]),
        "samples/s": units.count(entry["samples_per_second_mean"]),
        "front": " ".join(front),
        "notes": "; ".join(entry["reasons"]),
    }


def runs_cell(entry: dict[str, Any]) -> str:
    """``3/3 ok``, or ``1/3 ok, 1 diverged, 1 failed``."""
    others = [f"{n} {s}" for s, n in entry["statuses"].items() if s != "ok" and n]
    return ", ".join([f"{entry['n_ok']}/{entry['n_seeds']} ok", *others])
