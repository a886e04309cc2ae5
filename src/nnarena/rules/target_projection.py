"""Target projection: every block learns from a fixed random projection of the labels, so training
is one forward pass, block by block, with no error sent back from the output.

``drtp``: "Learning without feedback: Fixed random learning signals allow for feedforward training
of deep neural networks" (Frenkel, Lefebvre and Bol, Frontiers in Neuroscience 2021,
arXiv:1909.01311). DFA's error ``e`` is replaced by the one-hot target ``y*``, a stand-in for the
error's sign: block l's output receives the gradient ``B_l y*`` (scaled by 1 / batch, like a mean
loss), giving the paper's ``δy_l = (B_l^T y*) ⊙ f'(a_l)``, ``ΔW_l = -η δy_l y_{l-1}^T`` (the sign of
the authors' code). The head learns from the true loss. Classification only, as in the paper. The
signal never vanishes, so it needs saturating hidden units, as the paper's (tanh) have: with ReLU
the activations grow without bound and accuracy suffers.

``tpsgd``: "Learning with Local Gradients at the Edge" (Lomnitz, Daniels, Zhang and Piacentino,
arXiv:2208.08503). Target Projection SGD generalises DRTP to any loss: block l gets the local
target ``t_l = P_l y*`` (a fixed random projection of the labels, reshaped to the block's output,
so conv feature maps and recurrent state sequences get one too) and is trained on
``loss(h_l, t_l)`` by the delta rule (mse: ``(h_l - t_l) ⊙ f'(a_l)``, up to a factor 2); the head on
the true loss. ``project="output"`` instead sends ``h_l`` through a fixed random matrix to the
label space and compares it with the labels, which is what a class loss (cross-entropy) needs.
Labels are one-hot for classification and the targets themselves for regression.

Both run `run_blockwise`: each block's graph is freed before the next runs, so the peak saved
memory is one block's whatever the depth. A recurrent block is one layer: its local gradient goes
through time inside that layer, never across blocks.

Deviations: the unit that gets a signal is a block (for a cnn: conv, norm, activation, pooling);
DRTP's matrices and tpSGD's output projection are Kaiming-uniform (bound
``sqrt(6 / size of h_l)``) as in the DRTP reference code, while tpSGD's target projection has
unit-variance entries ``U(-sqrt(3), sqrt(3))``, so targets are on the activations' scale (with
Kaiming's bound the ReLU layers of an mlp collapse to zero and nothing is learnt); local losses
sum over features and average over the batch; the Trainer's optimizer applies the gradients
(the papers use SGD).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.registry import register
from nnarena.rules.base import LearningRule, RuleCapabilities, Task
from nnarena.rules.blockwise import LocalSignal, run_blockwise
from nnarena.rules.dfa import DirectFeedback

__all__ = ["DRTP", "TPSGD"]

Loss = Literal["mse", "l1", "huber", "cross-entropy"]
Projection = Literal["target", "output"]
_DISTANCES: dict[str, Callable[..., torch.Tensor]] = {
    "mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}
# d loss / d residual of each distance (huber with delta 1), summed over features.
_RESIDUAL_GRADS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mse": lambda r: 2 * r, "l1": torch.sign, "huber": lambda r: r.clamp(-1.0, 1.0)}
_LOSSES = (*_DISTANCES, "cross-entropy")
_PROJECTIONS = ("target", "output")


class _Projected(LearningRule):
    """Shared by both rules: one fixed random matrix per block, built in `prepare`."""

    capabilities = RuleCapabilities(needs_blocks=True)

    @override
    def prepare(self, model: nn.Module, example_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.owned["projection"] = DirectFeedback.for_model(model, example_batch[0])

    @property
    def projection(self) -> DirectFeedback:
        return self.owned["projection"]

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        """``y*``: one-hot rows for classification, the targets for regression."""
        if self.task == "regression":
            return y
        return F.one_hot(y, self.projection.n_signal).to(torch.get_default_dtype())


@register("rule", "drtp", paper="Learning without feedback: Fixed random learning signals allow "
          "for feedforward training of deep neural networks",
          summary="Direct Random Target Projection: each block learns from a fixed random "
                  "projection of the one-hot target.")
class DRTP(_Projected):
    """Direct Random Target Projection: block l's output gradient is ``B_l y* / batch``."""

    capabilities = RuleCapabilities(needs_blocks=True, supports_regression=False)

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        signal = self.labels(y) / len(y)
        _, losses = run_blockwise(model, x, lambda i, h: (h, self.projection(i, signal)),
                                  head=lambda o: self.criterion(o, y))
        return {"loss": losses[-1]}


