"""``wanda``: "A Simple and Effective Pruning Approach for Large Language Models" (Sun et al.).

The paper prunes a trained network once, without retraining and without weight updates: each
weight of a linear layer is scored by its magnitude times the norm of the input feature it
multiplies, ``S_ij = |W_ij| * ||X_j||_2`` (``X``: the layer's inputs on a small calibration set),
and every output row (the paper's comparison group) loses the same fraction of its lowest scores.

Implemented here, after training (one-shot at ``start=1.0``: after the last optimizer step, before
the final metrics):

- calibration: ``n_calibration`` training examples drawn without replacement by the run's seed,
  passed through ``rule.predict`` in eval mode without gradients; forward hooks capture each
  layer's inputs (``Linear`` rows; ``Conv1d``/``Conv2d`` unfolded patches, so a conv weight is a
  ``(out, in * kernel)`` matrix);
- sequential: layers are pruned one at a time in execution order, and each layer's inputs are
  recomputed with every earlier layer already pruned (the reference code does the same per
  transformer block);
- each row keeps exactly ``round((1 - sparsity) * row length)`` weights; only masks change.

The calibration helpers (`InputStats`, `calibration_inputs`, `prune_sequentially`) are shared with
DSnoT (`nnarena.sparsity.dsnot`), which refines each layer's Wanda mask.

Deviations: the paper calibrates on 128 C4 sequences; we use training examples. Embedding, grouped
conv and KAN tensors are refused (`IncompatibleError`): they have no per-input-feature norm here.
A run that ends before its last planned step (a ``seconds`` budget or a time limit) is not pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.registry import register
from nnarena.sparsity.allocation import top_k
from nnarena.sparsity.base import Sparsifier
from nnarena.sparsity.masks import Target, count_nonzero, prunable_targets, set_mask
from nnarena.sparsity.schedules import PruningSchedule

if TYPE_CHECKING:
    from nnarena.data import Split
    from nnarena.train.trainer import Trainer

__all__ = [
    "Forward",
    "InputStats",
    "LayerMask",
    "Wanda",
    "calibration_inputs",
    "check_target",
    "input_rows",
    "prune_sequentially",
    "wanda_layer_mask",
    "wanda_masks",
]

Forward = Callable[[torch.Tensor], torch.Tensor]
LayerMask = Callable[[torch.Tensor, "InputStats", int], torch.Tensor]
"""``(weight as (rows, in), input stats, weights kept per row) -> bool keep-mask (rows, in)``."""


@dataclass
class InputStats:
    """Sums over the calibration inputs of one layer (one input vector per row of ``X``)."""

    count: int
    total: torch.Tensor  # (in,) sum of x_j
    squares: torch.Tensor  # (in,) sum of x_j^2
    gram: torch.Tensor | None  # (in, in) sum of x x^T, when asked for

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def var(self) -> torch.Tensor:
        """Population variance of each input feature."""
        return (self.squares / self.count - self.mean ** 2).clamp_min(0.0)

    @property
    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` over every calibration row."""
        return self.squares.sqrt()

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().double()
        self.count += len(rows)
        self.total += rows.sum(0)
        self.squares += (rows ** 2).sum(0)
        if self.gram is not None:
            self.gram += rows.T @ rows

    @classmethod
    def empty(cls, features: int, gram: bool, device: torch.device) -> InputStats:
        zeros = torch.zeros(features, dtype=torch.float64, device=device)
        return cls(0, zeros, zeros.clone(), torch.zeros(features, features, dtype=torch.float64,
                                                        device=device) if gram else None)


