"""The report: seed statistics checked against hand computations, every format, escaping."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nnarena.bench.report import FORMATS, render, summarize, units, write_report

BUDGET = "2 epochs per cell"
XSS = "<script>alert(1)</script>"
CHROMIUM = Path("/usr/bin/chromium")

# dataset -> metric, groups: (model, rule, sparsity, baseline, per-seed metric, seconds, bytes).
# digits (accuracy, higher is better): memory front {base, dfa}, time front {base, cnn}.
# diabetes (rmse, lower is better): memory front {base, cnn}, time front {base, cnn, dfa};
# dfa ties the baseline's memory with a worse rmse, so it is dominated there.
SPEC: dict[str, tuple[str, list[tuple[Any, ...]]]] = {
    "digits": ("accuracy", [
        ("cnn", "backprop", "50%", False, [0.84, 0.85, 0.86], [0.5, 0.4, 0.6], [200e3] * 3),
        ("mlp", "backprop", "none", True, [0.89, 0.90, 0.91], [2.0, 2.1, 1.9], [100e3] * 3),
        ("mlp", "dfa", "none", False, [0.79, 0.81, None], [1.0, 1.2, None], [50e3, 50e3, None]),
    ]),
    "diabetes": ("rmse", [
        ("mlp", "backprop", "none", True, [0.50, 0.52, 0.48], [1.0, 1.0, 1.0], [100e3] * 3),
        ("mlp", "dfa", "none", False, [0.55, 0.70, 0.58], [0.5, 0.4, 0.6], [100e3] * 3),
        ("cnn", "backprop", "50%", False, [0.40, 0.41, 0.39], [2.0, 2.5, 1.5], [300e3] * 3),
    ]),
}
FAILED = ("digits", "dfa", 2)  # dataset, rule, seed of the failed cell
DIVERGED = ("diabetes", "dfa", 1)


def _row(dataset: str, metric: str, model: str, rule: str, sparsity: str, baseline: bool,
         seed: int, value: float | None, seconds: float | None, nbytes: float | None,
         dfa_label: str, reason_suffix: str) -> dict[str, Any]:
    status = ("failed" if (dataset, rule, seed) == FAILED else
              "diverged" if (dataset, rule, seed) == DIVERGED else "ok")
    rule = dfa_label if rule == "dfa" else rule
    group = f"{dataset} | {model} | {rule} | {sparsity}"
    params = 1000 if model == "mlp" else 4000
    metrics = {} if status == "failed" else {
        "task_metric": metric, f"test_{metric}": value, "test_loss": 0.3,
        "train_seconds": seconds, "peak_saved_activation_bytes": nbytes,
        "params_total": params, "params_nonzero": params // 2 if sparsity == "50%" else params,
        "flops_per_sample": 2.0 * params, "inference_seconds": 0.001 * (1 + seed),
        "samples_per_second": 1000.0 / seconds,
        **({"sparsity": 0.5, "sparse_inference_seconds": 0.0005 * (1 + seed)}
           if sparsity == "50%" else {}),
    }
    history = [] if status == "failed" else [
        {"epoch": e, "step": 10 * e, "train_loss": 1.0 / e, f"val_{metric}": value * e / 2,
         "seconds": seconds * e / 2} for e in (1, 2)]
    reasons = {"failed": "RuntimeError: out of memory", "diverged": "training loss became nan"}
    reason = reasons[status] + reason_suffix if status in reasons else ""
    return {"key": f"{group} | {seed}", "group": group, "dataset": dataset, "model": model,
            "rule": rule, "sparsity": sparsity, "seed": seed, "status": status, "reason": reason,
            "is_baseline": baseline, "metrics": metrics, "history": history, "params": {}}


def make_rows(dfa_label: str = "dfa", reason_suffix: str = "") -> list[dict[str, Any]]:
    """The rows of `SPEC`, in its order, 3 seeds per group."""
    return [_row(dataset, metric, model, rule, sparsity, baseline, seed, values[seed],
                 seconds[seed], nbytes[seed], dfa_label, reason_suffix)
            for dataset, (metric, groups) in SPEC.items()
            for model, rule, sparsity, baseline, values, seconds, nbytes in groups
            for seed in range(3)]


@pytest.fixture
def report_rows() -> list[dict[str, Any]]:
    return make_rows()


def _by_label(groups: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(g["dataset"], g["model"], g["rule"]): g for g in groups}


def _stats(values: list[float | None]) -> tuple[float, float]:
    kept = [v for v in values if v is not None]
    return statistics.mean(kept), statistics.stdev(kept)


def test_summary_order_counts_and_reasons(report_rows) -> None:
    groups = summarize(report_rows)
    assert [(g["dataset"], g["model"], g["rule"]) for g in groups] == [
        ("digits", "mlp", "backprop"), ("digits", "cnn", "backprop"), ("digits", "mlp", "dfa"),
        ("diabetes", "mlp", "backprop"), ("diabetes", "mlp", "dfa"),
        ("diabetes", "cnn", "backprop")]
    by = _by_label(groups)
    failed, diverged = by["digits", "mlp", "dfa"], by["diabetes", "mlp", "dfa"]
    assert (failed["n_seeds"], failed["n_ok"], failed["n_measured"]) == (3, 2, 2)
    assert failed["statuses"] == {"ok": 2, "diverged": 0, "failed": 1, "timeout": 0}
    assert failed["reasons"] == ["failed: RuntimeError: out of memory"]
    assert (diverged["n_ok"], diverged["n_measured"]) == (2, 3)
    assert diverged["reasons"] == ["diverged: training loss became nan"]
    assert by["digits", "mlp", "backprop"]["reasons"] == []
    assert [g["metric"] for g in groups] == ["accuracy"] * 3 + ["rmse"] * 3
    assert [g["higher_is_better"] for g in groups] == [True] * 3 + [False] * 3


@pytest.mark.parametrize("dataset", list(SPEC))
def test_summary_statistics_match_hand_computation(report_rows, dataset) -> None:
    spec = SPEC[dataset][1]
    by = _by_label(summarize(report_rows))
    base = next(s for s in spec if s[3])
    base_metric, base_time, base_mem = (_stats(base[i])[0] for i in (4, 5, 6))
    for model, rule, _, baseline, values, seconds, nbytes in spec:
        g = by[dataset, model, rule]
        mean, std = _stats(values)
        assert g["metric_mean"] == pytest.approx(mean)
        assert g["metric_std"] == pytest.approx(std)
        assert g["train_seconds_mean"] == pytest.approx(_stats(seconds)[0])
        assert g["train_seconds_std"] == pytest.approx(_stats(seconds)[1])
        assert g["peak_saved_activation_bytes_mean"] == pytest.approx(_stats(nbytes)[0])
        assert g["delta_metric"] == pytest.approx(mean - base_metric)
        assert g["x_time"] == pytest.approx(_stats(seconds)[0] / base_time)
        assert g["x_memory"] == pytest.approx(_stats(nbytes)[0] / base_mem)
        runs = [r for r in report_rows if r["group"] == g["group"] and r["metrics"]]
        assert g["inference_seconds_mean"] == pytest.approx(
            statistics.mean(r["metrics"]["inference_seconds"] for r in runs))
        assert g["samples_per_second_std"] == pytest.approx(
            statistics.stdev(r["metrics"]["samples_per_second"] for r in runs))
        assert g["is_baseline"] == baseline
    sparse = by[dataset, "cnn", "backprop"]
    assert sparse["params_total_mean"] == 4000 and sparse["params_nonzero_mean"] == 2000
    assert sparse["x_params"] == pytest.approx(2.0)  # nonzero: 2000 vs the baseline's 1000
    assert sparse["x_flops"] == pytest.approx(4.0)


def test_pareto_fronts_on_a_hand_made_configuration(report_rows) -> None:
    groups = summarize(report_rows)
    fronts = {flag: {(g["dataset"], g["model"], g["rule"]) for g in groups if g[flag]}
              for flag in ("pareto_memory", "pareto_time")}
    assert fronts["pareto_memory"] == {("digits", "mlp", "backprop"), ("digits", "mlp", "dfa"),
                                       ("diabetes", "mlp", "backprop"),
                                       ("diabetes", "cnn", "backprop")}
    assert fronts["pareto_time"] == {("digits", "mlp", "backprop"), ("digits", "cnn", "backprop"),
                                     ("diabetes", "mlp", "backprop"),
                                     ("diabetes", "cnn", "backprop"), ("diabetes", "mlp", "dfa")}


def test_no_baseline_no_relative_fields_and_nan_stays_off_the_front(report_rows) -> None:
    rows = [dict(r, is_baseline=False) for r in report_rows if r["dataset"] == "diabetes"]
    rows[0]["metrics"] = dict(rows[0]["metrics"], test_rmse=math.nan)
    groups = summarize(rows)
    assert all(g[k] is None for g in groups
               for k in ("delta_metric", "x_time", "x_memory", "x_params", "x_flops"))
    first = groups[0]
    assert math.isnan(first["metric_mean"])
    assert not first["pareto_memory"] and not first["pareto_time"]
    assert json.loads(render(rows, "json", title="t", budget=BUDGET))["groups"][0][
        "metric_mean"] is None


def test_all_failed_group_and_single_seed(report_rows) -> None:
    rows = [dict(r, status="failed", metrics={}, reason="ValueError: bad\ntraceback...")
            if r["rule"] == "dfa" else r for r in report_rows
            if not (r["model"] == "cnn" and r["seed"] == 1)]
    by = _by_label(summarize(rows))
    dead = by["digits", "mlp", "dfa"]
    assert dead["n_measured"] == 0 and dead["metric_mean"] is None
    assert dead["delta_metric"] is None and not dead["pareto_memory"]
    assert dead["reasons"] == ["failed: ValueError: bad"]
    two = by["digits", "cnn", "backprop"]
    assert two["metric_mean"] == pytest.approx(0.85) and two["metric_std"] == pytest.approx(
        statistics.stdev([0.84, 0.86]))
    table = render(rows, "table", title="t", budget=BUDGET)
    assert "failed: ValueError: bad" in table
    md = render(rows, "md", title="t", budget=BUDGET)
    assert "| 0/3 ok, 3 failed |" in md and "| failed |" in md


def test_units_for_people() -> None:
    assert units.nbytes(1536) == "1.50 KiB"
    assert units.nbytes(3 * 2**20, 0.25 * 2**20) == "3.00 ± 0.25 MiB"
    assert units.nbytes(0) == "0 B"
    assert units.seconds(0.012345) == "12.3 ms"
    assert units.seconds(2.0, 0.05) == "2.00 ± 0.050 s"
    assert units.seconds(1.0, 0.0) == "1.00 ± 0 s"
    assert units.seconds(12345.0) == "12,345 s"
    assert units.count(12_345) == "12.3k"
    assert units.ratio(1.234) == "1.23x" and units.ratio(None) == units.DASH
    assert units.delta(0.0123) == "+0.0123" and units.delta(-0.5) == "-0.500"
    assert units.metric(0.91234, 0.0041) == "0.9123 ± 0.0041"
    assert units.metric(math.nan) == "nan"


def test_table_and_markdown(report_rows) -> None:
    table = render(report_rows, "table", title="My arena", budget=BUDGET)
    assert "My arena" in table and BUDGET in table
    assert "0.9000 ± 0.010" in table  # digits baseline accuracy
    assert "1/3 failed" not in table and "2/3 ok, 1 failed" in table
    assert "failed: RuntimeError: out of memory" in table
    assert "2.00 ± 0.10 s" in table and "97.7 ± 0 KiB" in table and "0.50x" in table
    md = render(report_rows, "md", title="My arena", budget=BUDGET)
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| dataset |"))
    assert "| test metric | Δ base |" in header
    body = [line for line in lines if re.match(r"\| (digits|diabetes) \|", line)]
    assert len(body) == 6
    assert BUDGET in md
    assert "| -0.0500 |" in md and "| -0.100 |" in md  # digits cnn and dfa vs 0.90
    assert "| +0.110 |" in md  # diabetes dfa: rmse 0.61 vs 0.50, worse (rmse ↓)
    assert all(line.count(" | ") == header.count(" | ") for line in body)


def test_csv_parses_back(report_rows) -> None:
    groups = summarize(report_rows)
    parsed = list(csv.DictReader(io.StringIO(render(report_rows, "csv", title="t",
                                                    budget=BUDGET))))
    assert len(parsed) == len(groups) == 6
    for row, g in zip(parsed, groups, strict=True):
        assert row["group"] == g["group"]
        assert float(row["metric_mean"]) == pytest.approx(g["metric_mean"])
        assert float(row["peak_saved_activation_bytes_mean"]) == pytest.approx(
            g["peak_saved_activation_bytes_mean"])
        assert int(row["n_failed"]) == g["statuses"]["failed"]
        assert (row["x_time"] == "") == (g["x_time"] is None)
    assert parsed[2]["reasons"] == "failed: RuntimeError: out of memory"


def test_json_round_trips(report_rows) -> None:
    text = render(report_rows, "json", title="t", budget=BUDGET)
    data = json.loads(text)
    assert set(data) == {"title", "budget", "groups", "runs"}
    assert data["budget"] == BUDGET and data["runs"] == report_rows
    assert data["groups"] == json.loads(json.dumps(summarize(report_rows)))


def test_unknown_format_lists_the_valid_ones(report_rows, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown report format 'xlsx'") as err:
        render(report_rows, "xlsx", title="t", budget=BUDGET)
    assert "\n" not in str(err.value) and all(f in str(err.value) for f in FORMATS)
    with pytest.raises(ValueError, match="valid: table, csv, json, md, html"):
        write_report(report_rows, tmp_path, title="t", budget=BUDGET, formats=("pdf",))


def test_write_report_writes_each_format(report_rows, tmp_path) -> None:
    paths = write_report(report_rows, tmp_path / "out", title="t", budget=BUDGET)
    assert {k: p.name for k, p in paths.items()} == {
        "md": "report.md", "html": "report.html", "csv": "report.csv", "json": "report.json"}
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert json.loads(paths["json"].read_text())["title"] == "t"


def test_html_is_self_contained(report_rows) -> None:
    page = render(report_rows, "html", title="My arena", budget=BUDGET)
    assert BUDGET in page and "My arena" in page
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == 4
    assert not re.search(r'(src|href)="(?!data:)', page) and "url(" not in page
    assert "http://" not in page and "https://" not in page
    assert page.count("<tr", page.index('id="leaderboard"'), page.index("</table>")) == 7
    failures = page[page.index('id="failures"'):]
    assert "RuntimeError: out of memory" in failures and "training loss became nan" in failures


def test_html_escapes_user_strings() -> None:
    rows = make_rows(dfa_label=XSS, reason_suffix=f" boom {XSS}")
    page = render(rows, "html", title=f"arena {XSS}", budget=f"1 epoch {XSS}")
    assert XSS not in page
    assert page.count("<script>") == 1  # the page's own
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert f"boom {escaped}" in page and f"arena {escaped}" in page
    assert f"1 epoch {escaped}" in page and f"| {escaped} |" in page
    assert XSS not in render(rows, "md", title=XSS, budget=XSS)


def test_html_renders_in_headless_chromium(tmp_path) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium "
                        "(apt-get install -y chromium) to run the browser test")
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium)")
    rows = make_rows(dfa_label=XSS, reason_suffix=f" {XSS}")
    page = write_report(rows, tmp_path / "out", title="arena", budget=BUDGET,
                        formats=("html",))["html"]
    dom = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=60, check=True).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    data = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
    images = len(re.findall(r"<img\b", dom))
    assert images > 0
    assert data == {"rows": "6", "images": str(images), "images-loaded": str(images)}
    table = dom[dom.index('id="leaderboard"'):]
    table = table[:table.index("</table>")]
    shown = [[html.unescape(td) for td in re.findall(r"<td[^>]*>(.*?)</td>", tr)][:4]
             for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table.split("<tbody>")[1], re.S)]
    assert shown == [[g["dataset"], g["model"], g["rule"], g["sparsity"]]
                     for g in summarize(rows)]
    assert any(XSS in cells for cells in shown)  # shown as text: the page's script is the only one
    assert dom.count("<script") == 1


def test_sparsity_columns_show_measured_zeros_beside_measured_latency(report_rows) -> None:
    md = render(report_rows, "md", title="t", budget="b")
    header = next(line for line in md.splitlines() if line.startswith("| dataset"))
    assert "| zeros |" in header and "| sparse speed-up |" in header
    pruned = next(line for line in md.splitlines() if "| 50% |" in line)
    assert "50.0%" in pruned and "2.00x" in pruned  # dense 1-3 ms vs sparse 0.5-1.5 ms
    dense_only = [r for r in report_rows if r["sparsity"] != "50%"]
    for fmt, column in (("md", "| zeros |"), ("table", "zeros"), ("html", "<th>zeros</th>")):
        assert column in render(report_rows, fmt, title="t", budget="b")
        assert column not in render(dense_only, fmt, title="t", budget="b")
