"""``bip``: "Advancing Model Pruning via Bi-level Optimization" (Zhang et al., NeurIPS 2022).

The paper casts pruning as a bi-level problem over a mask ``m`` (upper level) and the weights
``θ`` (lower level, the retraining):

    min_{m ∈ S}  ℓ(m ⊙ θ*(m))   s.t.   θ*(m) = argmin_θ  g(m, θ) = ℓ(m ⊙ θ) + γ/2 ‖θ‖²,

with ``S = {m ∈ {0,1}^n : 1ᵀm ≤ k}`` relaxed to its convex hull ``[0,1]^n ∩ {1ᵀm ≤ k}``. The
implicit gradient is ``dℓ/dm = ∇_m ℓ + (dθ*/dm)ᵀ ∇_θ ℓ`` with ``(dθ*/dm)ᵀ = -∇²_mθ g [∇²_θθ g]⁻¹``.
Writing ``z = m ⊙ θ``, ``∇_θ g = m ⊙ ∇_z ℓ + γθ``; bi-linearity gives ``∇²_mθ g = diag(∇_z ℓ) +
diag(m) ∇²_zz ℓ diag(θ)``, and the paper's Hessian-free assumption (``∇²_zz ℓ = 0``) leaves
``∇²_mθ g = diag(∇_z ℓ)`` and ``∇²_θθ g = γI``, so the implicit gradient is first order:

    dℓ/dm = ∇_m ℓ(m ⊙ θ) - (1/γ) ∇_z ℓ ⊙ ∇_θ ℓ(m ⊙ θ) = ∇_z ℓ ⊙ (θ - (m/γ) ⊙ ∇_z ℓ)

(``∇_m ℓ = θ ⊙ ∇_z ℓ``, ``∇_θ ℓ = m ⊙ ∇_z ℓ``; `mask_gradient`). BiP alternates an SGD step on
``θ`` for ``g`` and a projected gradient step ``m ← P_S(m - α dℓ/dm)`` on the scores; the forward
uses the binary mask, the top-k of the scores, with the gradient passed straight through to them.
It prunes a trained dense model directly to the target sparsity (global ranking, scores
initialised to ``|θ|``); the retraining happens inside (no separate fine-tuning).

Implemented here, as a trainer callback:

- The lower level is the Trainer's own step (any rule, any optimizer); BiP adds the regulariser's
  gradient ``γθ`` (``gamma``) to every masked tensor's ``.grad`` while it runs.
- The upper level: one score tensor per target (`BiP.m`, in ``[0, 1]``), initialised to ``|θ|``
  (the official code's scaled score init, so the first mask is global magnitude) after the first
  ``start`` fraction of the steps, then every step a plain SGD step of size ``mask_lr`` along
  `mask_gradient`, with the binary mask of the forward as ``m`` (straight-through), and the exact
  Euclidean projection onto the relaxed ``S`` (`project_scores`: clip to ``[0, 1]``, shift by the
  bisected ``μ`` when ``1ᵀm > k``; one budget over all tensors for ``global``, one per tensor for
  ``layerwise`` and ``erk``). Every ``every`` steps the binary mask becomes the top-k of ``m``
  (`allocate`: exact counts). Mask updates stop after the ``end`` fraction (``1``: never).
- ``∇_z ℓ`` is the gradient with respect to the effective (masked) weight at every position,
  pruned ones included, caught by a tensor hook on the mask parametrization's output; a rule that
  writes ``.grad`` without autograd gives its ``.grad`` instead (exact at kept positions only).
- Pruned weights keep their values, as in the official code (dense weights, binary mask in the
  forward): a pruned weight's score still moves by ``θ ⊙ ∇_z ℓ``, and it comes back with its value.
  So the mask buffer is rewritten in place between updates, and `set_mask` (which zeroes pruned
  values) is applied once more at the end. Zeroing them at every update (the core's regrow-at-zero)
  leaves pruned scores without a gradient: digits MLP at 90%, 0.886 against 0.928 (3 seeds).

Deviations:

- ``γ`` is split in two, as in the official code (weight decay ``1e-4`` for the lower level, an
  independent ``lr2`` for the implicit term): ``gamma`` is the regulariser and ``ig_scale`` the
  implicit term's scale (``1/γ`` in the derivation). With one ``γ`` no value works under Adam: a
  regulariser strong enough for a small ``1/γ`` (``γ = 1``) stops training (10% on digits), and
  ``γ = 1e-2`` makes the implicit term, which only ever raises kept scores, dominate and freeze
  the mask (digits at 90%, mask refreshed every step: 0.908, against 0.929 with ``ig_scale = 1``
  and 0.931 with ``ig_scale = 0``).
  The official code's term is ``-lr2 (θ ⊙ ∇_z ℓ)²``; this module keeps the paper's form.
- The ``m`` step uses the gradients of the trainer's backward, the same as the ``θ`` step (the
  paper takes it after the ``θ`` step, the official code on a second batch): no extra pass.
- The paper prunes a pretrained dense model; here the first ``start`` of the budget trains it
  dense, so that BiP has the same budget as every other method. The binary mask is refreshed
  every 10 steps by default (the paper: every step), which cuts the top-k cost with no measured
  loss on digits. Only unstructured masks (the paper also prunes filters and channels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from nnarena.errors import ConfigError
from nnarena.registry import register
from nnarena.sparsity.allocation import Allocation, allocate, keep_counts
from nnarena.sparsity.base import Sparsifier
from nnarena.sparsity.masks import Mask, Target, set_mask
from nnarena.sparsity.schedules import PruningSchedule

if TYPE_CHECKING:
    from nnarena.train.trainer import FitResult, Trainer

__all__ = ["BiP", "mask_gradient", "project_scores"]

_BISECTIONS = 50


def mask_gradient(grad_z: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor,
                  ig_scale: float) -> torch.Tensor:
    """BiP's first-order implicit gradient ``∇_z ℓ ⊙ (θ - c m ⊙ ∇_z ℓ)`` of ``ℓ(m ⊙ θ*(m))``.

    Args:
        grad_z: ``∇_z ℓ`` at ``z = m ⊙ θ``.
        theta: the lower-level weights ``θ``.
        mask: ``m`` (the binary mask in the forward, or any relaxed value).
        ig_scale: ``c``, the implicit term's scale: ``1/γ`` in the paper.
    """
    return grad_z * (theta - ig_scale * mask * grad_z)


def project_scores(scores: list[torch.Tensor], budget: float) -> None:
    """Project the concatenation of ``scores`` in place onto ``{m ∈ [0,1]^n : 1ᵀm ≤ budget}``.

    The Euclidean projection is ``clip(m - μ, 0, 1)`` with ``μ = 0`` when the clipped scores fit
    the budget, else the ``μ > 0`` at which they sum to it (found by bisection).
    """
    for s in scores:
        s.clamp_(0.0, 1.0)
    if sum(float(s.sum()) for s in scores) <= budget:
        return
    lo, hi = 0.0, max(float(s.max()) for s in scores)
    for _ in range(_BISECTIONS):
        mu = (lo + hi) / 2
        if sum(float((s - mu).clamp_(min=0.0).sum()) for s in scores) > budget:
            lo = mu
        else:
            hi = mu
    for s in scores:
        s.sub_(hi).clamp_(min=0.0)


@register("sparsity", "bip", paper="Advancing Model Pruning via Bi-level Optimization",
          summary="Bi-level pruning: mask scores by first-order implicit-gradient steps while the "
                  "trainer retrains the weights.")
class BiP(Sparsifier):
    """BiP on top of any trainer: the trainer is the lower level, this callback the upper one.

    Args:
        sparsity: fraction of zeros over the maskable weights (from ``start`` on).
        allocation: ``global`` (the paper's), ``layerwise`` or ``erk`` (see `allocate`).
        min_keep: the smallest fraction of each tensor kept.
        gamma: the lower-level regulariser ``γ``: ``γθ`` is added to the masked weights' gradients.
        ig_scale: scale of the implicit term of the score gradient (``1/γ`` in the paper's
            derivation; ``0`` drops it).
        mask_lr: step size of the score (upper-level) SGD step.
        start: fraction of the steps trained dense before the scores start from ``|θ|``.
        end: fraction of the steps after which the mask is frozen (``1``: updated to the end).
        every: steps between binary mask updates.
    """

    def __init__(self, sparsity: float = 0.8, allocation: Allocation = "global",
                 min_keep: float = 0.0, gamma: float = 1e-4, ig_scale: float = 1.0,
                 mask_lr: float = 1.0, start: float = 0.3, end: float = 1.0,
                 every: int = 10) -> None:
        super().__init__(sparsity, allocation, min_keep, PruningSchedule("one-shot", start=start))
        if gamma < 0 or ig_scale < 0 or not mask_lr > 0:
            raise ConfigError(f"bip needs gamma >= 0, ig_scale >= 0 and mask_lr > 0, got "
                              f"gamma={gamma}, ig_scale={ig_scale}, mask_lr={mask_lr}")
        if not 0.0 <= start <= end <= 1.0:
            raise ConfigError(f"bip needs 0 <= start <= end <= 1, got start={start}, end={end}")
        if every < 1:
            raise ConfigError(f"bip every must be >= 1, got {every}")
        self.gamma, self.ig_scale, self.mask_lr = gamma, ig_scale, mask_lr
        self.start, self.end, self.every = start, end, every
        self.m: dict[str, torch.Tensor] = {}
        self.grad_z: dict[str, torch.Tensor] = {}
        self._hooks: list[RemovableHandle] = []
        self._first = self._last = 0

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        self.m, self.grad_z = {}, {}
        self._first = round(self.start * trainer.total_steps)
        self._last = round(self.end * trainer.total_steps)
        super().on_fit_start(trainer, model)

    def scores(self, trainer: Trainer, model: nn.Module) -> dict[str, torch.Tensor]:
        """``|θ|`` (the first mask: global magnitude), which also becomes the relaxed ``m``."""
        self.m = {t.name: t.original.detach().abs().clone() for t in self.targets}
        self._project()
        return self.m

    def prune(self, trainer: Trainer, model: nn.Module, sparsity: float) -> None:
        """The first mask, then hooks catching ``∇_z ℓ`` on each mask's output."""
        with torch.no_grad():
            masks = allocate(self.scores(trainer, model), sparsity, self.allocation,
                             self.min_keep)
            for t in self.targets:
                set_mask(t, torch.ones_like(masks[t.name]))  # keeps the pruned values
                self._mask(t).mask.copy_(masks[t.name])
                self._hooks.append(self._mask(t).register_forward_hook(self._catch(t.name)))
        self._log(trainer)

    def on_step_start(self, trainer: Trainer, model: nn.Module) -> None:
        self.grad_z = {}

    def on_after_backward(self, trainer: Trainer, model: nn.Module) -> None:
        if not self.m:
            return
        with torch.no_grad():
            update = trainer.step < self._last
            for t in self.targets:
                theta, grad = t.original, t.original.grad
                grad_z = self.grad_z.get(t.name, grad)
                if update and grad_z is not None:
                    self.m[t.name].sub_(self.mask_lr * mask_gradient(grad_z, theta, self._mask(
                        t).mask, self.ig_scale))
                if grad is not None:
                    grad.add_(theta, alpha=self.gamma)
            if update:
                self._project()

    def on_step_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, float]) -> None:
        super().on_step_end(trainer, model, logs)
        step = trainer.step
        if not self.m or step > self._last or step == self._first or (
                step - self._first) % self.every:
            return
        with torch.no_grad():
            masks = allocate(self.m, self.sparsity, self.allocation, self.min_keep)
            for t in self.targets:
                self._mask(t).mask.copy_(masks[t.name])
        self._log(trainer)

    def on_fit_end(self, trainer: Trainer, model: nn.Module, result: FitResult) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        with torch.no_grad():
            for t in self.targets:
                if t.mask is not None:
                    set_mask(t, t.mask.clone())  # zero the pruned values for good
        super().on_fit_end(trainer, model, result)

    def _project(self) -> None:
        """`project_scores` onto the relaxed budget: one for all targets (``global``) or one per
        target (``layerwise``, ``erk``)."""
        sizes = {t.name: t.numel() for t in self.targets}
        counts = keep_counts(sizes, self.sparsity, self.allocation,
                             {t.name: tuple(t.original.shape) for t in self.targets})
        if isinstance(counts, int):
            project_scores(list(self.m.values()), counts)
        else:
            for name, scores in self.m.items():
                project_scores([scores], counts[name])

    def _catch(self, name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        """A forward hook on a mask that stores ``∇_z ℓ`` of its output when backward reaches it."""
        def store(grad: torch.Tensor) -> None:
            previous = self.grad_z.get(name)
            self.grad_z[name] = grad.detach() if previous is None else previous + grad.detach()

        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(store)
        return hook

    @staticmethod
    def _mask(target: Target) -> Mask:
        return next(p for p in target.module.parametrizations[target.param]
                    if isinstance(p, Mask))

    def _log(self, trainer: Trainer) -> None:
        kept = sum(int(self._mask(t).mask.sum()) for t in self.targets)
        total = sum(t.numel() for t in self.targets)
        self.history.append({"step": trainer.step, "sparsity": 1.0 - kept / max(total, 1)})
