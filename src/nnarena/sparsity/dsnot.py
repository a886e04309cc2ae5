"""``dsnot``: "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs"
(Zhang et al.).

The paper refines the mask of an already pruned layer without backpropagation and without
changing any weight value. For output row ``q`` with dense weights ``W_q`` and keep-mask ``M_q``,
the expected reconstruction error over calibration inputs ``X`` is
``e_q = E[W_q X - (M_q * W_q) X] = sum_r (1 - M_qr) W_qr E[X_r]``. Each cycle swaps one pair per
row, dynamic-sparse-training style, keeping the row's count fixed:

- grow the pruned weight ``r`` maximising ``sign(e_q) * W_qr E[X_r] / Var(X_r)`` (it moves
  ``e_q`` towards zero; inputs of high variance are penalised);
- prune the kept weight with ``sign(e_q) * W_qr E[X_r] < 0`` (its removal also moves ``e_q``
  towards zero) of smallest Wanda score ``|W_qr| * ||X_r||_2``.

A row stops when ``|e_q|`` falls to ``threshold``, when the swap would flip the sign of ``e_q``
(``same_sign``), or when it runs out of candidates; all rows stop after ``max_cycles``.

Implemented here: that loop, vectorised over rows, on each Linear/conv layer's Wanda mask, inside
Wanda's sequential calibration (`nnarena.sparsity.wanda`: same calibration examples, layers in
execution order with inputs recomputed after the earlier layers are pruned), after training.
Candidates are ranked once from the starting mask, so every weight moves at most once.

Deviations: ``guard`` (on by default) keeps, per row, the mask of the cycle with the smallest exact
calibration error ``||(W_q - M_q * W_q) X||^2`` (the Wanda mask included), computed incrementally
from ``X^T X``; the paper's expected-error proxy alone can increase that error, and the guard makes
DSnoT never worse than Wanda on it. The reference code's defaults are followed for
``max_cycles=50``, ``threshold=0.1`` and ``var_power=1``; its command-line default disables the
sign check, which the paper describes and we keep on (``same_sign=False`` matches the code).
The reference ranks pruning candidates of the wrong sign after the right ones; here they are never
pruned (the row stops instead).
"""

from __future__ import annotations

import torch
from torch import nn

from nnarena.errors import ConfigError
from nnarena.registry import register
from nnarena.sparsity.wanda import (
    Forward,
    InputStats,
    Wanda,
    prune_sequentially,
    wanda_layer_mask,
)

__all__ = ["DSnoT", "dsnot_layer_mask", "dsnot_masks"]


