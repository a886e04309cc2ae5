"""``autosparse``: "AUTOSPARSE: Towards Automated Sparse Training of Deep Neural Networks" (Kundu
et al.).

The paper trains a sparse network with a learnable threshold per layer, ``tau = sigmoid(s)``, and
the soft-threshold forward of STR (Kusupati et al.), ``w_sparse = sign(w) * relu(|w| - tau)``; its
contribution is Gradient Annealing (GA): the derivative of that ReLU is taken as ``alpha(t)``
instead of 0 where ``|w| <= tau``, so masked weights keep receiving ``alpha(t)`` times their
gradient (and can grow back), with ``alpha`` decayed non-linearly to 0 during training. The
sparsity that results is not a target but follows from the thresholds' training (their weight
decay against the task gradient, as in STR); GA trades it against accuracy with no
sparsity-inducing loss term.

Implemented here, as a trainer callback:

- every maskable tensor gets a `SoftThreshold` parametrization holding its ``s`` (one threshold
  per tensor, i.e. per layer; a KAN layer's ``coef`` and ``base_weight`` get one each); the
  forward is `soft_threshold`, a custom autograd function whose backward gives kept weights the
  full gradient, masked ones ``alpha`` times it, and ``tau`` the sum of ``-sign(w) * h * grad``
  (``h`` = 1 kept, ``alpha`` masked: the same annealed ReLU derivative);
- the ``s`` join the Trainer's optimizer (``trainer.optimizer``) as their own parameter group
  (``threshold_lr``) in ``on_fit_start``; ``on_after_backward`` adds their weight decay
  ``threshold_decay * s`` (STR's and AutoSparse's sparsity pressure: with ``s < 0`` it raises
  ``tau``), applied here rather than by the optimizer so it means the same under every optimizer;
- ``alpha(t) = alpha * max((1 + cos(pi u)) / 2, 1 - sigmoid(12 u - 6))``, ``u`` the fraction of
  the training steps (`ga_alpha`): the sigmoid-cosine decay (slow start, fast middle, cosine
  tail), 0 from ``u = 1`` on; ``alpha = 0`` is STR without GA;
- after the last step the thresholds are frozen: each tensor becomes its soft-thresholded values
  (exactly what the forward used) under a plain `set_mask` mask of its nonzeros, so the saved
  model is a plain masked model.

Deviations and notes: ``alpha`` is a function of the step on the shape above (the sigmoid's
constants are ours); every ``s`` starts at ``threshold_init``. The defaults (``s`` from -6, its
own learning rate 5e-2, decay 0.05) are set for the arena's Adam runs: about 80% sparsity for the
MNIST MLP; without the decay on ``s`` nothing raises the thresholds under Adam (decay 1e-3: 9-12%
sparsity on digits). Adam normalises each weight's update, so a constant ``alpha`` on a masked
weight's gradient is largely divided out; GA acts through the thresholds' gradient (where masked
and kept weights are summed) and the decay of ``alpha``. In our runs (digits and mnist5k MLPs,
3 seeds) GA at a given decay ends about 2 points less sparse than ``alpha = 0``, and at matched
sparsity the two are within noise (no accuracy gain from GA).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from typing_extensions import override

from nnarena.errors import ConfigError
from nnarena.registry import register
from nnarena.sparsity.base import Sparsifier
from nnarena.sparsity.masks import count_nonzero, set_mask
from nnarena.sparsity.schedules import PruningSchedule

if TYPE_CHECKING:
    from nnarena.train.trainer import FitResult, Trainer

__all__ = ["AutoSparse", "SoftThreshold", "ga_alpha", "soft_threshold"]


def ga_alpha(alpha: float, progress: float) -> float:
    """Gradient Annealing's ``alpha`` after ``progress`` (0 to 1) of training: sigmoid-cosine."""
    if progress >= 1.0:
        return 0.0
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    sigmoid = 1.0 - 1.0 / (1.0 + math.exp(-(12.0 * progress - 6.0)))
    return alpha * max(cosine, sigmoid)


