"""Predictive coding (PC) and incremental predictive coding (iPC) on `Blocks` models.

Papers: "An Approximation of the Error Backpropagation Algorithm in a Predictive Coding Network
with Local Hebbian Synaptic Plasticity" (Whittington & Bogacz, Neural Computation 2017), rule
``pc``; "A Stable, Fast, and Fully Automatic Learning Algorithm for Predictive Coding Networks"
(Salvatori et al., ICLR 2024), rule ``ipc``.

Network and energy: block l of the model is the layer map ``f_l``; value nodes ``x_1..x_L`` sit
at the block outputs, ``x_0`` is the input (clamped) and the output layer is clamped to the target
through the task loss, so per example

    F = sum_l ||x_l - f_l(x_{l-1})||^2 / 2 + loss(head(x_L), y)

(squared error ``||y - head(x_L)||^2 / 2`` for regression, the paper's clamped output; the
summed cross-entropy for classification, the usual CE variant). Value nodes start at the
feed-forward pass (all hidden errors zero) and relax by the shared `relax` loop.

* ``pc``: relax ``steps`` steps (or until no node moves by more than ``tol``) with the weights
  fixed, then ``.grad = dF/dθ`` at the equilibrium, averaged over the batch; each block's
  gradient uses only its own input and error (Hebbian ``e_l f'(.) x_{l-1}^T`` for a linear
  block). Near equilibrium the errors approximate the backpropagated ones, so the update
  approximates backprop's gradient (exact as ``output_weight -> 0``, up to that scale).
* ``ipc``: the weight gradient ``dF/dθ`` is taken at *every* inference step, in the same autograd
  call as the value-node step, from the states before that step. Deviation: the paper applies each
  of these weight updates at once (SGD inside inference); here, because a rule only writes
  ``.grad``, they are summed over the ``steps`` steps into ``.grad`` and the Trainer's optimizer
  applies the sum once per batch, so within a batch the value nodes see fixed weights. What is
  kept is the point of iPC: no separate inference-then-learning phases and no need to reach
  equilibrium, so few steps suffice (default 5 against PC's 20).

The loss returned is the task loss of the feed-forward pass, and prediction is the feed-forward
pass, as in both papers. Blocks with dropout redraw their masks at every energy evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError
from nnarena.models import Blocks
from nnarena.registry import register
from nnarena.rules.base import LearningRule, RuleCapabilities
from nnarena.rules.relaxation import relax

__all__ = ["IncrementalPredictiveCoding", "PredictiveCoding"]


class PredictiveCoding(LearningRule):
    """Predictive coding: relax the value nodes, then the energy's weight gradient.

    Args:
        steps: inference steps per batch.
        step_size: value-node step size.
        tol: stop inference early once no value node moves by more than this (``None``: never).
        output_weight: scale of the output (loss) term of the energy; small values give the
            fixed-prediction regime where PC's gradient matches backprop's (times this scale).
    """

    capabilities = RuleCapabilities(needs_blocks=True)
    incremental = False

    def __init__(self, steps: int = 20, step_size: float = 0.1, tol: float | None = None,
                 output_weight: float = 1.0) -> None:
        super().__init__()
        if steps < 1 or step_size <= 0 or output_weight <= 0 or (tol is not None and tol <= 0):
            raise ConfigError(f"rule '{self.name}' needs steps >= 1 and step_size, "
                              f"output_weight, tol > 0; got steps={steps}, "
                              f"step_size={step_size}, output_weight={output_weight}, tol={tol}")
        self.steps = steps
        self.step_size = step_size
        self.tol = tol
        self.output_weight = output_weight
        self.last_steps = 0

    def _output_energy(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            loss = F.cross_entropy(out, y, reduction="sum")
        else:
            loss = 0.5 * (out - y).pow(2).sum()
        return self.output_weight * loss

    def energy(self, model: Blocks, x: torch.Tensor, y: torch.Tensor,
               nodes: list[torch.Tensor], first: torch.Tensor | None = None) -> torch.Tensor:
        """``F`` summed over the batch, for value nodes ``nodes`` (one per block); ``first``:
        the first block's prediction ``f_1(x)`` if already known (it is fixed while inferring)."""
        total = torch.zeros((), device=x.device)
        below = x
        for index, (block, node) in enumerate(zip(model.blocks, nodes, strict=True)):
            prediction = first if index == 0 and first is not None else block(below)
            total = total + 0.5 * (node - prediction).pow(2).sum()
            below = node
        return total + self._output_energy(model.head(below), y)

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            nodes, out = model.forward_intermediates(x)
            loss = self.criterion(out, y).item()
        params = [p for p in model.parameters() if p.requires_grad]
        scale = 1.0 / len(x)

        def accumulate(grads: list[torch.Tensor | None]) -> None:
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.grad = g * scale if p.grad is None else p.grad.add_(g, alpha=scale)

        first = None if self.incremental or not nodes else nodes[0]
        nodes, self.last_steps = relax(
            nodes, lambda n: self.energy(model, x, y, n, first), self.steps, self.step_size,
            self.tol,
            params=params if self.incremental else (),
            on_params=accumulate if self.incremental else None)
        if not self.incremental:
            accumulate(list(torch.autograd.grad(self.energy(model, x, y, nodes), params,
                                                allow_unused=True)))
        return {"loss": loss, "inference_steps": float(self.last_steps)}


register("rule", "pc",
         paper="An Approximation of the Error Backpropagation Algorithm in a Predictive Coding "
               "Network with Local Hebbian Synaptic Plasticity",
         summary="Predictive coding: relax value nodes to equilibrium, then the energy's "
                 "local weight gradient.")(PredictiveCoding)


@register("rule", "ipc",
          paper="A Stable, Fast, and Fully Automatic Learning Algorithm for Predictive Coding "
                "Networks",
          summary="Incremental predictive coding: weight gradients at every inference step, "
                  "summed into .grad.")
class IncrementalPredictiveCoding(PredictiveCoding):
    """Incremental predictive coding (see the module docstring for the one deviation).

    Args:
        steps: inference steps per batch, each also giving a weight gradient.
        step_size: value-node step size.
        tol: stop inference early once no value node moves by more than this.
        output_weight: scale of the output (loss) term of the energy.
    """

    incremental = True

    def __init__(self, steps: int = 5, step_size: float = 0.1, tol: float | None = None,
                 output_weight: float = 1.0) -> None:
        super().__init__(steps, step_size, tol, output_weight)
