"""Arena scaling: one CPU-bound suite run directly, then by the arena with 1 and 2 local workers.

Reports the 2-worker speedup over 1 worker (target >= 1.7x on 2 cores) twice: with one torch
thread per worker (the arena's own scaling, as when workers are separate machines) and with the
default threads (cores // workers: what `bench run --workers N` does on a laptop, where a single
worker also gains from intra-op threads). Overheads, against running the same cells directly with
`run_cell` in this process at one thread: ``start_s``, from `run_suite` to the first cell starting
in a worker (process start, imports); ``per_cell_overhead_s``, the median over cells (the first
excluded: its lazy imports) of the arena's time per cell (trial start to the next trial's start)
minus the direct time for that cell; and the 1-worker wall time over the direct total. The
machine's own ceiling for two processes is measured too: the same cells split over two plain
processes (no arena, one thread each) against one. Each arena run starts from a fresh SQLite
storage. Prints JSON and writes
``benchmarks/results/arena_scaling.json``.

    python benchmarks/arena_scaling.py [--cells 16] [--epochs 20]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import yaml

from nnarena.bench.arena import run_suite
from nnarena.bench.runner import default_storage, open_storage, open_study
from nnarena.bench.spec import load_suite, plan
from nnarena.cell import Cell, run_cell


def _run_plain(cells: list[dict]) -> None:
    """Run cells with no arena in a fresh process at one thread (the machine's ceiling)."""
    torch.set_num_threads(1)
    for cell in cells:
        run_cell(Cell.model_validate(cell))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=16, help="seeds x 2 models")
    parser.add_argument("--epochs", type=float, default=20)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scaling.yaml"
        path.write_text(yaml.safe_dump({
            "name": "scaling", "datasets": ["mnist5k"],
            "models": [{"name": "mlp", "kwargs": {"width": 256, "depth": 2}, "label": "mlp"},
                       {"name": "mlp", "kwargs": {"width": 128, "depth": 3}, "label": "mlp3"}],
            "budget": {"epochs": args.epochs}, "seeds": list(range(args.cells // 2)),
            "baseline": {"model": "mlp"}}))
        suite = load_suite(path)
        cells = plan(suite)
        run_cell(cells[0].cell)  # warm caches (imports, data files) for the direct run
        direct: dict[int, list[float]] = {}
        for threads in (1, cpus):
            torch.set_num_threads(threads)
            direct[threads] = []
            for planned in cells:
                start = time.perf_counter()
                run_cell(planned.cell)
                direct[threads].append(time.perf_counter() - start)
        ctx = multiprocessing.get_context("spawn")
        halves = [[c.cell.model_dump() for c in cells[i::2]] for i in range(2)]
        plain = {}
        for procs, chunks in ((1, [halves[0] + halves[1]]), (2, halves)):
            start = time.perf_counter()
            with ProcessPoolExecutor(procs, mp_context=ctx) as pool:
                list(pool.map(_run_plain, chunks))
            plain[procs] = time.perf_counter() - start
        walls, starts = {}, {}
        for label, workers, threads in (("1x1", 1, 1), ("2x1", 2, 1), ("1xN", 1, cpus),
                                        ("2xN", 2, max(1, cpus // 2))):
            begin = datetime.datetime.now()
            start = time.perf_counter()
            rows = run_suite(suite, workers=workers, threads=threads,
                             runs_dir=Path(tmp) / label)
            walls[label] = time.perf_counter() - start
            assert len(rows) == len(cells) and all(r["status"] == "ok" for r in rows)
            trials = sorted(open_study(suite.name, open_storage(default_storage(
                suite.name, Path(tmp) / label)), create=False).trials, key=lambda t: t.number)
            starts[label] = (trials[0].datetime_start - begin).total_seconds()
            if label == "1x1":
                per_cell = [(b.datetime_start - a.datetime_start).total_seconds()
                            for a, b in itertools.pairwise(trials)]
                keys = [t.user_attrs["key"] for t in trials]
                order = {c.key: i for i, c in enumerate(cells)}
                extra = [arena - direct[1][order[key]]
                         for arena, key in zip(per_cell[1:], keys[1:-1], strict=True)]
    result = {
        "benchmark": "arena_scaling",
        "cpus": cpus,
        "cells": len(cells),
        "direct_1_thread_s": sum(direct[1]),
        f"direct_{cpus}_threads_s": sum(direct[cpus]),
        "arena_wall_s": walls,
        "speedup_2_vs_1_workers_1_thread_each": walls["1x1"] / walls["2x1"],
        "machine_ceiling_2_vs_1_plain_processes": plain[1] / plain[2],
        "arena_scaling_efficiency": (walls["1x1"] / walls["2x1"]) / (plain[1] / plain[2]),
        "speedup_2_vs_1_workers_default_threads": walls["1xN"] / walls["2xN"],
        "start_s": starts,
        "median_direct_cell_s": statistics.median(direct[1]),
        "per_cell_overhead_s": statistics.median(extra),
        "wall_1x1_over_direct": walls["1x1"] / sum(direct[1]),
    }
    out = Path(__file__).parent / "results" / "arena_scaling.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
