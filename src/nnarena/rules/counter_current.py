"""Counter-current learning: a feedforward and a feedback network teach each other layer by layer.

Rule ``ccl`` ("Counter-Current Learning: A Biologically Plausible Dual Network Approach for Deep
Learning", Kao and Hariharan, NeurIPS 2024, arXiv:2409.19841). The feedforward network F is the
model: levels ``f_0 = x``, ``f_l = block_l(f_{l-1})``, ``f_{L+1} = head(f_L)``. The feedback
network G (rule-owned, in ``rule.owned["feedback"]``) runs the other way with mirrored widths:
``g_{L+1}`` is the target (one-hot for classification), ``g_{l-1} = G_l(g_l)``, down to ``g_0``
in input space. Every F block is trained on its detached input (the shared `run_blockwise`
loop) with a pairing loss between ``f_l`` and ``sg(g_l)``, the head with the task loss, and
every G layer with the pairing loss between ``G_l(sg(g_l))`` and ``sg(f_{l-1})``: each layer
learns from the paired activation of the other network, and no gradient crosses a layer boundary
(nor passes between the networks). G's activations are computed without a graph first and each
G layer is re-run for its own update, so the saved-activation peak is one layer's whatever the
depth. MLP models only (G mirrors linear layers).

Deviations: the default pairing loss is the authors' classification loss (in their released
code), not the plain ``||a - b||^2`` (option ``loss="mse"``), which collapses here (both networks
shrink their activations together, ~20% on digits); its rows are L2-normalised (scale-free, as in
the authors' CNN variant), and G's hidden activation is tanh (the authors use ELU).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.layers import create_act
from nnarena.models import Blocks
from nnarena.registry import register
from nnarena.rules.base import LearningRule, RuleCapabilities, Task
from nnarena.rules.blockwise import run_blockwise

__all__ = ["LOSSES", "CounterCurrent"]

LOSSES = ("similarity", "mse")


@register("rule", "ccl",
          paper="Counter-Current Learning: A Biologically Plausible Dual Network Approach for "
                "Deep Learning",
          summary="A feedback network maps targets toward inputs; each layer of either network "
                  "matches the other's detached paired activation.")
class CounterCurrent(LearningRule):
    """Counter-current learning on a `Blocks` MLP with a rule-owned mirrored feedback network.

    Args:
        loss: the pairing loss: ``similarity`` (the batch's cosine cross-similarity
            ``norm(a) norm(b)^T`` matched in squared error to the same-class indicator) or
            ``mse`` (``||a - b||^2``, which also works for regression).
        act: activation of the feedback network's hidden layers (its input layer has none).
    """

    capabilities = RuleCapabilities(needs_blocks=True, supports_conv=False)

    def __init__(self, loss: str = "similarity", act: str = "tanh") -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"unknown ccl loss '{loss}'; valid: {', '.join(LOSSES)}")
        create_act(act)  # an unknown name fails here, listing the valid ones
        self.loss, self.act = loss, act

    @override
    def configure(self, task: Task) -> None:
        if task == "regression" and self.loss == "similarity":
            raise IncompatibleError("rule 'ccl' with loss 'similarity' needs classes; use "
                                    "loss 'mse' for regression")
        super().configure(task)

    @override
    def prepare(self, model: nn.Module, example_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x = example_batch[0]
        with torch.no_grad():
            features, out = cast(Blocks, model).forward_intermediates(x[:1])
        widths = [math.prod(x.shape[1:]), *(f[0].numel() for f in features), out[0].numel()]
        layers = [nn.Sequential(nn.Linear(widths[i + 1], widths[i]),
                                create_act(self.act if i else "identity"))
                  for i in range(len(widths) - 1)]
        self.owned["feedback"] = nn.ModuleList(layers)  # layer i maps level i + 1 to level i

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        if "feedback" not in self.owned:
            raise RuntimeError(f"rule '{self.name}': call prepare(model, batch) before step")
        feedback = cast(nn.ModuleList, self.owned["feedback"])
        with torch.no_grad():  # G's activations, the targets of F's blocks: g_L+1 .. g_0
            g = [self._target(y, feedback[-1][0].in_features)]
            for layer in reversed(feedback):
                g.insert(0, layer(g[0]))
        f = [x.flatten(1)]

        def local(i: int, h: torch.Tensor) -> torch.Tensor:
            f.append(h.detach().flatten(1))
            return self._pair_loss(h, g[i + 1], y)

        _, losses = run_blockwise(cast(Blocks, model), x, local,
                                    head=lambda out: self.criterion(out, y))
        feedback_losses = []
        for i, layer in enumerate(feedback):  # G_i+1: from sg(g_i+1) toward sg(f_i)
            loss = self._pair_loss(layer(g[i + 1]), f[i], y)
            loss.backward()
            feedback_losses.append(float(loss.detach()))
        return {"loss": losses[-1], "local_loss": sum(losses[:-1]) / max(len(losses) - 1, 1),
                "feedback_loss": sum(feedback_losses) / len(feedback_losses)}

    def _pair_loss(self, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """How far ``a`` is from the detached paired activation ``b``."""
        a = a.flatten(1)
        if self.loss == "mse":
            return F.mse_loss(a, b)
        same = (y[:, None] == y[None, :]).float()
        return F.mse_loss(F.normalize(a, dim=1) @ F.normalize(b, dim=1).T, same)

    def _target(self, y: torch.Tensor, width: int) -> torch.Tensor:
        if self.task == "classification":
            return F.one_hot(y, width).float()
        return y.reshape(len(y), -1).float()
