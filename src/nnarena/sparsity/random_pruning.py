"""``random``: "The Unreasonable Effectiveness of Random Pruning: Return of the Most Naive Baseline
for Sparse Training" (Liu et al.).

Each layer is pruned uniformly at random at initialisation, to a density chosen beforehand: the
same for every layer (``uniform``) or Erdős-Rényi-Kernel (``erk``: density proportional to
``sum(shape) / prod(shape)``, so small layers stay denser); the sparse network then trains from
scratch with the mask fixed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import nn

from nnarena.errors import ConfigError
from nnarena.registry import register
from nnarena.sparsity.base import Sparsifier
from nnarena.sparsity.schedules import PruningSchedule

if TYPE_CHECKING:
    from nnarena.train.trainer import Trainer

__all__ = ["RandomPruning"]

Distribution = Literal["erk", "uniform"]


@register("sparsity", "random",
          paper="The Unreasonable Effectiveness of Random Pruning: Return of the Most Naive "
                "Baseline for Sparse Training",
          summary="Random masks at initialisation, ERK or uniform layer densities, fixed.")
class RandomPruning(Sparsifier):
    """Random pruning at initialisation.

    Args:
        sparsity: fraction of zeros over the maskable weights.
        distribution: ``erk`` or ``uniform`` layer-wise densities.
    """

    def __init__(self, sparsity: float = 0.8, distribution: Distribution = "erk") -> None:
        if distribution not in get_args(Distribution):
            raise ConfigError(f"random distribution must be one of "
                              f"{', '.join(get_args(Distribution))}; got {distribution!r}")
        allocation = "erk" if distribution == "erk" else "layerwise"
        super().__init__(sparsity, allocation, schedule=PruningSchedule("one-shot", start=0.0))

    def scores(self, trainer: Trainer, model: nn.Module) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(trainer.seed)
        return {t.name: torch.rand(t.original.shape, generator=generator)
                for t in self.targets}
