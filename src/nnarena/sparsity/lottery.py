"""``lottery``: "Stabilizing the Lottery Ticket Hypothesis" (Frankle, Dziugaite, Roy & Carbin).

The paper's iterative magnitude pruning (IMP) with rewinding: train the dense network, saving its
weights ``theta_k`` after ``k`` iterations; train on, prune the smallest-magnitude fraction of the
remaining weights globally (one ranking over all layers), reset the survivors to ``theta_k`` and
retrain; repeat until the target sparsity. Rewinding to ``k = 0`` is the original lottery ticket
procedure (reset to initialisation); the paper's point is that a small ``k`` (0.1-7% of training)
finds matching subnetworks of deeper networks where ``k = 0`` fails.

Implemented with the core's ``iterative`` schedule and rewinding (`Sparsifier`): ``rounds``
prunings, each keeping ``(1 - sparsity)^(1/rounds)`` of the survivors (exact counts, global
ranking of ``|w|``), every model parameter (biases too) reset to its value at step ``k`` after
each pruning (pruned weights stay zero), the optimizer's state cleared.

Budget: the paper retrains for a full run after every pruning; here IMP's rounds share the cell's
training budget, split into ``rounds + 1`` equal segments (dense training, then one retraining
after each pruning); the last segment's result is the sparse network reported. Deviations: each
retraining segment is as long as the others, not ``T - k`` steps; only the weights are rewound, not
the learning-rate schedule, the data order or buffers (batch-norm statistics) -- with the arena's
constant learning rate only the second and third differ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from nnarena.errors import ConfigError
from nnarena.registry import register
from nnarena.sparsity.base import Sparsifier
from nnarena.sparsity.schedules import PruningSchedule

if TYPE_CHECKING:
    from nnarena.train.trainer import Trainer

__all__ = ["Lottery"]


@register("sparsity", "lottery", paper="Stabilizing the Lottery Ticket Hypothesis",
          summary="Iterative global magnitude pruning, survivors rewound to early training.")
class Lottery(Sparsifier):
    """Iterative magnitude pruning with weight rewinding.

    Args:
        sparsity: final fraction of zeros over the maskable weights.
        rounds: prunings; the budget is split into ``rounds + 1`` equal training segments.
        rewind: the rewinding point ``k`` as a fraction of the training steps, before the first
            pruning (0: initialisation, the original lottery ticket hypothesis).
        min_keep: the smallest fraction of each tensor kept.

    Raises:
        ConfigError: ``rewind`` outside ``[0, 1 / (rounds + 1))`` or other bad settings.
    """

    def __init__(self, sparsity: float = 0.8, rounds: int = 3, rewind: float = 0.02,
                 min_keep: float = 0.0) -> None:
        schedule = PruningSchedule("iterative", rounds=rounds)
        if not 0.0 <= rewind < 1.0 / (rounds + 1):
            raise ConfigError(f"lottery rewind is a fraction of training before the first "
                              f"pruning, in [0, {1.0 / (rounds + 1):.3g}); got {rewind}")
        super().__init__(sparsity, "global", min_keep, schedule, rewind=0)
        self.rewind_fraction = rewind

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        self.rewind = round(self.rewind_fraction * trainer.total_steps)  # in steps, for the base
        super().on_fit_start(trainer, model)

    def scores(self, trainer: Trainer, model: nn.Module) -> dict[str, torch.Tensor]:
        """``|w|`` of the survivors; pruned weights rank last so they stay pruned."""
        scores = {}
        for t in self.targets:
            magnitude = t.weight.detach().abs()
            mask = t.mask
            scores[t.name] = magnitude if mask is None else torch.where(mask.bool(), magnitude,
                                                                        -1.0)
        return scores