@register("rule", "tpsgd", paper="Learning with Local Gradients at the Edge",
          summary="Target Projection SGD: each block trained on a local loss against a fixed "
                  "random projection of the labels.")
class TPSGD(_Projected):
    """Target Projection SGD.

    Args:
        loss: the local loss: ``mse``, ``l1``, ``huber`` (distances between ``h_l`` and its
            target) or ``cross-entropy`` (class scores against labels; needs
            ``project="output"`` and classification).
        project: ``target``: compare ``h_l`` with ``P_l y*``; ``output``: compare the fixed
            random projection of ``h_l`` to the label space with ``y*``.
    """

    def __init__(self, loss: Loss = "mse", project: Projection = "target") -> None:
        super().__init__()
        if loss not in _LOSSES:
            raise ConfigError(f"rule 'tpsgd' loss '{loss}' is unknown; valid: {', '.join(_LOSSES)}")
        if project not in _PROJECTIONS:
            raise ConfigError(f"rule 'tpsgd' project '{project}' is unknown; valid: "
                              f"{', '.join(_PROJECTIONS)}")
        if loss == "cross-entropy" and project == "target":
            raise ConfigError("rule 'tpsgd' loss 'cross-entropy' compares class scores with "
                              "labels; use project='output', or a distance loss (mse, l1, huber)")
        self.loss, self.project = loss, project

    @override
    def prepare(self, model: nn.Module, example_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.owned["projection"] = DirectFeedback.for_model(model, example_batch[0],
                                                            unit=self.project == "target")

    @override
    def configure(self, task: Task) -> None:
        if task == "regression" and self.loss == "cross-entropy":
            raise IncompatibleError("rule 'tpsgd' loss 'cross-entropy' needs classification; "
                                    "use mse, l1 or huber for regression")
        super().configure(task)

    def local_signal(self, index: int, h: torch.Tensor, y: torch.Tensor, labels: torch.Tensor,
                     record: list[torch.Tensor]) -> LocalSignal:
        """Block ``index``'s signal for its output ``h``; its loss value goes to ``record``.

        Against a target in the block's space the loss's gradient is written in closed form
        (the paper's delta rule, e.g. ``2 (h - t) / batch`` for mse), so no copy of the target
        is saved for backward; through the output projection autograd differentiates the loss.
        """
        if self.project == "target":
            residual = h.detach() - self.projection(index, labels)
            record.append(_DISTANCES[self.loss](residual, torch.zeros_like(residual),
                                                reduction="sum") / len(h))
            return h, _RESIDUAL_GRADS[self.loss](residual) / len(h)
        scores = self.projection.read(index, h)
        loss = (F.cross_entropy(scores, y) if self.loss == "cross-entropy" else
                _DISTANCES[self.loss](scores, labels, reduction="sum") / len(h))
        record.append(loss.detach())
        return loss

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        labels, record = self.labels(y), list[torch.Tensor]()
        _, losses = run_blockwise(model, x, lambda i, h: self.local_signal(i, h, y, labels, record),
                                  head=lambda o: self.criterion(o, y))
        logs = {"loss": losses[-1]}
        if record:
            logs["local_loss"] = torch.stack(record).mean().item()
        return logs
