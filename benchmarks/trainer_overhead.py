"""Trainer overhead: `Trainer.fit` against a bare PyTorch loop, same model, data and steps.

Both loops run in this process, alternating, ``--repeats`` times each; the JSON printed (and
written to ``benchmarks/results/trainer_overhead.json``) holds the medians and their ratio.
The Trainer runs with ``measure=False, val_every=0`` so both do the same work: shuffled
mini-batches, forward, cross-entropy, backward, Adam step.

    python benchmarks/trainer_overhead.py [--repeats 7] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nnarena.data import load
from nnarena.models import build
from nnarena.train import Trainer


def bare_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
              batch_size: int, seed: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            loss.item()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load(args.dataset)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return build("mlp", bundle, width=256, depth=2)

    bare, trainer = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(model(), bundle.train.x, bundle.train.y, args.epochs,
                              args.batch_size, 0))
        fit = Trainer(epochs=args.epochs, batch_size=args.batch_size, measure=False,
                      val_every=0).fit(model(), bundle)
        trainer.append(fit.metrics["train_seconds"])
    # The Trainer's final validation pass is inside train_seconds; the bare loop has none.
    result = {
        "benchmark": "trainer_overhead",
        "dataset": args.dataset,
        "model": "mlp 256x2",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "bare_median_s": statistics.median(bare),
        "trainer_median_s": statistics.median(trainer),
        "ratio": statistics.median(trainer) / statistics.median(bare),
    }
    out = Path(__file__).parent / "results" / "trainer_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