def check_target(target: Target) -> None:
    """Raise `IncompatibleError` unless ``target`` is the weight of a Linear or ungrouped conv."""
    module = target.module
    ok = target.param == "weight" and (isinstance(module, nn.Linear) or (
        isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1))
    if not ok:
        raise IncompatibleError(f"calibrated pruning handles Linear and ungrouped Conv1d/Conv2d "
                                f"weights; {target.name} is a {type(module).__name__} "
                                f"'{target.param}'; use a magnitude method for this model")


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as ``(rows, in)`` so that its output is ``rows @ weight.flatten(1).T``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    if isinstance(module, nn.Conv1d):  # as a Conv2d of height 1
        x, lift = x.unsqueeze(-2), (lambda t: (1, *t))
    else:
        lift = tuple
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    # The conv's own padding (numbers or "same"), as the exact amounts per side.
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    patches = F.unfold(x, lift(module.kernel_size), dilation=lift(module.dilation),
                       stride=lift(module.stride))
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def calibration_inputs(split: Split, n: int, seed: int) -> torch.Tensor:
    """``n`` inputs of ``split`` (all if fewer), drawn without replacement by ``seed``."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.x[order[:n]]


def _execution_order(model: nn.Module, forward: Forward, x: torch.Tensor,
                     targets: list[Target]) -> list[Target]:
    seen: list[Target] = []

    def hook(target: Target) -> Callable[..., None]:
        def record(*_: object) -> None:
            if target not in seen:
                seen.append(target)
        return record

    handles = [t.module.register_forward_hook(hook(t)) for t in targets]
    try:
        forward(x)
    finally:
        for h in handles:
            h.remove()
    missing = [t.name for t in targets if t not in seen]
    if missing:
        raise IncompatibleError(f"calibrated pruning: {', '.join(missing)} received no input "
                                "in the model's forward pass")
    return seen


def _capture(target: Target, forward: Forward, x: torch.Tensor, gram: bool) -> InputStats:
    stats = InputStats.empty(target.original[0].numel(), gram, target.original.device)

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        stats.add(input_rows(module, inputs[0]))

    handle = target.module.register_forward_hook(hook)
    try:
        forward(x)
    finally:
        handle.remove()
    return stats


def prune_sequentially(model: nn.Module, calibration_x: torch.Tensor, sparsity: float,
                       layer_mask: LayerMask, forward: Forward | None = None,
                       gram: bool = False) -> dict[str, torch.Tensor]:
    """Mask every Linear/conv weight of ``model`` in place, one layer at a time.

    Layers go in execution order; each one's inputs are recomputed on ``calibration_x`` with the
    earlier layers already masked, then ``layer_mask`` chooses its ``round((1 - sparsity) * in)``
    kept weights per row. ``forward`` maps inputs to outputs (default: ``model``); it runs in eval
    mode without gradients. ``gram`` adds ``X^T X`` to the stats.

    Returns:
        The boolean keep-masks by target name (also set on the model).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    targets = prunable_targets(model)
    for t in targets:
        check_target(t)
    forward = forward or model
    was_training = model.training
    model.eval()
    masks: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for t in _execution_order(model, forward, calibration_x, targets):
                stats = _capture(t, forward, calibration_x, gram)
                weight = t.original.detach().flatten(1)
                keep = round((1.0 - sparsity) * weight.shape[1])
                masks[t.name] = layer_mask(weight, stats, keep).view_as(t.original)
                set_mask(t, masks[t.name])
    finally:
        model.train(was_training)
    return masks


def wanda_layer_mask(weight: torch.Tensor, stats: InputStats, keep: int) -> torch.Tensor:
    """Per row, the ``keep`` largest ``|W_ij| * ||X_j||_2``."""
    scores = weight.double().abs() * stats.norm
    return torch.stack([top_k(row, keep) for row in scores])


def wanda_masks(model: nn.Module, calibration_x: torch.Tensor, sparsity: float,
                forward: Forward | None = None) -> dict[str, torch.Tensor]:
    """Wanda-prune ``model`` in place (see `prune_sequentially`); returns the keep-masks."""
    return prune_sequentially(model, calibration_x, sparsity, wanda_layer_mask, forward)


@register("sparsity", "wanda",
          paper="A Simple and Effective Pruning Approach for Large Language Models",
          summary="After training, each row keeps its largest |w| * ||x||, from calibration "
                  "inputs; no retraining.")
class Wanda(Sparsifier):
    """Wanda post-training pruning (see the module docstring).

    Args:
        sparsity: fraction of zeros in every row of every Linear/conv weight.
        n_calibration: training examples whose layer inputs calibrate the scores.
    """

    def __init__(self, sparsity: float = 0.5, n_calibration: int = 128) -> None:
        if n_calibration < 1:
            raise ConfigError(f"n_calibration must be >= 1, got {n_calibration}")
        super().__init__(sparsity, "layerwise",
                         schedule=PruningSchedule("one-shot", start=1.0))
        self.n_calibration = n_calibration

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        for t in prunable_targets(model):
            check_target(t)
        super().on_fit_start(trainer, model)

    def masks(self, model: nn.Module, calibration_x: torch.Tensor, sparsity: float,
              forward: Forward) -> dict[str, torch.Tensor]:
        """Mask ``model`` in place; the method's mask computation."""
        return wanda_masks(model, calibration_x, sparsity, forward)

    def prune(self, trainer: Trainer, model: nn.Module, sparsity: float) -> None:
        assert trainer.data is not None
        x = calibration_inputs(trainer.data.train, self.n_calibration, trainer.seed)
        self.masks(model, x.to(trainer.device), sparsity,
                   lambda inputs: trainer.rule.predict(model, inputs))
        nonzero, total = count_nonzero(model)
        self.history.append({"step": trainer.step, "sparsity": 1.0 - nonzero / max(total, 1)})
