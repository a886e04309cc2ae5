from __future__ import annotations

import json

from typer.testing import CliRunner

from nnarena.cli import app

runner = CliRunner()


def test_bench_list_shows_builtin_suites() -> None:
    result = runner.invoke(app, ["bench", "list", "--json"])
    assert result.exit_code == 0, result.output
    suites = {s["name"]: s for s in json.loads(result.stdout)}
    assert "quick" in suites and suites["quick"]["cells"] > 0
    assert suites["quick"]["budget"].endswith("per cell")


def test_bench_run_then_report_every_format(write_suite, tmp_path) -> None:
    path = write_suite(seeds=[0])
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["bench", "run", str(path), "--runs-dir", str(runs),
                                 "--format", "md"])
    assert result.exit_code == 0, result.output
    assert "mlp-tiny" in result.stdout and "1 epochs per cell" in result.stdout
    name = path.stem
    for ext in ("md", "html", "csv", "json"):
        assert (runs / name / f"report.{ext}").is_file()
    for fmt in ("table", "csv", "json", "md", "html"):
        out = runner.invoke(app, ["bench", "report", str(path), "--runs-dir", str(runs),
                                  "--format", fmt])
        assert out.exit_code == 0, out.output
        assert "mlp-tiny" in out.stdout
    data = json.loads(runner.invoke(app, ["bench", "report", str(path), "--runs-dir",
                                          str(runs), "--format", "json"]).stdout)
    assert len(data["runs"]) == 2 and data["budget"] == "1 epochs per cell"


def test_bench_errors_are_one_line(write_suite, tmp_path) -> None:
    bad = runner.invoke(app, ["bench", "run", str(write_suite(models=["mpl"]))])
    assert bad.exit_code == 2 and "unknown model 'mpl'" in bad.output
    missing = runner.invoke(app, ["bench", "report", "nosuch", "--runs-dir", str(tmp_path)])
    assert missing.exit_code == 2 and "no suite 'nosuch' in this storage" in missing.output
    fmt = runner.invoke(app, ["bench", "report", "quick", "--format", "pdf"])
    assert fmt.exit_code == 2 and "unknown format 'pdf'; valid: table, csv" in fmt.output
