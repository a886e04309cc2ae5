"""KAN layer speed: forward + backward against `nn.Linear` / `nn.Conv2d` in the same process.

Dense: 256 -> 256 features, batch 1024, G = 5. Conv: batch 16, 32 -> 32 channels, 32 x 32, 3 x 3,
padding 1. Inputs require grad (as a hidden layer's do), the loss is ``out.sum()``, gradients are
cleared between steps outside the timed region. Every module of a group runs once per round, for
``--repeats`` rounds, so machine load hits all of them alike; the JSON printed (and written to
``benchmarks/results/kan_layers.json``) holds per-step medians and ratios to the plain layer.

Measured: our B-spline layer (matrix form) at k = 3 and 7, on the initial uniform grid and after
`update_grid` (non-uniform knots: per-interval matrices), the Cox-de Boor reference layer, every
other registered KAN layer at 8 coefficients per edge where its knobs allow, the B-spline conv,
saved-for-backward memory, KArAt against softmax attention as its Fourier terms grow, and
``torch.compile`` of our layer.

    python benchmarks/kan_layers.py [--repeats 30] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnarena.layers import create_attention, create_conv_layer, create_layer
from nnarena.layers.kan.bspline import KANLinear
from nnarena.registry import REGISTRY, Entry
from nnarena.testing.kan_reference import CoxDeBoorKAN
from nnarena.train.metrics import SavedActivationMeter

FEATURES, BATCH, GRID = 256, 1024, 5
OURS = ("kan-bspline", "kan-bspline-k7", "kan-matrix")
TARGETS = {"bspline_k3_vs_linear": 14.0, "bspline_k7_vs_linear": 20.0, "k7_vs_k3": 1.6,
           "saved_mib_k3": 26.0, "conv_vs_conv2d": 10.0}


def step(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
         params: list[torch.Tensor]) -> float:
    """Seconds for one forward + backward; gradients are cleared before the clock starts."""
    for p in params:
        p.grad = None
    start = time.perf_counter()
    module(x).sum().backward()
    return time.perf_counter() - start


def race(modules: dict[str, Any], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median step time (ms) of each module, interleaved round by round."""
    params = {name: [x, *m.parameters()] for name, m in modules.items()}
    for name, m in modules.items():
        for _ in range(3):
            step(m, x, params[name])
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(repeats):
        for name, m in modules.items():
            times[name].append(step(m, x, params[name]))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def saved_mib(module: nn.Module, x: torch.Tensor) -> float:
    meter = SavedActivationMeter(module)
    with meter.track():
        out = module(x)
    out.sum().backward()
    return meter.peak / 2**20


def other_kan_layers() -> list[Entry]:
    return [e for e in REGISTRY.list("layer") if e.capabilities.get("nonlinear")
            and e.name not in OURS and e.name != "mlp-kan"]


# Layers whose size is not one integer knob: keywords giving 8 coefficients per edge.
EIGHT_PER_EDGE = {"kan-skan": {"spaces": ("chebyshev", "fourier"), "n_per_space": 4}}


def sized(entry: Entry, n_basis: int) -> dict[str, Any] | None:
    """Keywords giving ``n_basis`` coefficients per edge: defaults if they already do, else the
    first integer parameter (in signature order) with a value that does; ``None`` if none does."""
    if n_basis == 8 and entry.name in EIGHT_PER_EDGE:
        return EIGHT_PER_EDGE[entry.name]
    if _n_basis(entry, {}) == n_basis:
        return {}
    for param in entry.params[2:]:
        if param.annotation is not int or not isinstance(param.default, int):
            continue
        for value in range(1, 2 * n_basis + 1):
            if _n_basis(entry, {param.name: value}) == n_basis:
                return {param.name: value}
    return None


def _n_basis(entry: Entry, kwargs: dict[str, Any]) -> int | None:
    try:
        return getattr(create_layer(entry.name, 16, 16, **kwargs), "n_basis", None)
    except Exception:  # a knob value the layer rejects: not a candidate
        return None


