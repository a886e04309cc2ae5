"""Magnitude pruning: rank weights by ``|w|``, globally or within each layer.

``global-magnitude`` -- "Is Complexity Required for Neural Network Pruning? A Case Study on Global
Magnitude Pruning" (Gupta et al.): one ranking of every maskable weight across layers, the
smallest zeroed to the target sparsity (one-shot or gradually during training), with a minimum
kept fraction per layer so that no layer collapses; training goes on (fine-tuning) after the
last update.

``layerwise-magnitude`` -- the class-uniform baseline of "Experiments on Properties of Hidden
Structures of Sparse Neural Networks": every layer pruned to the same fraction by its own ranking
(the study's class-blinded variant is ``global-magnitude``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from nnarena.registry import register
from nnarena.sparsity.allocation import Allocation
from nnarena.sparsity.base import Sparsifier
from nnarena.sparsity.schedules import PruningSchedule, ScheduleKind

if TYPE_CHECKING:
    from nnarena.train.trainer import Trainer

__all__ = ["GlobalMagnitude", "LayerwiseMagnitude", "magnitude_scores"]


def magnitude_scores(sparsifier: Sparsifier) -> dict[str, torch.Tensor]:
    """``|w|`` of every target's effective (masked) values."""
    return {t.name: t.weight.detach().abs() for t in sparsifier.targets}


@register("sparsity", "global-magnitude",
          paper="Is Complexity Required for Neural Network Pruning? A Case Study on Global "
                "Magnitude Pruning",
          summary="Smallest |w| across all layers zeroed, with a per-layer minimum kept.")
class GlobalMagnitude(Sparsifier):
    """Global magnitude pruning on a schedule.

    Args:
        sparsity: final fraction of zeros over the maskable weights.
        min_keep: the smallest fraction of each tensor kept (against layer collapse).
        schedule: ``gradual`` (cubic), ``one-shot`` or ``iterative``.
        start: first update, as a fraction of the training steps.
        end: last update (gradual), as a fraction of the training steps.
        every: steps between gradual updates.
    """

    allocation_kind: ClassVar[Allocation] = "global"

    def __init__(self, sparsity: float = 0.8, min_keep: float = 0.01,
                 schedule: ScheduleKind = "gradual", start: float = 0.1, end: float = 0.6,
                 every: int = 50) -> None:
        super().__init__(sparsity, self.allocation_kind, min_keep,
                         PruningSchedule(schedule, start, end, every))

    def scores(self, trainer: Trainer, model: nn.Module) -> dict[str, torch.Tensor]:
        return magnitude_scores(self)


@register("sparsity", "layerwise-magnitude",
          paper="Experiments on Properties of Hidden Structures of Sparse Neural Networks",
          summary="Every layer pruned to the same fraction by its own |w| ranking.")
class LayerwiseMagnitude(GlobalMagnitude):
    """Layer-wise uniform magnitude pruning on a schedule (arguments as `GlobalMagnitude`)."""

    allocation_kind: ClassVar[Allocation] = "layerwise"