def _ranked(key: torch.Tensor, eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: column indices of the eligible entries by descending ``key``, and their count."""
    order = torch.where(eligible, key, -torch.inf).argsort(dim=1, descending=True, stable=True)
    return order, eligible.sum(1)


def dsnot_layer_mask(weight: torch.Tensor, stats: InputStats, keep: int, max_cycles: int = 50,
                     threshold: float = 0.1, var_power: float = 1.0, same_sign: bool = True,
                     guard: bool = True) -> torch.Tensor:
    """DSnoT's keep-mask for one layer, ``keep`` weights per row, grown from Wanda's.

    Args:
        weight: the dense weights as ``(rows, in)``.
        stats: the layer's calibration input stats (with ``gram`` when ``guard``).
        keep: weights kept per row.
        max_cycles, threshold, var_power, same_sign, guard: see `DSnoT`.
    """
    w = weight.double()
    mask = wanda_layer_mask(weight, stats, keep)
    rows = torch.arange(len(w), device=w.device)
    contrib = w * stats.mean  # W_qr E[X_r]: what pruning r adds to e_q
    error = (contrib * ~mask).sum(1)
    growth = contrib / stats.var.clamp_min(1e-12) ** var_power
    wanda = w.abs() * stats.norm
    # Candidate lists by the sign of e_q (index 0: e_q < 0, index 1: e_q > 0).
    grow = [_ranked(-growth, ~mask & (contrib < 0)), _ranked(growth, ~mask & (contrib > 0))]
    prune = [_ranked(-wanda, mask & (contrib > 0)), _ranked(-wanda, mask & (contrib < 0))]
    grow_order, grow_count = (torch.stack(v) for v in zip(*grow, strict=True))
    prune_order, prune_count = (torch.stack(v) for v in zip(*prune, strict=True))
    grow_at = torch.zeros(2, len(w), dtype=torch.long, device=w.device)
    prune_at = torch.zeros_like(grow_at)
    active = torch.ones(len(w), dtype=torch.bool, device=w.device)
    if guard:
        assert stats.gram is not None
        gram = stats.gram
        lost = w * ~mask  # W_q - M_q * W_q
        lost_gram = lost @ gram
        best_mask, best_error = mask.clone(), (lost * lost_gram).sum(1)
    for _ in range(max_cycles):
        side = (error > 0).long()
        g_at, p_at = grow_at[side, rows], prune_at[side, rows]
        active &= (error.abs() > threshold) & (g_at < grow_count[side, rows]) & (
            p_at < prune_count[side, rows])
        if not active.any():
            break
        grown = grow_order[side, rows, g_at.clamp(max=w.shape[1] - 1)]
        pruned = prune_order[side, rows, p_at.clamp(max=w.shape[1] - 1)]
        after = error - contrib[rows, grown] + contrib[rows, pruned]
        if same_sign:
            active &= torch.sign(after) == torch.sign(error)
        r, g, p, s = rows[active], grown[active], pruned[active], side[active]
        mask[r, g], mask[r, p] = True, False
        error = torch.where(active, after, error)
        grow_at[s, r] += 1
        prune_at[s, r] += 1
        if guard:
            lost[r, g], lost[r, p] = 0.0, w[r, p]
            lost_gram[r] += w[r, p, None] * gram[p] - w[r, g, None] * gram[g]
            row_error = (lost * lost_gram).sum(1)
            better = row_error < best_error * (1.0 - 1e-9)
            best_mask[better], best_error = mask[better], torch.where(better, row_error,
                                                                       best_error)
    return best_mask if guard else mask


def dsnot_masks(model: nn.Module, calibration_x: torch.Tensor, sparsity: float,
                forward: Forward | None = None, max_cycles: int = 50, threshold: float = 0.1,
                var_power: float = 1.0, same_sign: bool = True,
                guard: bool = True) -> dict[str, torch.Tensor]:
    """DSnoT-prune ``model`` in place, layer by layer (see `prune_sequentially`); returns the
    keep-masks."""
    def layer_mask(weight: torch.Tensor, stats: InputStats, keep: int) -> torch.Tensor:
        return dsnot_layer_mask(weight, stats, keep, max_cycles, threshold, var_power, same_sign,
                                guard)

    return prune_sequentially(model, calibration_x, sparsity, layer_mask, forward, gram=guard)


@register("sparsity", "dsnot",
          paper="Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs",
          summary="After training, Wanda's mask refined by training-free prune-and-grow swaps "
                  "that cut each row's expected reconstruction error.")
class DSnoT(Wanda):
    """DSnoT on Wanda masks, after training (see the module docstring).

    Args:
        sparsity: fraction of zeros in every row of every Linear/conv weight.
        n_calibration: training examples whose layer inputs calibrate the masks.
        max_cycles: most prune-and-grow swaps per row.
        threshold: a row stops once its expected error ``|e_q|`` is at most this.
        var_power: growth scores are divided by ``Var(X_r) ** var_power`` (0: no variance term).
        same_sign: reject a swap that flips the sign of ``e_q`` (the row then stops).
        guard: per row, keep the mask with the smallest exact calibration error seen.
    """

    def __init__(self, sparsity: float = 0.5, n_calibration: int = 128, max_cycles: int = 50,
                 threshold: float = 0.1, var_power: float = 1.0, same_sign: bool = True,
                 guard: bool = True) -> None:
        for name, value in (("max_cycles", max_cycles), ("threshold", threshold),
                            ("var_power", var_power)):
            if value < 0:
                raise ConfigError(f"dsnot {name} must be >= 0, got {value}")
        super().__init__(sparsity, n_calibration)
        self.max_cycles, self.threshold, self.var_power = max_cycles, threshold, var_power
        self.same_sign, self.guard = same_sign, guard

    def masks(self, model: nn.Module, calibration_x: torch.Tensor, sparsity: float,
              forward: Forward) -> dict[str, torch.Tensor]:
        return dsnot_masks(model, calibration_x, sparsity, forward, self.max_cycles,
                           self.threshold, self.var_power, self.same_sign, self.guard)
