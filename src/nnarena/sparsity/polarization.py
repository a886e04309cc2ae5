"""``polarization``: "Learning a Consensus Sub-Network with Polarization Regularization and One
Pass Training" (Zhi et al.).

The paper attaches a binary gating module to the channels of a network and trains weights and
gates together, in one pass, on the task loss plus a polarization regulariser (Zhuang et al.,
2020: ``t ||g||_1 - ||g - mean(g) 1||_1``) that drives every gate to 0 or 1 while a user-defined
sparsity is met; after training the static sub-network of the gates equal to 1 is kept and the
gating modules are dropped, so inference pays nothing for them. What is gated is channels (output
units: structured pruning); the abstract counts the result in the connections (weights) removed.

Implemented here, as a trainer callback:

- one gate ``g_j`` in ``[0, 1]`` per output unit -- a Linear row, a Conv filter, a KAN layer's
  output unit across its ``coef`` and ``base_weight`` -- applied as a parametrization
  ``w -> w * g`` on the rows (`RowGate`), starting at 1 (the dense network). The last maskable
  module (the output layer: its units are the outputs) and Embeddings are not gated;
- the gates join the Trainer's optimizer (``trainer.optimizer``) as their own parameter group
  (``gate_lr``, no weight decay) in ``on_fit_start``. The rule's backward gives them the task
  gradient, so any rule that back-propagates through the layers' weights trains them (backprop,
  feedback alignment, ...); ``on_after_backward`` adds the regulariser's gradient; after each
  step they are clipped to ``[0, 1]``, as in Zhuang et al.;
- the regulariser ``strength * (t sum_j g_j - sum_j |g_j - p|)``: Zhuang et al.'s form, with the
  pivot ``p`` placed so that the units ranked above it make up the kept fraction of the gated
  weights (`polarization_grad`): they are pulled to 1, the others pushed to 0. Units are ranked by
  ``g_j * |w_j| / mean_layer |w|`` (gate times the row norm relative to its layer's, which breaks
  the ties of gates clipped at 1 and makes layers comparable). The kept fraction goes from 1 to
  the target on the cubic schedule of gradual pruning over the first ``ramp`` of training, so the
  gates that reach 0 are chosen while the network trains;
- after ``threshold_at`` of the training steps the gates are thresholded at 0.5: kept gates'
  values are folded into their rows (a no-op for gates at exactly 1, where the regulariser puts
  them), the static sub-network is written with `set_mask` (pruned rows zeroed) and the gates
  leave the model and the optimizer; training, if any is left, continues on the fixed
  sub-network.

``sparsity`` is the fraction of zeros over all maskable weights (what `count_nonzero` counts),
reached within one row's weights: the gated layers are pruned a little further to make up for the
ungated output layer.

Deviations: the paper's gating module computes gates from the layer input and reaches a
"consensus" across inputs; here each unit has one learned gate (the consensus, directly). The
polarization pivot is the target split rather than the mean, so the user-defined sparsity is met
exactly (with the mean as pivot, gates lock into whatever split exists when they polarize, and
``t`` cannot move it: in our runs the result missed the target by 2-5 points or kept
intermediate gates); ``t`` here only tilts the push (``t > 0`` favours 0). Under Adam the
default ``strength`` dominates the gates' task gradient (about 1e-3 to 1e-2 per gate on MNIST), so
which units go is decided by the ranking; with ``strength=0.01`` the task gradient moves the gates
too, but small networks then keep intermediate gates (digits, width 64: 72-77% within 0.05 of 0
or 1, sparsity 0.43-0.44 for a 0.5 target). Biases are not gated: a pruned unit still passes its
constant ``act(bias)`` on, in the gated and the extracted network alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import override

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.registry import register
from nnarena.sparsity.base import Sparsifier
from nnarena.sparsity.masks import Target, count_nonzero, get_mask, prunable_targets, set_mask
from nnarena.sparsity.schedules import PruningSchedule

if TYPE_CHECKING:
    from nnarena.train.trainer import FitResult, Trainer

__all__ = ["Polarization", "RowGate", "polarization_grad"]


class RowGate(nn.Module):
    """The parametrization ``w -> w * g``, one gate per output unit (``w``'s first dimension)."""

    def __init__(self, gate: nn.Parameter) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate.view(-1, *([1] * (weight.dim() - 1)))


@dataclass(frozen=True)
class _Unit:
    """One gated module: its gate (one per output unit) and the targets it gates."""

    gate: nn.Parameter
    targets: tuple[Target, ...]

    def rows(self) -> int:
        """Weights behind one gate."""
        return sum(t.numel() for t in self.targets) // self.gate.numel()


def polarization_grad(scores: torch.Tensor, cost: torch.Tensor, density: float,
                      t: float) -> torch.Tensor:
    """Gradient in the gates of ``t sum_j g_j - sum_j |g_j - p|``, the pivot ``p`` splitting the
    units so that those of highest ``scores`` make up ``density`` of the total ``cost``:
    ``t - 1`` above the pivot, ``t + 1`` below."""
    order = torch.argsort(scores, descending=True)
    above = torch.cumsum(cost[order], 0) <= density * float(cost.sum()) + 1e-6
    side = torch.ones_like(scores)
    side[order[above]] = -1.0
    return t + side


@register("sparsity", "polarization",
          paper="Learning a Consensus Sub-Network with Polarization Regularization and One Pass "
                "Training",
          summary="Output-unit gates trained with the weights under a polarization regulariser; "
                  "the gates=1 sub-network is kept.")
class Polarization(Sparsifier):
    """Gated units, polarization regularisation, one pass; the static sub-network at the end.

    Args:
        sparsity: fraction of zeros over the maskable weights after thresholding.
        strength: weight of the polarization regulariser (per gate).
        t: the regulariser's L1 coefficient, in ``[0, 1)``.
        gate_lr: learning rate of the gates' parameter group; ``None``: ``max(0.01, 2 / n)``, ``n``
            the steps from the end of the ramp to the thresholding, so that under Adam (about
            ``gate_lr`` per step) the last gates pushed down reach 0 in time.
        ramp: the kept fraction reaches the target after this fraction of the training steps.
        threshold_at: when the gates are thresholded and the sub-network extracted, as a fraction
            of the training steps (1: after the last step).
    """

    def __init__(self, sparsity: float = 0.5, strength: float = 0.1, t: float = 0.0,
                 gate_lr: float | None = None, ramp: float = 0.5,
                 threshold_at: float = 1.0) -> None:
        for name, value in (("strength", strength), ("gate_lr", gate_lr)):
            if value is not None and not value > 0:
                raise ConfigError(f"polarization {name} must be > 0, got {value}")
        if not 0.0 <= t < 1.0:
            raise ConfigError(f"polarization t must be in [0, 1) (kept gates are pulled to 1 "
                              f"with 1 - t), got {t}")
        if not 0.0 <= ramp < threshold_at <= 1.0:
            raise ConfigError(f"polarization needs 0 <= ramp < threshold_at <= 1, got "
                              f"ramp={ramp}, threshold_at={threshold_at}")
        super().__init__(sparsity, schedule=PruningSchedule("one-shot", start=threshold_at))
        self.strength, self.t, self.gate_lr, self.ramp = strength, t, gate_lr, ramp
        self.units: list[_Unit] = []
        self.density = 1.0  # the gated weights' kept fraction that gives ``sparsity`` overall
        self.group: dict[str, Any] | None = None

    @override
    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        super().on_fit_start(trainer, model)
        self.units = self.attach(model)
        optimizer = trainer.optimizer
        assert optimizer is not None, "the Trainer sets its optimizer before on_fit_start"
        lr = self.gate_lr or max(0.01, 2.0 / max(
            (self.schedule.start - self.ramp) * trainer.total_steps, 1.0))
        optimizer.add_param_group({"params": [u.gate for u in self.units], "lr": lr,
                                   "weight_decay": 0.0})
        self.group = optimizer.param_groups[-1]

    def attach(self, model: nn.Module) -> list[_Unit]:
        """Put a gate (all ones) on every output unit of the gated modules; sets ``density``."""
        by_module: dict[int, list[Target]] = {}
        for target in prunable_targets(model):
            if not isinstance(target.module, nn.Embedding):
                by_module.setdefault(id(target.module), []).append(target)
        groups = list(by_module.values())[:-1]  # the output layer's units are the outputs
        if not groups:
            raise IncompatibleError(f"sparsity '{self.name}' gates hidden units; the model has "
                                    "no maskable layer before its output layer")
        units = []
        for targets in groups:
            out = targets[0].original.shape[0]
            if any(t.original.shape[0] != out for t in targets):
                raise IncompatibleError(f"sparsity '{self.name}': the tensors of "
                                        f"{targets[0].name} disagree on the output units")
            gate = nn.Parameter(torch.ones(out, device=targets[0].original.device))
            for t in targets:
                parametrize.register_parametrization(t.module, t.param, RowGate(gate))
            units.append(_Unit(gate, tuple(targets)))
        gated = sum(t.numel() for u in units for t in u.targets)
        total = sum(t.numel() for t in prunable_targets(model))
        self.density = ((1.0 - self.sparsity) * total - (total - gated)) / gated
        if self.density <= 0.0:
            raise IncompatibleError(f"sparsity '{self.name}': sparsity={self.sparsity} needs more "
                                    f"zeros than the {gated} gated weights of {total}")
        return units

    def gates(self) -> torch.Tensor:
        """Every gate, concatenated in module order (empty once extracted)."""
        return torch.cat([u.gate.detach() for u in self.units]) if self.units else torch.empty(0)

    def kept_fraction(self, step: int, total_steps: int) -> float:
        """The gated weights' kept fraction the pivot aims at after ``step`` steps (cubic)."""
        progress = min(1.0, step / max(self.ramp * total_steps, 1.0))
        return self.density + (1.0 - self.density) * (1.0 - progress) ** 3

    def scores(self, trainer: Trainer, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per unit: gate times row norm over the layer's mean row norm, by gated module."""
        out = {}
        with torch.no_grad():
            for u in self.units:
                norm = sum(t.original.flatten(1).square().sum(1) for t in u.targets).sqrt()
                out[u.targets[0].name] = u.gate * norm / norm.mean().clamp_min(1e-12)
        return out

    @override
    def on_after_backward(self, trainer: Trainer, model: nn.Module) -> None:
        if not self.units:
            return
        cost = torch.cat([torch.full_like(u.gate.detach(), float(u.rows())) for u in self.units])
        scores = torch.cat(list(self.scores(trainer, model).values()))
        grad = self.strength * polarization_grad(
            scores, cost, self.kept_fraction(trainer.step, trainer.total_steps), self.t)
        for u, g in zip(self.units, grad.split([u.gate.numel() for u in self.units]),
                        strict=True):
            if u.gate.grad is None:
                u.gate.grad = torch.zeros_like(u.gate)
            u.gate.grad.add_(g)

    @override
    def on_step_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, float]) -> None:
        with torch.no_grad():
            for u in self.units:
                u.gate.clamp_(0.0, 1.0)
        super().on_step_end(trainer, model, logs)

    @override
    def prune(self, trainer: Trainer, model: nn.Module, sparsity: float) -> None:
        """Threshold the gates and extract the static sub-network (the planned step)."""
        self.threshold()
        self.extract(trainer.optimizer)
        nonzero, total = count_nonzero(model)
        self.history.append({"step": trainer.step, "sparsity": 1.0 - nonzero / max(total, 1)})

    def threshold(self) -> None:
        """Gates to 0/1 at 0.5; a kept gate's value is folded into its rows first."""
        with torch.no_grad():
            for u in self.units:
                keep = u.gate > 0.5
                for t in u.targets:
                    scale = torch.where(keep, u.gate, 1.0)
                    t.original.mul_(scale.view(-1, *([1] * (t.original.dim() - 1))))
                u.gate.copy_(keep.to(u.gate.dtype))

    def extract(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Replace the (thresholded) gates by masks of their rows and drop them."""
        for u in self.units:
            keep = u.gate.detach() > 0.5
            for t in u.targets:
                before = get_mask(t.module, t.param)
                parametrize.remove_parametrizations(t.module, t.param, leave_parametrized=True)
                rows = keep.view(-1, *([1] * (t.original.dim() - 1))).expand_as(t.original)
                set_mask(t, rows if before is None else rows & before.bool())
        if optimizer is not None and self.group is not None:
            for gate in self.group["params"]:
                optimizer.state.pop(gate, None)
            optimizer.param_groups.remove(self.group)
        self.units, self.group = [], None

    @override
    def on_fit_end(self, trainer: Trainer, model: nn.Module, result: FitResult) -> None:
        if self.units:  # the run ended before the planned step (time limit, divergence)
            self.threshold()
            self.extract(trainer.optimizer)
        super().on_fit_end(trainer, model, result)
