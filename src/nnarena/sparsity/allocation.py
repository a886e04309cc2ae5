"""How many weights each tensor keeps, and which: global, layer-wise uniform and ERK allocation.

Every allocation turns per-tensor scores (higher = keep) into boolean masks with exact counts:

- ``global``: one ranking over all tensors keeps exactly ``round((1 - sparsity) * N)`` weights.
- ``layerwise``: each tensor keeps ``round((1 - sparsity) * n)`` of its own.
- ``erk``: each tensor keeps ``round(d * n)`` with the Erdős-Rényi-Kernel density
  ``d = min(1, eps * sum(shape) / prod(shape))``, ``eps`` set so that the total kept is
  ``(1 - sparsity) * N`` ("The Unreasonable Effectiveness of Random Pruning", Evci et al.'s RigL).

``min_keep`` is a floor on every tensor's kept fraction (at least one weight), so no layer is
pruned away (Global MP's guard against layer collapse); it is taken before the ranking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, get_args

import torch

from nnarena.errors import ConfigError

__all__ = ["Allocation", "allocate", "check_allocation", "erk_densities", "keep_counts", "top_k"]

Allocation = Literal["global", "layerwise", "erk"]


def check_allocation(allocation: str, sparsity: float, min_keep: float) -> None:
    """One-line errors for bad allocation settings, before any work."""
    if allocation not in get_args(Allocation):
        raise ConfigError(f"unknown allocation {allocation!r}; valid: "
                          f"{', '.join(get_args(Allocation))}")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 <= min_keep <= 1.0:
        raise ConfigError(f"min_keep must be in [0, 1], got {min_keep}")


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Per-tensor ERK densities whose weighted mean is ``density`` (tensors capped at 1)."""
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / sizes[k] for k, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[k] for k in dense)
        free = [k for k in shapes if k not in dense]
        eps = budget / max(sum(raw[k] * sizes[k] for k in free), 1e-30)
        over = [k for k in free if eps * raw[k] > 1.0]
        if not over:
            return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}
        dense.update(over)


def keep_counts(sizes: Mapping[str, int], sparsity: float, allocation: Allocation,
                shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, int] | int:
    """Kept weights per tensor (``layerwise``, ``erk``) or in total (``global``)."""
    if allocation == "global":
        return round((1.0 - sparsity) * sum(sizes.values()))
    if allocation == "layerwise":
        return {k: round((1.0 - sparsity) * n) for k, n in sizes.items()}
    if shapes is None:
        raise ValueError("erk allocation needs the tensor shapes")
    densities = erk_densities(shapes, 1.0 - sparsity)
    return {k: min(n, round(densities[k] * n)) for k, n in sizes.items()}


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest scores (exactly ``k``; ties broken by position)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return mask.view_as(scores)


def allocate(scores: Mapping[str, torch.Tensor], sparsity: float,
             allocation: Allocation = "global", min_keep: float = 0.0) -> dict[str, torch.Tensor]:
    """Boolean keep-masks from ``scores`` (higher = keep) at ``sparsity`` overall.

    Raises:
        ConfigError: bad settings, or a ``min_keep`` floor that alone exceeds the budget.
    """
    check_allocation(allocation, sparsity, min_keep)
    sizes = {k: s.numel() for k, s in scores.items()}
    floors = {k: max(1, math.ceil(min_keep * n)) if min_keep > 0 else 0 for k, n in sizes.items()}
    counts = keep_counts(sizes, sparsity, allocation, {k: tuple(s.shape) for k, s in
                                                       scores.items()})
    if isinstance(counts, dict):
        return {k: top_k(s, max(counts[k], floors[k])) for k, s in scores.items()}
    if sum(floors.values()) > counts:
        raise ConfigError(f"min_keep={min_keep} keeps {sum(floors.values())} weights, more than "
                          f"the {counts} that sparsity={sparsity} allows; lower min_keep")
    # Reserve each tensor's floor, then rank everything else together.
    ranked = []
    for k, s in scores.items():
        s = s.detach().flatten().float()
        boost = top_k(s, floors[k])
        ranked.append(torch.where(boost, torch.inf, s))
    flat = top_k(torch.cat(ranked), counts)
    out, offset = {}, 0
    for k, s in scores.items():
        out[k] = flat[offset:offset + s.numel()].view_as(s)
        offset += s.numel()
    return out
