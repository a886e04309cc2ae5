"""The leaderboard's columns as text for people, shared by the table, Markdown and HTML."""

from __future__ import annotations

from typing import Any

from nnarena.bench.report import units
from nnarena.bench.report.summary import STATUSES

__all__ = ["COLUMNS", "COMPACT", "SPARSITY_COLUMNS", "cells", "columns_for", "runs_cell"]

COLUMNS = (
    "dataset", "model", "rule", "sparsity", "runs", "metric", "test metric", "Δ base",
    "train time", "× time", "act. memory", "× mem", "params ≠0", "× params", "zeros",
    "FLOPs/sample", "× FLOPs", "inference", "sparse inference", "sparse speed-up", "samples/s",
    "front", "notes",
)
# The text table: one per dataset (no dataset and metric columns), notes printed below it.
COMPACT = tuple(c for c in COLUMNS if c not in ("dataset", "metric", "params ≠0", "FLOPs/sample",
                                                "sparse inference", "samples/s", "notes"))
# Shown only where some group is pruned: measured zeros, with measured latency beside them.
SPARSITY_COLUMNS = ("zeros", "sparse inference", "sparse speed-up")


def columns_for(entries: list[dict[str, Any]], columns: tuple[str, ...]) -> tuple[str, ...]:
    """``columns`` without the sparsity ones when no entry has a sparsity method."""
    if any(e["sparsity"] != "none" for e in entries):
        return columns
    return tuple(c for c in columns if c not in SPARSITY_COLUMNS)


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
        "zeros": units.percent(entry["sparsity_mean"]),
        "FLOPs/sample": units.count(entry["flops_per_sample_mean"]),
        "× FLOPs": units.ratio(entry["x_flops"]),
        "inference": units.seconds(entry["inference_seconds_mean"]),
        "sparse inference": units.seconds(entry["sparse_inference_seconds_mean"]),
        "sparse speed-up": units.ratio(entry["sparse_speedup"]),
        "samples/s": units.count(entry["samples_per_second_mean"]),
        "front": " ".join(front),
        "notes": "; ".join(entry["reasons"]),
    }


def runs_cell(entry: dict[str, Any]) -> str:
    """``3/3 ok``, or ``1/3 ok, 1 diverged, 1 failed``."""
    others = [f"{n} {s}" for s, n in entry["statuses"].items() if s != "ok" and n]
    return ", ".join([f"{entry['n_ok']}/{entry['n_seeds']} ok", *others])
