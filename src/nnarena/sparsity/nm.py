"""``nm``: "Efficient N:M Sparse DNN Training Using Algorithm, Architecture, and Dataflow Co-Design"
(Fang, Sun, Zhou, Wang; arXiv 2309.13015).

The paper's algorithm, BDWP (bidirectional weight pruning), makes both weight GEMMs of training
N:M sparse while the weights stay dense:

- forward (FF): ``Y = X Wf^T``, ``Wf`` = the dense ``W`` with the ``n`` largest magnitudes kept in
  every group of ``m`` consecutive weights along the input dimension (the forward reduction);
- backward data (BP): ``dX = dY Wb``, ``Wb`` = a *separate* N:M pruning of ``W^T``: groups of
  ``m`` consecutive weights along the output dimension, the reduction of that GEMM;
- weight update (WU): ``dW = dY^T X`` is dense and updates the dense weights, plus SR-STE's
  sparse-refined term ``decay * (1 - Mf) * W`` on the weights the forward mask drops.

Both masks are recomputed from the current dense weights at every step, from step 0. The paper's
accelerator (SAT) and dataflow optimisations are hardware and out of scope.

Implemented for ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (``groups=1``); for a convolution the
groups run along the input channels (forward) and the output channels (backward) at each kernel
position. Each layer's weight carries a `Mask` parametrization holding ``Mf`` whose gradient goes
straight through to every dense weight, so whatever reads ``module.weight`` (evaluation, rules
that compute updates by hand, ``count_nonzero``) sees the forward N:M weights; the layer's
forward is swapped for one whose autograd function computes ``dX`` with ``Wb``. At the end of the
fit both are removed and the forward mask is set with `set_mask`: the trained model is exactly
N:M (``n / m`` of each layer's weights nonzero) and saves, loads and finalizes like any masked
model. Besides the base metrics, ``backward_sparsity`` reports the zeros of the backward-data
weights ``Wb`` over the N:M layers at the end (the forward ones are ``sparsity``).

Deviations and limits:

- a layer's input size (input channels for a convolution) must be a multiple of ``m``; otherwise,
  and for any other maskable tensor (Embedding, KAN layers, Linear/Conv subclasses such as
  feedback-rule layers, grouped convolutions), ``skip_incompatible=True`` leaves it dense instead
  of raising. The output size need not be: a last, partial backward group of ``r < m`` weights
  keeps ``min(n, r)`` of them, as a zero-padded group would (e.g. a 10-class head: 2 of 8 and
  2 of 2), so the backward density of such a layer is slightly above ``n / m``;
- rules that do not back-propagate through ``dX`` (feedback alignment, local rules' detached
  blocks) get the forward N:M weights and the dense weight gradient; BDWP's backward pruning then
  only acts where autograd computes ``dX`` through the layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.registry import register
from nnarena.rules.feedback import conv_with_feedback, linear_with_feedback
from nnarena.sparsity.base import Sparsifier
from nnarena.sparsity.masks import Mask, Target, prunable_targets, set_mask

if TYPE_CHECKING:
    from nnarena.train.trainer import FitResult, Trainer

__all__ = ["BidirectionalNM", "nm_mask"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def nm_mask(weight: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``|weight|`` in every group of ``m`` consecutive
    entries along ``dim`` (equal values: the earlier first); a last, partial group of ``r``
    entries keeps ``min(n, r)``."""
    scores = weight.detach().abs().movedim(dim, 0)
    size, rest = scores.shape[0], scores.shape[1:]
    pad = -size % m
    if pad:  # distinct values below every |w|: never kept before a weight, never tied
        fill = -torch.arange(1, pad + 1, dtype=scores.dtype, device=scores.device)
        scores = torch.cat([scores, fill.view(pad, *[1] * len(rest)).expand(pad, *rest)])
    groups = scores.contiguous().view(-1, m, math.prod(rest))  # (group, member, position)
    # Each group's n-th largest value by a running top-n over its m members: 2n(m-1)
    # element-wise ops over all groups at once, several times faster on CPU than topk over
    # rows of m.
    top = [groups[:, 0]] + [torch.full_like(groups[:, 0], -math.inf)] * (n - 1)
    for member in groups.unbind(1)[1:]:
        for k in range(n):
            top[k], member = torch.maximum(top[k], member), torch.minimum(top[k], member)
    keep = groups >= top[-1].unsqueeze(1)  # at least n of each group, more on ties
    if int(torch.count_nonzero(keep)) != n * keep[:, 0].numel():  # ties: rank exactly
        keep = _ranks(groups) < n
    return keep.view(-1, *rest)[:size].movedim(0, dim)


