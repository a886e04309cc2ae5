"""``nnarena bench``: list, show, run, worker, report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from nnarena.bench.spec import builtin_suites, load_suite, plan
from nnarena.errors import NNArenaError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The arena: run suites of cells and report them side by side.")
_out = Console()
_err = Console(stderr=True)

SuiteArg = Annotated[str, typer.Argument(help="A built-in suite name or a suite YAML file.")]
StorageOpt = Annotated[str | None, typer.Option(
    help="Optuna storage URL (default: sqlite under runs/<suite>/); postgresql://... to scale "
         "out.")]
RunsOpt = Annotated[Path, typer.Option(help="Folder for the default storage and reports.")]
HeartbeatOpt = Annotated[int, typer.Option(
    help="Seconds between worker heartbeats; a silent worker's cell is retried after 3.")]


@app.command("list")
def list_suites(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the built-in suites."""
    suites = {name: load_suite(path) for name, path in sorted(builtin_suites().items())}
    if as_json:
        print(json.dumps([{"name": n, "description": s.description, "cells": len(plan(s)),
                           "budget": s.budget.describe()} for n, s in suites.items()], indent=2))
        return
    table = Table("suite", "cells", "budget", "description")
    for name, suite in suites.items():
        table.add_row(name, str(len(plan(suite))), suite.budget.describe(), suite.description)
    _out.print(table)


@app.command()
def show(suite: SuiteArg) -> None:
    """Validate a suite and list the cells it would run."""
    spec = _load(suite)
    table = Table("group", "seed", "baseline", "key", title=f"{spec.name}: "
                  f"{spec.budget.describe()}")
    for planned in plan(spec):
        table.add_row(planned.group, str(planned.cell.seed),
                      "yes" if planned.labels["baseline"] else "", planned.key)
    _out.print(table)


@app.command()
def run(
    suite: SuiteArg,
    storage: StorageOpt = None,
    workers: Annotated[int, typer.Option(min=1, help="Local worker processes.")] = 1,
    threads: Annotated[int | None, typer.Option(
        min=1, help="Torch threads per worker (default: cores // workers).")] = None,
    retry_failed: Annotated[bool, typer.Option(help="Run cells recorded as failed again.")
                            ] = False,
    runs_dir: RunsOpt = Path("runs"),
    heartbeat: HeartbeatOpt = 10,
    fmt: Annotated[str, typer.Option("--format", help="Leaderboard format printed at the end.")
                   ] = "table",
) -> None:
    """Run a suite (finished cells are skipped), then print the leaderboard and write reports."""
    from nnarena.bench.arena import run_suite
    from nnarena.bench.progress import progress_printer
    from nnarena.bench.report import render, write_report

    spec = _load(suite)
    try:
        with progress_printer(spec.name) as show_progress:
            rows = run_suite(spec, storage=storage, workers=workers, threads=threads,
                             runs_dir=runs_dir,
                             retry_failed=retry_failed, heartbeat=heartbeat,
                             on_progress=show_progress)
    except KeyboardInterrupt:
        _err.print("interrupted: finished cells are saved; run the same command to continue")
        raise typer.Exit(130) from None
    except NNArenaError as err:
        _fail(err)
    title, budget = f"nnarena · {spec.name}", spec.budget.describe()
    paths = write_report(rows, runs_dir / spec.name, title=title, budget=budget)
    print(render(rows, fmt, title=title, budget=budget))
    _err.print(f"reports: {', '.join(str(p) for p in paths.values())}")


@app.command()
def worker(
    suite: Annotated[str, typer.Argument(help="Suite name (the study) or suite YAML file.")],
    storage: Annotated[str, typer.Option(help="Optuna storage URL shared by all workers.")],
    threads: Annotated[int | None, typer.Option(help="Torch threads for this worker.")] = None,
    heartbeat: HeartbeatOpt = 10,
) -> None:
    """Join a suite's study from any machine and run cells until none is left."""
    from nnarena.bench.arena import run_worker

    spec = _load(suite) if (suite in builtin_suites() or Path(suite).is_file()) else None
    try:
        ran = run_worker(spec.name if spec else suite, storage, heartbeat=heartbeat,
                         threads=threads, suite=spec)
    except KeyboardInterrupt:
        _err.print("worker interrupted: its running cell will be retried")
        raise typer.Exit(130) from None
    except NNArenaError as err:
        _fail(err)
    _err.print(f"worker done: ran {ran} cells")


@app.command()
def report(
    suite: Annotated[str, typer.Argument(help="Suite name or suite YAML file.")],
    storage: StorageOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json, md or html.")
                   ] = "table",
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")
                   ] = None,
    runs_dir: RunsOpt = Path("runs"),
) -> None:
    """Report a suite's results (mean ± std over seeds, relative to the baseline)."""
    from nnarena.bench.report import FORMATS, render
    from nnarena.bench.runner import collect_rows, default_storage, open_storage, open_study

    if fmt not in FORMATS:
        _fail(NNArenaError(f"unknown format '{fmt}'; valid: {', '.join(FORMATS)}"))
    name = _load(suite).name if (suite in builtin_suites() or Path(suite).is_file()) else suite
    try:
        study = open_study(name, open_storage(storage or default_storage(name, runs_dir)),
                           create=False)
    except NNArenaError as err:
        _fail(err)
    spec = study.user_attrs.get("suite", {})
    budget = next((f"{v:g} {k} per cell" for k, v in spec.get("budget", {}).items()
                   if v is not None), "")
    text = render(collect_rows(study), fmt, title=f"nnarena · {name}", budget=budget)
    if out is None:
        print(text)
    else:
        out.write_text(text)
        _err.print(f"wrote {out}")


def _load(suite: str):
    try:
        return load_suite(suite)
    except NNArenaError as err:
        _fail(err)


def _fail(err: Exception) -> None:
    _err.print(f"[red]error:[/red] {err}", highlight=False)
    raise typer.Exit(2)


if __name__ == "__main__":
    sys.exit(app())
