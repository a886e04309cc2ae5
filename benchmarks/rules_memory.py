"""Learning rules' cost: peak saved-activation memory per step by depth, and wall time per epoch.

Memory: MLP of width 256 on 784 inputs, batch 64, depth 2/4/8/16; the peak bytes autograd holds
for backward during one `rule.step` (`SavedActivationMeter`; parameters and the batch are not
counted), and its ratio to backprop's at depth 16. A rule that trains only its own model
(registry capability ``models``, e.g. NoProp's ``noprop-mlp``) is measured on that model with
``depth`` blocks. Time: one epoch of mnist5k (the same models at depth 2, batch 64, Adam) per
rule, rules interleaved round by round, median over ``--repeats`` rounds and its ratio to
backprop's. Every registered gradient rule is measured with its defaults; one that cannot train
these models (e.g. it needs a black-box model) is reported with the reason. Closed-form rules
have no epochs: their whole fit on mnist5k is timed once (a one-hidden-layer MLP, or their own
model) with the peak saved-activation bytes of the fit. The JSON is printed and written to
``benchmarks/results/rules_memory.json`` (``--rules`` runs to ``rules_memory_<rules>.json``).

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
from nnarena.models import create_model
from nnarena.registry import REGISTRY
from nnarena.rules import LearningRule, create_rule
from nnarena.train import Trainer
from nnarena.train.metrics import SavedActivationMeter
from nnarena.train.optim import create_optimizer

DEPTHS, WIDTH, BATCH, IN_FEATURES, CLASSES = (2, 4, 8, 16), 256, 64, 784, 10
DEPTH_KEYWORD = {"noprop-mlp": "steps"}  # what "depth" is called by a model that is not an mlp
# Closed-form rules train one hidden layer (or their own model) on mnist5k.
CLOSED_FORM_MODELS = {"gb-sequential": {"width": WIDTH, "depth": 1},
                      "convex-relu": {"width": 200, "depth": 1}}


def model_for(rule: str, input_shape: tuple[int, ...], depth: int | None = None, **kwargs: Any
              ) -> torch.nn.Module:
    """The model ``rule`` is measured on: its own if it names one, else an mlp of ``WIDTH``."""
    own = REGISTRY.get("rule", rule).capabilities.get("models")
    name = own[0] if own else "mlp"
    if not own:
        kwargs.setdefault("width", WIDTH)
    if depth is not None:
        kwargs[DEPTH_KEYWORD.get(name, "depth")] = depth
    return create_model(name, input_shape, CLASSES, **kwargs)


def ready(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> LearningRule:
    torch.manual_seed(0)
    rule = create_rule(name)
    rule.configure("classification")
    rule.check(model)
    rule.prepare(model, (x, y))
    return rule


def peak_bytes(name: str, depth: int) -> int:
    torch.manual_seed(0)
    model = model_for(name, (IN_FEATURES,), depth)
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
        model = model_for(name, data.input_shape, 2)
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


def closed_form_fit(name: str) -> dict[str, float]:
    """Seconds and peak saved-activation MiB of one whole closed-form fit on mnist5k."""
    data = load("mnist5k")
    torch.manual_seed(0)
    model = model_for(name, data.input_shape, **CLOSED_FORM_MODELS.get(name, {}))
    trainer = Trainer(name, measure=False)
    meter = SavedActivationMeter(model)
    start = time.perf_counter()
    with meter.track(data.train.x, data.train.y):
        trainer.fit(model, data)
    return {"fit_s": time.perf_counter() - start, "peak_mib": meter.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rules", help="comma-separated rule names (default: every gradient "
                        "rule); backprop is always measured, as the reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rules = [e.name for e in REGISTRY.list("rule")]
    if args.rules:
        chosen = {"backprop", *args.rules.split(",")}
        unknown = chosen - set(rules)
        if unknown:
            parser.error(f"unknown rules {sorted(unknown)}; valid: {rules}")
        rules = [r for r in rules if r in chosen]
    closed = [r for r in rules if create_rule(r).capabilities.closed_form]
    rules = [r for r in rules if r not in closed]
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
    fits: dict[str, Any] = {}
    for name in closed:
        try:
            fits[name] = closed_form_fit(name)
        except NNArenaError as err:
            skipped[name] = str(err)
    for fit in fits.values():
        fit["vs_backprop_epoch"] = fit["fit_s"] / seconds["backprop"]
    result = {
        "benchmark": "rules_memory", "torch": torch.__version__, "threads": args.threads,
        "memory": {"setup": f"MLP width {WIDTH}, {IN_FEATURES} inputs, batch {BATCH}",
                   "peak_mib": {n: {d: b / 2**20 for d, b in m.items()} for n, m in memory.items()},
                   "vs_backprop_depth16": {n: {d: b / reference for d, b in m.items()}
                                           for n, m in memory.items()}},
        "epoch": {"setup": "mnist5k, MLP 784-256-256-10 (or the rule's model), batch 64, Adam",
                  "median_s": seconds,
                  "vs_backprop": {n: s / seconds["backprop"] for n, s in seconds.items()}},
        "closed_form": {"setup": "one whole fit on mnist5k, defaults", "fits": fits},
        "skipped": skipped,
    }
    suffix = "_" + args.rules.replace(",", "_") if args.rules else ""
    out = Path(__file__).parent / "results" / f"rules_memory{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