def _ranks(groups: torch.Tensor) -> torch.Tensor:
    """Each member's rank in its group (0: largest; equal values: the earlier first)."""
    m = groups.shape[1]
    rank = torch.zeros(groups.shape, dtype=torch.int32, device=groups.device)
    for j in range(m):
        member = groups[:, j:j + 1]
        rank[:, :j] += member > groups[:, :j]
        rank[:, j + 1:] += member >= groups[:, j + 1:]
    return rank


class _StraightThrough(torch.autograd.Function):
    """``w * mask`` forward; the gradient reaches every ``w``, plus ``decay * (1 - mask) * w``."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
        ctx.decay = decay
        if decay:
            ctx.save_for_backward(weight, mask)
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.decay:
            weight, mask = ctx.saved_tensors
            grad = grad + ctx.decay * (1.0 - mask) * weight
        return grad, None, None


class _NMMask(Mask):
    """The forward N:M mask as a parametrization with a dense (straight-through) gradient; it
    carries the backward mask too (not saved with the state: the end of the fit drops it)."""

    def __init__(self, weight: torch.Tensor, decay: float) -> None:
        super().__init__(torch.ones_like(weight))
        self.register_buffer("backward_mask", torch.ones_like(weight), persistent=False)
        self.decay = decay

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(weight, self.mask, self.decay)


def _backward_weight(module: nn.Module) -> torch.Tensor:
    parametrization = module.parametrizations.weight
    return parametrization.original.detach() * parametrization[0].backward_mask


def _bidirectional_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):  # no dX to compute
        return F.linear(x, self.weight, self.bias)
    return linear_with_feedback(x, self.weight, self.bias, lambda _: _backward_weight(self))


def _bidirectional_conv_forward(self: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):
        return self._conv_forward(x, self.weight, self.bias)
    return conv_with_feedback(self, x, lambda _: _backward_weight(self))


@dataclass(frozen=True)
class _Layer:
    """A layer under BDWP: its target and the forward that replaces the module's during the fit."""

    target: Target
    forward: Callable[..., torch.Tensor]

    @property
    def parametrization(self) -> _NMMask:
        return self.target.module.parametrizations[self.target.param][0]


@register("sparsity", "nm",
          paper="Efficient N:M Sparse DNN Training Using Algorithm, Architecture, and Dataflow "
                "Co-Design",
          summary="BDWP: N:M forward weights, separately N:M-pruned transposed weights for dX, "
                  "dense weight updates.")
