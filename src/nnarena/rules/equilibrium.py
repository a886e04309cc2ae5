"""Equilibrium propagation (EP) on a layered Hopfield-like network built from an MLP's weights.

Papers: "Equilibrium Propagation: Bridging the Gap between Energy-Based Models and
Backpropagation" (Scellier & Bengio, 2017), rule ``ep``; "Improving equilibrium propagation
without weight symmetry through Jacobian homeostasis" (Laborieux & Zenke, ICLR 2024), rule
``ep-homeostasis``.

Network: the ``nn.Linear`` of each block and of the head give ``W_l, b_l`` (l = 1..L+1); the
states are the hidden layers ``s_1..s_L`` (ρ = hard sigmoid, ``clamp(0, 1)``) and the output
``s_{L+1}`` (linear units), hidden states kept in [0, 1] by projection after each step (as in
Scellier & Bengio); the input ``x`` is clamped. The blocks' own activations, norms and
dropout are not used. Energy, per example, summed over the batch:

    E(s) = sum_l ||s_l||^2 / 2 - sum_l ρ(s_l) · (W_l ρ(s_{l-1}) + b_l),     ρ(s_0) = x
    F(s) = E(s) + β C(s_{L+1}),   C = ||s_{L+1} - t||^2 / 2   (t: one-hot class or target)

With ``symmetric=False`` the feedback from layer l+1 to l goes through its own matrix ``B_{l+1}``
(rule-owned) instead of ``W_{l+1}^T``: E is then a pseudo-energy whose state gradient is minus
the vector field ``f_l(s) = -s_l + ρ'(s_l) (W_l ρ(s_{l-1}) + b_l + B_{l+1} ρ(s_{l+1}))``
(generalised EP); its value means nothing.

Step: states start at the feed-forward pass ``s_l = ρ(W_l ρ(s_{l-1}) + b_l)``, relax (the shared
`relax` loop) for ``free_steps`` to the free fixed point, then from there for ``nudged_steps``
under ``+β`` and under ``-β`` (symmetric nudging, which removes the O(β) bias of the one-sided
estimate), and ``.grad = (∂E/∂θ(s^{+β}) - ∂E/∂θ(s^{-β})) / (2β)``, averaged over the batch. With
symmetric weights this tends to the gradient of ``C`` at the free fixed point as β -> 0.
Asymmetric weights use generalised EP's estimate (Laborieux & Zenke: ``∂_θf^T`` times the
derivative of the rates in β): with ``Δρ_l = (ρ(s_l^{+β}) - ρ(s_l^{-β})) / (2β)``, each matrix
learns from its postsynaptic rate change and its presynaptic free rate, ``W_l``:
``-Δρ_l ρ(s^0_{l-1})^T``, ``b_l``: ``-Δρ_l``, ``B_{l+1}``: ``-Δρ_l ρ(s^0_{l+1})^T``. As β -> 0
this is ``-(∂f/∂θ)^T J^{-1} ∂C/∂s``, while the gradient of ``C`` at the free fixed point is
``-(∂f/∂θ)^T J^{-T} ∂C/∂s`` (J: the Jacobian of f there); they agree when J is symmetric, which
homeostasis promotes.

Jacobian homeostasis (``homeostasis`` > 0, asymmetric weights only): adds ``λ dH/dθ`` with
``H = batch mean of ||J - J^T||_F^2 / 2``, J the Jacobian of the vector field at the free fixed
point. For this layered network the block of ``J - J^T`` between layers l and l+1 is
``D_l (B_{l+1} - W_{l+1}^T) D_{l+1}`` (D: 1 for units strictly inside (0, 1), where the
projected dynamics is not saturated, as a diagonal), so H is computed exactly, not by
the paper's random projections.

Deviations: Laborieux & Zenke's holomorphic EP (complex nudges on a circle, Cauchy-integral
estimate) is not implemented; real ±β nudging is used for both rules. The feed-forward start of
the free phase replaces Scellier & Bengio's persistent/zero start (fewer steps, same fixed point
when it is unique). Prediction is the output of the free phase, not the model's forward pass.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import Blocks
from nnarena.registry import register
from nnarena.rules.base import LearningRule, RuleCapabilities
from nnarena.rules.relaxation import relax

__all__ = ["EquilibriumPropagation", "ep_homeostasis"]


def _linears(model: nn.Module) -> list[nn.Linear]:
    if not isinstance(model, Blocks):
        raise IncompatibleError("rule 'ep' needs a Blocks model; build an mlp with nnarena.models")
    layers = []
    for part in [*model.blocks, model.head]:
        found = [m for m in part.modules() if isinstance(m, nn.Linear)]
        if len(found) != 1:
            raise IncompatibleError("rule 'ep' needs exactly one nn.Linear per block and in the "
                                    f"head (an mlp with layer='linear'); found {len(found)}")
        layers.append(found[0])
    return layers


def _rho(s: torch.Tensor) -> torch.Tensor:
    return s.clamp(0.0, 1.0)


def _project(states: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hidden states back into [0, 1] after each step, as in Scellier & Bengio."""
    return [_rho(s) for s in states[:-1]] + [states[-1]]


