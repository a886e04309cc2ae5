"""Predictive coding against incremental predictive coding: cost of reaching a fixed accuracy.

Digits, MLP 64-256-256-10, batch 64, Adam 1e-3, ``--epochs`` epochs; ``pc`` and ``ipc`` with
their defaults and backprop as the reference, each for ``--seeds`` seeds (the seed draws the
data split, the initialisation and the batch order). Test accuracy is evaluated every
``--eval-every`` batches (evaluation is not timed). Per rule and target accuracy (``--target``,
and 95% of backprop's median final accuracy): training wall time, total inference steps (the
rules' logged ``inference_steps``) and batches until the target is first reached, medians over
seeds (``null`` when most seeds never reach it), the final accuracy, and the ipc/pc ratios. The
JSON is printed and written to ``benchmarks/results/pc_convergence.json``.

    python benchmarks/pc_convergence.py [--seeds 3] [--epochs 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from nnarena.data import DataBundle, load
from nnarena.models import build
from nnarena.rules import create_rule
from nnarena.train.optim import create_optimizer

RULES, WIDTH, DEPTH, BATCH, LR = ("backprop", "pc", "ipc"), 256, 2, 64, 1e-3

Point = dict[str, float]


def accuracy(rule: Any, model: torch.nn.Module, data: DataBundle) -> float:
    with torch.no_grad():
        return (rule.predict(model, data.test.x).argmax(1) == data.test.y).float().mean().item()


def train(name: str, seed: int, epochs: int, eval_every: int) -> list[Point]:
    """The learning curve: one point (batches, seconds, inference steps, accuracy) per eval."""
    data = load("digits", seed=seed)
    torch.manual_seed(seed)
    model = build("mlp", data, width=WIDTH, depth=DEPTH)
    rule = create_rule(name)
    rule.configure("classification")
    rule.check(model)
    rule.prepare(model, (data.train.x[:BATCH], data.train.y[:BATCH]))
    optimizer = create_optimizer("adam", rule.parameters(model), lr=LR)
    order = torch.Generator().manual_seed(seed)
    seconds, steps, batches = 0.0, 0.0, 0
    curve = [{"batches": 0, "seconds": 0.0, "inference_steps": 0.0,
              "accuracy": accuracy(rule, model, data)}]
    for _ in range(epochs):
        for index in torch.randperm(len(data.train.y), generator=order).split(BATCH):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            logs = rule.step(model, data.train.x[index], data.train.y[index])
            optimizer.step()
            seconds += time.perf_counter() - start
            steps += logs.get("inference_steps", 0.0)
            batches += 1
            if batches % eval_every == 0:
                curve.append({"batches": batches, "seconds": seconds, "inference_steps": steps,
                              "accuracy": accuracy(rule, model, data)})
    if batches % eval_every:
        curve.append({"batches": batches, "seconds": seconds, "inference_steps": steps,
                      "accuracy": accuracy(rule, model, data)})
    return curve


def median_or_none(values: list[float]) -> float | None:
    """Median, with unreached targets as infinity; ``None`` when that median is infinite."""
    value = statistics.median(values)
    return None if math.isinf(value) else value


def to_target(curves: list[list[Point]], target: float) -> dict[str, Any]:
    """Medians over seeds of the cost until ``target`` accuracy is first reached."""
    firsts = [next((p for p in curve if p["accuracy"] >= target), None) for curve in curves]
    out: dict[str, Any] = {"reached": sum(p is not None for p in firsts)}
    for key in ("seconds", "inference_steps", "batches"):
        out[key] = median_or_none([math.inf if p is None else p[key] for p in firsts])
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--eval-every", type=int, default=1, help="batches between evaluations")
    parser.add_argument("--target", type=float, default=0.90, help="fixed target accuracy")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    curves = {name: [train(name, seed, args.epochs, args.eval_every) for seed in range(args.seeds)]
              for name in RULES}
    finals = {name: [c[-1]["accuracy"] for c in runs] for name, runs in curves.items()}
    relative = 0.95 * statistics.median(finals["backprop"])
    targets = {f"{args.target:.3f}": args.target, f"0.95*backprop={relative:.3f}": relative}
    rules: dict[str, Any] = {}
    for name, runs in curves.items():
        rules[name] = {"final_accuracy": statistics.median(finals[name]),
                       "final_accuracy_per_seed": finals[name],
                       "total_seconds": statistics.median(c[-1]["seconds"] for c in runs),
                       "to_target": {label: to_target(runs, t) for label, t in targets.items()}}
    ipc_vs_pc = {label: {key: ratio(rules["ipc"]["to_target"][label][key],
                                    rules["pc"]["to_target"][label][key])
                         for key in ("seconds", "inference_steps")}
                 for label in targets}
    result = {
        "benchmark": "pc_convergence", "torch": torch.__version__, "threads": args.threads,
        "setup": f"digits, MLP width {WIDTH} depth {DEPTH}, batch {BATCH}, Adam {LR}, "
                 f"{args.epochs} epochs, seeds 0..{args.seeds - 1}, medians over seeds, "
                 f"test accuracy every {args.eval_every} batches",
        "defaults": {name: {k: getattr(create_rule(name), k) for k in ("steps", "step_size")}
                     for name in ("pc", "ipc")},
        "rules": rules, "ipc_vs_pc": ipc_vs_pc,
    }
    out = Path(__file__).parent / "results" / "pc_convergence.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