def dense(repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x = (torch.rand(BATCH, FEATURES) * 2 - 1).requires_grad_()
    modules: dict[str, Any] = {"linear": nn.Linear(FEATURES, FEATURES)}
    for k in (3, 7):
        ours = KANLinear(FEATURES, FEATURES, grid_size=GRID, spline_order=k)
        adapted = KANLinear(FEATURES, FEATURES, grid_size=GRID, spline_order=k)
        adapted.update_grid((torch.randn(4096, FEATURES) * 0.4).clamp(-1, 1))
        modules[f"bspline_k{k}"] = ours
        modules[f"bspline_k{k}_updated_grid"] = adapted
        modules[f"cox_de_boor_k{k}"] = CoxDeBoorKAN(FEATURES, FEATURES, GRID, k)
    others: dict[str, Any] = {}
    for entry in other_kan_layers():
        kwargs = sized(entry, 8)
        try:
            layer = create_layer(entry.name, FEATURES, FEATURES, **(kwargs or {}))
            step(layer, x, [x, *layer.parameters()])
        except Exception as err:  # report a layer that cannot run here, measure the rest
            others[entry.name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        modules[entry.name] = layer
        others[entry.name] = {"kwargs": kwargs or {}, "n_basis": getattr(layer, "n_basis", None),
                              "at_8_per_edge": kwargs is not None}
    rbf16 = sized(REGISTRY.get("layer", "kan-rbf"), 16) if "kan-rbf" in others else None
    if rbf16 is not None and "kan-rbf" in modules:
        modules["kan-rbf_16"] = create_layer("kan-rbf", FEATURES, FEATURES, **rbf16)
    ms = race(modules, x, repeats)
    ratio = {name: t / ms["linear"] for name, t in ms.items()}
    for name, info in others.items():
        if name in ms:
            info.update(ms=ms[name], vs_linear=ratio[name])
    result = {
        "shape": f"{FEATURES} -> {FEATURES}, batch {BATCH}, G = {GRID}",
        "median_ms": ms,
        "vs_linear": ratio,
        "k7_vs_k3": ms["bspline_k7"] / ms["bspline_k3"],
        "cox_de_boor_vs_ours": {f"k{k}": ms[f"cox_de_boor_k{k}"] / ms[f"bspline_k{k}"]
                                for k in (3, 7)},
        "saved_mib": {f"bspline_k{k}": saved_mib(modules[f"bspline_k{k}"], x) for k in (3, 7)}
        | {"linear": saved_mib(modules["linear"], x)},
        "other_layers": others,
    }
    if "kan-rbf_16" in ms:
        result["rbf_16_vs_8_centres"] = ms["kan-rbf_16"] / ms["kan-rbf"]
    return result


def conv(repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(16, 32, 32, 32).requires_grad_()
    modules = {"conv2d": nn.Conv2d(32, 32, 3, padding=1),
               "kan-bspline": create_conv_layer("kan-bspline", 32, 32, 3, dim=2, padding=1)}
    ms = race(modules, x, repeats)
    return {"shape": "batch 16, 32 -> 32 channels, 32 x 32, 3 x 3, padding 1", "median_ms": ms,
            "vs_conv2d": ms["kan-bspline"] / ms["conv2d"]}


def attention(repeats: int) -> dict[str, Any]:
    """KArAt against softmax attention in a tiny ViT block (digits with 2 x 2 patches)."""
    torch.manual_seed(0)
    batch, tokens, width, heads = 64, 16, 32, 4
    x = torch.randn(batch, tokens, width).requires_grad_()
    modules = {"softmax": create_attention("softmax", width, heads, tokens)}
    for n_freqs in (1, 2, 4, 8):
        modules[f"karat_fourier_{n_freqs}"] = create_attention(
            "karat", width, heads, tokens, basis="fourier", basis_kwargs={"n_freqs": n_freqs})
    ms = race(modules, x, repeats)
    return {"shape": f"batch {batch}, {tokens} tokens, width {width}, {heads} heads",
            "median_ms": ms, "vs_softmax": {n: t / ms["softmax"] for n, t in ms.items()},
            "saved_mib": {n: saved_mib(m, x) for n, m in modules.items()}}


def compiled(repeats: int) -> dict[str, Any]:
    """``torch.compile`` of our layer against the same layer eager."""
    torch.manual_seed(0)
    x = (torch.rand(BATCH, FEATURES) * 2 - 1).requires_grad_()
    modules: dict[str, Any] = {"linear": nn.Linear(FEATURES, FEATURES)}
    compile_s = {}
    for k in (3, 7):
        eager = KANLinear(FEATURES, FEATURES, grid_size=GRID, spline_order=k)
        start = time.perf_counter()
        fast = torch.compile(eager)
        step(fast, x, [x, *eager.parameters()])
        compile_s[f"bspline_k{k}"] = time.perf_counter() - start
        modules[f"bspline_k{k}"], modules[f"bspline_k{k}_compiled"] = eager, fast
    ms = race(modules, x, repeats)
    return {"first_call_s": compile_s, "median_ms": ms,
            "vs_linear": {name: t / ms["linear"] for name, t in ms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {"benchmark": "kan_layers", "torch": torch.__version__,
                              "threads": args.threads, "repeats": args.repeats,
                              "dense": dense(args.repeats), "conv": conv(args.repeats),
                              "attention": attention(args.repeats)}
    if not args.no_compile:
        try:
            result["compile"] = compiled(args.repeats)
        except Exception as err:  # e.g. no C++ compiler: report instead of failing the run
            result["compile"] = {"error": f"{type(err).__name__}: {err}"}
    d = result["dense"]
    measured = {"bspline_k3_vs_linear": d["vs_linear"]["bspline_k3"],
                "bspline_k7_vs_linear": d["vs_linear"]["bspline_k7"],
                "k7_vs_k3": d["k7_vs_k3"], "saved_mib_k3": d["saved_mib"]["bspline_k3"],
                "conv_vs_conv2d": result["conv"]["vs_conv2d"]}
    result["targets"] = {name: {"measured": measured[name], "target": TARGETS[name],
                                "met": measured[name] <= TARGETS[name]} for name in TARGETS}
    # The machine may be shared: the 1-minute load average tells how busy it was.
    result["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    out = Path(__file__).parent / "results" / "kan_layers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