@register("rule", "ep",
          paper="Equilibrium Propagation: Bridging the Gap between Energy-Based Models and "
                "Backpropagation",
          summary="Equilibrium propagation: free and ±beta-nudged relaxation of a layered "
                  "energy network, weight update from the contrast.")
class EquilibriumPropagation(LearningRule):
    """Equilibrium propagation (see the module docstring for the energy).

    Args:
        beta: nudging strength (the nudged phases use +beta and -beta).
        step_size: state step size of the relaxation.
        free_steps: relaxation steps of the free phase (and of prediction).
        nudged_steps: relaxation steps of each nudged phase, from the free fixed point.
        symmetric: feedback through ``W^T`` (a true energy); ``False``: rule-owned feedback
            matrices ``B``, initialised independently.
        homeostasis: weight λ of the Jacobian-homeostasis penalty (asymmetric weights only).
    """

    capabilities = RuleCapabilities(needs_blocks=True, supports_conv=False)

    def __init__(self, beta: float = 0.5, step_size: float = 0.5, free_steps: int = 30,
                 nudged_steps: int = 10, symmetric: bool = True, homeostasis: float = 0.0
                 ) -> None:
        super().__init__()
        if beta <= 0 or step_size <= 0 or free_steps < 1 or nudged_steps < 1 or homeostasis < 0:
            raise ConfigError(f"rule '{self.name}' needs beta, step_size > 0, free_steps, "
                              f"nudged_steps >= 1 and homeostasis >= 0; got beta={beta}, "
                              f"step_size={step_size}, free_steps={free_steps}, "
                              f"nudged_steps={nudged_steps}, homeostasis={homeostasis}")
        if homeostasis > 0 and symmetric:
            raise ConfigError(f"rule '{self.name}': homeostasis needs symmetric=False "
                              "(symmetric weights have J = J^T already)")
        self.beta = beta
        self.step_size = step_size
        self.free_steps = free_steps
        self.nudged_steps = nudged_steps
        self.symmetric = symmetric
        self.homeostasis = homeostasis

    @override
    def check(self, model: nn.Module) -> None:
        super().check(model)
        _linears(model)

    @override
    def prepare(self, model: nn.Module, example_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.symmetric:
            return
        feedback = nn.ParameterList()
        for layer in _linears(model)[1:]:
            matrix = torch.empty(layer.in_features, layer.out_features, device=layer.weight.device)
            nn.init.kaiming_uniform_(matrix, a=5 ** 0.5)  # nn.Linear's default initialisation
            feedback.append(nn.Parameter(matrix))
        self.owned["feedback"] = feedback

    def _feedback(self, layers: list[nn.Linear]) -> list[torch.Tensor]:
        if self.symmetric:
            return [layer.weight.T for layer in layers[1:]]
        return list(self.owned["feedback"])

    def _target(self, y: torch.Tensor, n_out: int) -> torch.Tensor:
        if self.task == "classification":
            return F.one_hot(y, n_out).to(torch.get_default_dtype())
        return y.reshape(len(y), -1)

    def energy(self, model: nn.Module, x: torch.Tensor, states: list[torch.Tensor],
               target: torch.Tensor | None = None, beta: float = 0.0,
               first: torch.Tensor | None = None) -> torch.Tensor:
        """``E(s) + beta C(s_out)`` summed over the batch (a pseudo-energy when asymmetric);
        ``first``: the input drive ``W_1 x + b_1`` if already known (fixed while relaxing)."""
        layers = _linears(model)
        feedback = self._feedback(layers)
        rates = [x.flatten(1)] + [_rho(s) for s in states[:-1]] + [states[-1]]
        total = sum(0.5 * s.pow(2).sum() for s in states)
        for index, layer in enumerate(layers):
            below = rates[index] if self.symmetric or index == 0 else rates[index].detach()
            drive = first if index == 0 and first is not None else layer(below)
            total = total - (rates[index + 1] * drive).sum()
            if not self.symmetric and index > 0:
                total = total - (rates[index] * (rates[index + 1].detach()
                                                 @ feedback[index - 1].T)).sum()
        if beta:
            total = total + beta * 0.5 * (states[-1] - target).pow(2).sum()
        return total

    def _drive_energy(self, model: nn.Module, x: torch.Tensor, post: list[torch.Tensor],
                      pre: list[torch.Tensor]) -> torch.Tensor:
        """``-sum_l ρ(post_l) · (W_l ρ(pre_{l-1}) + b_l + B_{l+1} ρ(pre_{l+1}))``, whose weight
        gradient pairs postsynaptic rates of ``post`` with presynaptic rates of ``pre``."""
        layers = _linears(model)
        feedback = self._feedback(layers)
        rates = [x.flatten(1), *_project(pre)]
        total = torch.zeros((), device=x.device)
        for index, (layer, out) in enumerate(zip(layers, _project(post), strict=True)):
            drive = layer(rates[index])
            if index + 1 < len(layers):
                drive = drive + rates[index + 2] @ feedback[index].T
            total = total - (out * drive).sum()
        return total

    def _input_drive(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _linears(model)[0](x.flatten(1))

    def free_phase(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """The states at the free fixed point, from the feed-forward start."""
        layers = _linears(model)
        first = self._input_drive(model, x)
        with torch.no_grad():
            states, h = [], first
            for index, layer in enumerate(layers):
                s = h if index == 0 else layer(h)
                states.append(_rho(s) if index < len(layers) - 1 else s)
                h = states[-1]
        return relax(states, lambda s: self.energy(model, x, s, first=first), self.free_steps,
                     self.step_size, project=_project)[0]

    def asymmetry(self, model: nn.Module, x: torch.Tensor,
                  states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``H``: batch mean of ``||J - J^T||_F^2 / 2`` at the free fixed point (differentiable
        in the weights)."""
        if self.symmetric:
            return torch.zeros((), device=x.device)
        states = self.free_phase(model, x) if states is None else states
        layers = _linears(model)
        slopes = [((s > 0) & (s < 1)).to(s.dtype) for s in states[:-1]]
        slopes.append(torch.ones_like(states[-1]))
        total = torch.zeros((), device=x.device)
        for index, matrix in enumerate(self._feedback(layers)):
            gap = matrix - layers[index + 1].weight.T
            both = slopes[index].T @ slopes[index + 1] / len(x)
            total = total + (gap.pow(2) * both).sum()
        return total

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        free = self.free_phase(model, x)
        target = self._target(y, free[-1].shape[1])
        first = self._input_drive(model, x)
        nudged = [relax(free, lambda s, b=b: self.energy(model, x, s, target, b, first),
                        self.nudged_steps, self.step_size, project=_project)[0]
                  for b in (self.beta, -self.beta)]
        params = self.parameters(model)
        if self.symmetric:
            contrast = self.energy(model, x, nudged[0]) - self.energy(model, x, nudged[1])
        else:
            contrast = (self._drive_energy(model, x, nudged[0], free)
                        - self._drive_energy(model, x, nudged[1], free))
        objective = contrast / (2 * self.beta * len(x))
        logs = {"loss": 0.5 * (free[-1] - target).pow(2).sum(1).mean().item()}
        if self.homeostasis:
            penalty = self.asymmetry(model, x, free)
            objective = objective + self.homeostasis * penalty
            logs["asymmetry"] = penalty.item()
        for p, g in zip(params, torch.autograd.grad(objective, params, allow_unused=True),
                        strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        return logs

    @override
    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.free_phase(model, x)[-1]


@register("rule", "ep-homeostasis",
          paper="Improving equilibrium propagation without weight symmetry through Jacobian "
                "homeostasis",
          summary="Equilibrium propagation with asymmetric feedback weights and the "
                  "Jacobian-homeostasis penalty on ||J - J^T||.",
          capabilities=asdict(EquilibriumPropagation.capabilities))
def ep_homeostasis(beta: float = 0.5, step_size: float = 0.5, free_steps: int = 30,
                   nudged_steps: int = 10, homeostasis: float = 1.0) -> EquilibriumPropagation:
    """Equilibrium propagation with rule-owned feedback matrices and Jacobian homeostasis.

    Args:
        beta: nudging strength (the nudged phases use +beta and -beta).
        step_size: state step size of the relaxation.
        free_steps: relaxation steps of the free phase (and of prediction).
        nudged_steps: relaxation steps of each nudged phase, from the free fixed point.
        homeostasis: weight of the penalty on ``||J - J^T||_F^2 / 2``.
    """
    return EquilibriumPropagation(beta, step_size, free_steps, nudged_steps, symmetric=False,
                                  homeostasis=homeostasis)