class BidirectionalNM(Sparsifier):
    """BDWP N:M sparse training of every Linear and Conv layer, from step 0.

    Args:
        n: weights kept in every group.
        m: group size (consecutive weights along the GEMM's reduction dimension).
        decay: SR-STE's sparse-refined decay on the weights the forward mask drops (0: plain
            straight-through dense update).
        skip_incompatible: leave layers that cannot be N:M pruned (input size not a multiple of
            ``m``, non-GEMM tensors, grouped convolutions) dense instead of raising.
    """

    def __init__(self, n: int = 2, m: int = 8, decay: float = 0.0,
                 skip_incompatible: bool = False) -> None:
        if isinstance(n, bool) or isinstance(m, bool) or not (
                isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
            raise ConfigError(f"nm needs integers 1 <= n < m, got n={n!r}, m={m!r}")
        if not decay >= 0.0:
            raise ConfigError(f"nm decay must be >= 0, got {decay}")
        super().__init__(sparsity=1.0 - n / m, allocation="layerwise")
        self.n, self.m, self.decay = n, m, decay
        self.skip_incompatible = skip_incompatible
        self.layers: list[_Layer] = []

    def _layer_for(self, target: Target) -> _Layer | str:
        """The BDWP layer for ``target``, or why it cannot be one."""
        module = target.module
        if parametrize.is_parametrized(module, target.param):
            return "already carries a parametrization (a mask?); nm needs dense weights"
        if target.param == "weight" and type(module) is nn.Linear:
            if module.in_features % self.m:
                return (f"has in_features={module.in_features}, not a multiple of "
                        f"m={self.m}")
            return _Layer(target, _bidirectional_linear_forward)
        if target.param == "weight" and type(module) in _CONVS:
            if module.groups != 1:
                return f"is a grouped convolution (groups={module.groups})"
            if module.in_channels % self.m:
                return (f"has in_channels={module.in_channels}, not a multiple of "
                        f"m={self.m}")
            return _Layer(target, _bidirectional_conv_forward)
        return (f"is a {type(module).__name__} tensor; nm prunes the weights of plain nn.Linear "
                "and nn.Conv1d/2d/3d layers")

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        # Not the base's: BDWP has no schedule, it recomputes both masks at every step.
        if trainer.rule.capabilities.closed_form:
            raise IncompatibleError(f"sparsity '{self.name}' prunes around gradient steps; rule "
                                    f"'{trainer.rule.name}' is closed-form")
        self.layers = []
        for target in prunable_targets(model):
            layer = self._layer_for(target)
            if isinstance(layer, _Layer):
                self.layers.append(layer)
            elif not self.skip_incompatible:
                raise IncompatibleError(f"sparsity '{self.name}' {self.n}:{self.m}: "
                                        f"'{target.name}' {layer}; pass "
                                        "skip_incompatible=True to leave such layers dense")
        if not self.layers:
            raise IncompatibleError(f"sparsity '{self.name}': the model has no nn.Linear or "
                                    "nn.Conv layer it can N:M prune")
        self.targets = [layer.target for layer in self.layers]
        for layer in self.layers:
            module = layer.target.module
            parametrize.register_parametrization(module, "weight",
                                                 _NMMask(layer.target.original, self.decay))
            module.forward = MethodType(layer.forward, module)
        self.update_masks()

    def update_masks(self) -> None:
        """Recompute every layer's forward and backward masks from its dense weights."""
        with torch.no_grad():
            for layer in self.layers:
                weight, parametrization = layer.target.original, layer.parametrization
                parametrization.mask.copy_(nm_mask(weight, self.n, self.m, dim=1))
                parametrization.backward_mask.copy_(nm_mask(weight, self.n, self.m, dim=0))

    def on_step_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, float]) -> None:
        self.update_masks()

    def on_fit_end(self, trainer: Trainer, model: nn.Module, result: FitResult) -> None:
        zeros = total = 0
        for layer in self.layers:
            target, parametrization = layer.target, layer.parametrization
            backward = parametrization.backward_mask
            zeros += int(torch.count_nonzero(target.original.detach() * backward == 0))
            total += backward.numel()
            mask = parametrization.mask.bool()
            del target.module.forward
            parametrize.remove_parametrizations(target.module, target.param,
                                                leave_parametrized=False)
            set_mask(target, mask)  # a plain mask: the trained model is exactly N:M
        self.layers = []
        result.metrics["backward_sparsity"] = zeros / max(total, 1)
        super().on_fit_end(trainer, model, result)
