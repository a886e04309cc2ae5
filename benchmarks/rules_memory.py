"""Learning rules' cost: peak saved-activation memory per step by depth, and wall time per epoch.

Memory: MLP of width 256 on 784 inputs, batch 64, depth 2/4/8/16; the peak bytes autograd holds
for backward during one `rule.step` (`SavedActivationMeter`; parameters and the batch are not
counted), and its ratio to backprop's at depth 16. Time: one epoch of mnist5k (MLP 784-256-256-10,
batch 64, Adam) per rule, rules interleaved round by round, median over ``--repeats`` rounds and
its ratio to backprop's. Every registered gradient rule is measured with its defaults; one that
cannot train a plain MLP (e.g. it needs a black-box model) is reported with the reason. The JSON
is printed and written to ``benchmarks/results/rules_memory.json``.

    python benchmarks/rules_memory.py [--repeats 3] [--threads 2] [--rules dfa,local]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from nnarena.data import load
from nnarena.errors import NNArenaError
from nnarena.models import build, create_model
from nnarena.registry import REGISTRY
from nnarena.rules import LearningRule, create_rule
from nnarena.train.metrics import SavedActivationMeter
from nnarena.train.optim import create_optimizer

DEPTHS, WIDTH, BATCH, IN_FEATURES, CLASSES = (2, 4, 8, 16), 256, 64, 784, 10


def ready(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> LearningRule:
    torch.manual_seed(0)
    rule = create_rule(name)
    rule.configure("classification")
    rule.check(model)
    rule.prepare(model, (x, y))
    return rule


def peak_bytes(name: str, depth: int) -> int:
    torch.manual_seed(0)
    model = create_model("mlp", (IN_FEATURES,), CLASSES, width=WIDTH, depth=depth)
    x, y = torch.randn(BATCH, IN_FEATURES), torch.randint(0, CLASSES, (BATCH,))
    rule = ready(name, model, x, y)
    rule.step(model, x, y)  # a warm-up step: lazily built state must not count
    meter = SavedActivationMeter(model, [*rule.parameters(model), *rule.owned.buffers()])
    with meter.track(x, y):
        rule.step(model, x, y)
    return meter.peak


def epoch_seconds(names: list[str], repeats: int) -> dict[str, float]:
    data = load("mnist5k")
    x, y = data.train.x, data.train.y
    runs: dict[str, tuple[torch.nn.Module, LearningRule, torch.optim.Optimizer]] = {}
    for name in names:
        torch.manual_seed(0)
        model = build("mlp", data, width=WIDTH, depth=2)
        rule = ready(name, model, x[:BATCH], y[:BATCH])
        runs[name] = (model, rule, create_optimizer("adam", rule.parameters(model), lr=1e-3))
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name, (model, rule, optimizer) in runs.items():
            start = time.perf_counter()
            for i in range(0, len(y), BATCH):
                optimizer.zero_grad(set_to_none=True)
                rule.step(model, x[i:i + BATCH], y[i:i + BATCH])
                optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rules", help="comma-separated rule names (default: every gradient "
                        "rule); backprop is always measured, as the reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rules = [e.name for e in REGISTRY.list("rule") if not _closed_form(e.name)]
    if args.rules:
        chosen = {"backprop", *args.rules.split(",")}
        unknown = chosen - set(rules)
        if unknown:
            parser.error(f"unknown or closed-form rules {sorted(unknown)}; valid: {rules}")
        rules = [r for r in rules if r in chosen]
    memory: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in rules:
        try:
            memory[name] = {depth: peak_bytes(name, depth) for depth in DEPTHS}
        except NNArenaError as err:
            skipped[name] = str(err)
    reference = memory["backprop"][DEPTHS[-1]]
    measured = list(memory)
    seconds = epoch_seconds(measured, args.repeats)
    result = {
        "benchmark": "rules_memory", "torch": torch.__version__, "threads": args.threads,
        "memory": {"setup": f"MLP width {WIDTH}, {IN_FEATURES} inputs, batch {BATCH}",
                   "peak_mib": {n: {d: b / 2**20 for d, b in m.items()} for n, m in memory.items()},
                   "vs_backprop_depth16": {n: {d: b / reference for d, b in m.items()}
                                           for n, m in memory.items()}},
        "epoch": {"setup": "mnist5k, MLP 784-256-256-10, batch 64, Adam",
                  "median_s": seconds,
                  "vs_backprop": {n: s / seconds["backprop"] for n, s in seconds.items()}},
        "skipped": skipped,
    }
    out = Path(__file__).parent / "results" / "rules_memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _closed_form(name: str) -> bool:
    return create_rule(name).capabilities.closed_form


if __name__ == "__main__":
    main()
