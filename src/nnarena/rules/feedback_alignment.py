"""Feedback alignment and sign symmetry: backprop with the weight transport replaced.

* ``fa``: "Random synaptic feedback weights support error backpropagation for deep learning"
  (Lillicrap, Cownden, Tweed, Akerman; Nature Communications, 2016). Errors travel down
  through fixed random matrices ``B`` instead of ``W^T``; the forward weights learn to align
  with them.
* ``sign-symmetry``: "How Important Is Weight Symmetry in Backpropagation?" (Liao, Leibo,
  Poggio, AAAI 2016; arXiv:1510.05067). Errors travel down through ``sign(W)``: magnitudes
  differ from backprop's, signs agree.

Both convert the model's ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers in `prepare` (see
`nnarena.rules.feedback`), then each step is ``loss.backward()`` on one graph, so their memory is
backprop's. KAN layers are not converted; models with them are rejected.

Deviations: random ``B`` is drawn like PyTorch's default forward init rather than the paper's
hand-picked uniform ranges. Sign feedback is ``sign(W)`` scaled by ``mean(|W|)`` per layer (the
paper's uniform sign-concordant feedback has magnitude 1 and relies on batch normalisation or
"Batch Manhattan" updates to cope; the scale keeps the backward signal at backprop's magnitude
under any optimizer).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from typing_extensions import override

from nnarena.registry import register
from nnarena.rules.base import LearningRule
from nnarena.rules.feedback import FeedbackMode, check_convertible, convert

__all__ = ["FeedbackAlignment", "SignSymmetry"]


class _FeedbackRule(LearningRule):
    """Backprop through a model whose Linear/Conv layers send errors down through ``B``."""

    mode: ClassVar[FeedbackMode]

    @override
    def check(self, model: nn.Module) -> None:
        super().check(model)
        check_convertible(model, self.name)

    @override
    def prepare(self, model: nn.Module, example_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        convert(model, self, self.mode)

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        loss = self.criterion(model(x), y)
        loss.backward()
        return {"loss": loss.item()}


@register("rule", "fa",
          paper="Random synaptic feedback weights support error backpropagation for deep learning",
          summary="Feedback alignment: errors flow down through fixed random matrices, not W^T.")
class FeedbackAlignment(_FeedbackRule):
    """Feedback alignment: each Linear/Conv layer's input gradient uses a fixed random ``B``."""

    mode = "random"


@register("rule", "sign-symmetry", paper="How Important Is Weight Symmetry in Backpropagation?",
          summary="Sign symmetry: errors flow down through sign(W) times a per-layer scale.")
class SignSymmetry(_FeedbackRule):
    """Sign symmetry: each Linear/Conv layer's input gradient uses ``sign(W) * mean(|W|)``."""

    mode = "sign"