class _SoftThresholdFn(torch.autograd.Function):
    """``sign(w) relu(|w| - tau)``; backward with the ReLU's derivative ``alpha`` where masked."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
        excess = weight.abs() - tau
        kept = excess > 0
        ctx.save_for_backward(weight, kept)
        ctx.alpha = alpha
        return torch.sign(weight) * excess.clamp_min(0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        weight, kept = ctx.saved_tensors
        scaled = grad * torch.where(kept, 1.0, ctx.alpha)
        return scaled, -(scaled * torch.sign(weight)).sum(), None


def soft_threshold(weight: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """``sign(w) relu(|w| - tau)`` whose backward gives masked weights (``|w| <= tau``) ``alpha``
    times their gradient and kept ones all of it (Gradient Annealing); ``tau`` a scalar tensor."""
    return _SoftThresholdFn.apply(weight, tau, alpha)


class SoftThreshold(nn.Module):
    """The parametrization ``w -> sign(w) relu(|w| - sigmoid(s))`` with GA's backward."""

    def __init__(self, s: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s), device=device))
        self.alpha = 0.0  # set by the sparsifier every step

    @property
    def tau(self) -> torch.Tensor:
        return torch.sigmoid(self.s)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return soft_threshold(weight, self.tau, self.alpha)


@register("sparsity", "autosparse",
          paper="AUTOSPARSE: Towards Automated Sparse Training of Deep Neural Networks",
          summary="Learnable per-layer soft thresholds with Gradient Annealing of the masked "
                  "weights' gradient; sparsity is learned, not set.")
class AutoSparse(Sparsifier):
    """Learnable thresholds and Gradient Annealing; a plain masked model at the end.

    Args:
        alpha: Gradient Annealing's starting ``alpha`` (0: no GA, i.e. STR).
        threshold_init: starting ``s`` of every threshold ``tau = sigmoid(s)``.
        threshold_lr: learning rate of the thresholds' parameter group.
        threshold_decay: weight decay on ``s`` (the pressure that raises the thresholds).
    """

    def __init__(self, alpha: float = 0.8, threshold_init: float = -6.0,
                 threshold_lr: float = 5e-2, threshold_decay: float = 0.05) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"autosparse alpha must be in [0, 1], got {alpha}")
        if not threshold_lr > 0:
            raise ConfigError(f"autosparse threshold_lr must be > 0, got {threshold_lr}")
        if not threshold_decay >= 0:
            raise ConfigError(f"autosparse threshold_decay must be >= 0, got {threshold_decay}")
        super().__init__(0.0, schedule=PruningSchedule("one-shot", start=1.0))
        self.alpha, self.threshold_init = alpha, threshold_init
        self.threshold_lr, self.threshold_decay = threshold_lr, threshold_decay
        self.thresholds: dict[str, SoftThreshold] = {}
        self.group: dict[str, Any] | None = None

    @override
    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        super().on_fit_start(trainer, model)
        self.thresholds = {}
        for t in self.targets:
            module = SoftThreshold(self.threshold_init, t.original.device)
            parametrize.register_parametrization(t.module, t.param, module)
            self.thresholds[t.name] = module
        optimizer = trainer.optimizer
        assert optimizer is not None, "the Trainer sets its optimizer before on_fit_start"
        optimizer.add_param_group({"params": [m.s for m in self.thresholds.values()],
                                   "lr": self.threshold_lr, "weight_decay": 0.0})
        self.group = optimizer.param_groups[-1]
        self.set_alpha(ga_alpha(self.alpha, 0.0))

    def set_alpha(self, alpha: float) -> None:
        for module in self.thresholds.values():
            module.alpha = alpha

    @override
    def on_step_start(self, trainer: Trainer, model: nn.Module) -> None:
        self.set_alpha(ga_alpha(self.alpha, trainer.step / max(trainer.total_steps, 1)))

    @override
    def on_after_backward(self, trainer: Trainer, model: nn.Module) -> None:
        for module in self.thresholds.values():
            if module.s.grad is None:
                module.s.grad = torch.zeros_like(module.s)
            module.s.grad.add_(self.threshold_decay * module.s.detach())

    @override
    def prune(self, trainer: Trainer, model: nn.Module, sparsity: float) -> None:
        """Freeze the thresholds into plain masks (the planned step: after the last one)."""
        self.freeze(trainer.optimizer)
        nonzero, total = count_nonzero(model)
        self.history.append({"step": trainer.step, "sparsity": 1.0 - nonzero / max(total, 1)})

    def freeze(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Every tensor to its soft-thresholded values under a mask of their nonzeros."""
        for t in self.targets:
            if t.name in self.thresholds:
                parametrize.remove_parametrizations(t.module, t.param, leave_parametrized=True)
                set_mask(t, t.original != 0)
        if optimizer is not None and self.group is not None:
            for s in self.group["params"]:
                optimizer.state.pop(s, None)
            optimizer.param_groups.remove(self.group)
        self.thresholds, self.group = {}, None

    @override
    def on_fit_end(self, trainer: Trainer, model: nn.Module, result: FitResult) -> None:
        if self.thresholds:  # the run ended before the planned step (time limit, divergence)
            self.freeze(trainer.optimizer)
        super().on_fit_end(trainer, model, result)
