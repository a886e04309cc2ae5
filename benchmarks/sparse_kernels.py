"""Sparse kernels against a dense ``nn.Linear``: inference and training step over sparsity.

Linear 1024 -> 1024, batch 256, unstructured random masks at each ``--sparsities`` level. Every
sparse result is first checked against the dense masked reference (max abs errors reported), then
the modules of a group run once per round, interleaved, for ``--repeats`` rounds after a warm-up;
medians (and minima: the machine may be shared) in ms, and dense / sparse speed-ups.

- inference (``torch.inference_mode``): dense ``nn.Linear``, `SparseLinear` on our C++ kernels
  (``cpp``) and on torch's CSR matmul (``torch``);
- training step (forward + backward, input requiring grad as a hidden layer's does, gradients
  cleared outside the clock): dense ``nn.Linear``, dense with a parametrized mask (what masked
  training costs), `SparsePropLinear` on ``cpp`` and on torch's sparse ops (``torch``);
- block-sparse (16 x 16 blocks): `SparseLinear(layout="bsr")` on ``cpp`` and torch's BSR matmul.

The crossover is the lowest measured sparsity from which the sparse path is faster than dense. The
JSON is printed and written to ``benchmarks/results/sparse_kernels.json`` (``..._threads<n>.json``
for other thread counts); the build time of the C++ kernels (into a fresh cache) is reported too.

    python benchmarks/sparse_kernels.py [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from nnarena.sparsity import kernels
from nnarena.sparsity.kernels import SparseLinear
from nnarena.sparsity.sparseprop import SparsePropLinear

FEATURES, BATCH, BLOCK = 1024, 256, 16
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
TARGETS = {"inference_speedup_at_0.95": 3.0, "train_speedup_at_0.95": 2.0}


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def race(fns: dict[str, Callable[[], Any]], repeats: int,
         prepare: Callable[[str], None] = lambda name: None) -> dict[str, dict[str, float]]:
    """Median and min ms of each function, interleaved round by round after a warm-up;
    ``prepare(name)`` runs before each call, off the clock."""
    for name, fn in fns.items():
        for _ in range(3):
            prepare(name)
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            prepare(name)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t)}
            for name, t in times.items()}


def speedups(ms: dict[str, dict[str, float]], dense: str = "dense") -> dict[str, float]:
    base = ms[dense]["median_ms"]
    return {name: base / t["median_ms"] for name, t in ms.items() if name != dense}


def inference(x: torch.Tensor, w: torch.Tensor, repeats: int) -> dict[str, Any]:
    dense = nn.Linear(FEATURES, FEATURES)
    with torch.no_grad():
        dense.weight.copy_(w)
    modules: dict[str, nn.Module] = {"dense": dense}
    for backend in ("cpp", "torch"):
        modules[backend] = SparseLinear.from_dense(dense, backend=backend)
    with torch.inference_mode():
        ref = dense(x)
        errors = {n: (m(x) - ref).abs().max().item() for n, m in modules.items() if n != "dense"}
        ms = race({n: (lambda m=m: m(x)) for n, m in modules.items()}, repeats)
    return {"median_ms": {n: t["median_ms"] for n, t in ms.items()},
            "min_ms": {n: t["min_ms"] for n, t in ms.items()},
            "speedup": speedups(ms), "max_abs_error": errors}


def training(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor, repeats: int) -> dict[str, Any]:
    dense = nn.Linear(FEATURES, FEATURES)
    with torch.no_grad():
        dense.weight.copy_(w)
    masked = nn.Linear(FEATURES, FEATURES)
    masked.load_state_dict(dense.state_dict())
    parametrize.register_parametrization(masked, "weight", _Mask(mask.float()))
    modules: dict[str, nn.Module] = {"dense": dense, "dense_masked": masked}
    for backend in ("cpp", "torch"):
        modules[backend] = SparsePropLinear.from_dense(dense, mask, backend=backend)
    x = x.detach().requires_grad_()
    grad = torch.randn(BATCH, FEATURES)
    errors = {}
    masked(x).backward(grad)
    ref = (x.grad.clone(), masked.parametrizations.weight.original.grad * mask)
    for name in ("cpp", "torch"):
        x.grad = None
        layer = modules[name]
        layer(x).backward(grad)
        errors[name] = {"dx": (x.grad - ref[0]).abs().max().item(),
                        "dw": (layer.to_dense(layer.values.grad) - ref[1]).abs().max().item()}

    def clear(name: str) -> None:
        for p in (x, *modules[name].parameters()):
            p.grad = None

    ms = race({n: (lambda m=m: m(x).backward(grad)) for n, m in modules.items()}, repeats, clear)
    return {"median_ms": {n: t["median_ms"] for n, t in ms.items()},
            "min_ms": {n: t["min_ms"] for n, t in ms.items()},
            "speedup": speedups(ms), "max_abs_error": errors}


def block_sparse(x: torch.Tensor, sparsity: float, repeats: int) -> dict[str, Any]:
    dense = nn.Linear(FEATURES, FEATURES)
    n = FEATURES // BLOCK
    keep = (torch.rand(n, n) >= sparsity).repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
    with torch.no_grad():
        dense.weight.mul_(keep)
    modules = {"dense": dense, "cpp": SparseLinear.from_dense(dense, "bsr", BLOCK, "cpp")}
    bsr = dense.weight.detach().to_sparse_bsr((BLOCK, BLOCK))
    with torch.inference_mode():
        ref = dense(x)
        fns: dict[str, Callable[[], Any]] = {n: (lambda m=m: m(x)) for n, m in modules.items()}
        fns["torch_bsr_matmul"] = lambda: (bsr @ x.t()).t() + dense.bias
        errors = {n: (fn() - ref).abs().max().item() for n, fn in fns.items() if n != "dense"}
        ms = race(fns, repeats)
    return {"median_ms": {n: t["median_ms"] for n, t in ms.items()},
            "speedup": speedups(ms), "max_abs_error": errors}


def crossover(curve: dict[str, dict[str, float]], name: str) -> float | None:
    """Lowest sparsity from which ``name`` is faster than dense at every measured level."""
    levels = sorted(curve, key=float)
    faster = [float(s) for s in levels if all(curve[t][name] > 1 for t in levels
                                              if float(t) >= float(s))]
    return min(faster) if faster else None


def build_seconds() -> float | None:
    """Seconds to compile the C++ kernels into an empty cache (None if they cannot be built)."""
    old = os.environ.get("TORCH_EXTENSIONS_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCH_EXTENSIONS_DIR"] = tmp
        start = time.perf_counter()
        try:
            kernels._build()
        except Exception:  # no compiler: the run still measures the torch fallback
            return None
        finally:
            if old is None:
                del os.environ["TORCH_EXTENSIONS_DIR"]
            else:
                os.environ["TORCH_EXTENSIONS_DIR"] = old
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    compile_s = build_seconds()
    if not kernels.cpp_kernels_available():
        raise SystemExit("the C++ sparse kernels cannot be built here: nothing to compare")
    torch.manual_seed(0)
    x = torch.randn(BATCH, FEATURES)
    w = torch.randn(FEATURES, FEATURES) / FEATURES**0.5
    infer, train = {}, {}
    for sparsity in args.sparsities:
        mask = torch.rand(FEATURES, FEATURES) >= sparsity
        infer[str(sparsity)] = inference(x, w * mask, args.repeats)
        train[str(sparsity)] = training(x, w, mask, args.repeats)
    blocks = {str(s): block_sparse(x, s, args.repeats) for s in (0.9, 0.95)}
    curves = {kind: {s: r["speedup"] for s, r in res.items()}
              for kind, res in (("inference", infer), ("train", train))}
    result: dict[str, Any] = {
        "benchmark": "sparse_kernels", "torch": torch.__version__, "threads": args.threads,
        "repeats": args.repeats, "shape": f"{FEATURES} -> {FEATURES}, batch {BATCH}",
        "compile_s": compile_s,
        "speedup_curve": curves,
        "crossover": {f"{kind}_{name}": crossover(curve, name)
                      for kind, curve in curves.items() for name in ("cpp", "torch")},
        "inference": infer, "train": train, f"block_sparse_{BLOCK}x{BLOCK}": blocks,
    }
    measured = {"inference_speedup_at_0.95": infer.get("0.95", {}).get("speedup", {}).get("cpp"),
                "train_speedup_at_0.95": train.get("0.95", {}).get("speedup", {}).get("cpp")}
    result["targets"] = {name: {"measured": value, "target": TARGETS[name],
                                "met": value is not None and value >= TARGETS[name]}
                         for name, value in measured.items()}
    # The machine may be shared: the 1-minute load average tells how busy it was.
    result["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    suffix = "" if args.threads == 2 else f"_threads{args.threads}"
    out = Path(__file__).parent / "results" / f"sparse_kernels{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
