"""Dynamic sparse training: prune and regrow during training at a constant number of weights.

One mechanism, three methods. The network is sparse from initialisation (a random mask, as
`random`); every ``every`` steps until ``end`` (a fraction of training) a fraction of the active
weights with the smallest ``|w|`` is dropped and as many inactive positions are activated, so the
number of active weights never changes. The fraction decays with a cosine, ``drop / 2 * (1 +
cos(pi t / T_end))`` (RigL's schedule). Regrown weights start at zero (a position dropped and
regrown in the same update too) and their optimizer state (momenta) is reset, as in RigL.

- ``set`` -- SET, "Scalable training of artificial neural networks with adaptive sparse
  connectivity inspired by network science" (Mocanu et al., Nature Communications 2018; a classic,
  not in the paper list): per tensor, regrowth at random among the inactive positions. Deviations:
  the original removes a constant fraction (0.3) after every epoch, splitting it between the
  smallest positive and the largest negative weights, and draws new weights at random; here the
  drop fraction follows RigL's cosine decay, ``|w|`` ranks both signs together and new weights
  start at zero (RigL's SET baseline).
- ``rigl`` -- RigL, "Rigging the Lottery: Making All Tickets Winners" (Evci et al., ICML 2020; a
  classic): per tensor, regrowth where the magnitude of the dense gradient ``dL/dw_eff`` is
  largest, the gradient with respect to the effective (masked) weight, so it exists at inactive
  positions too. It is captured on update steps only, by a hook on the mask parametrization's
  output during that step's backward pass; a rule that fills ``.grad`` by hand (no autograd
  through the weights) gives its own ``.grad`` instead. The mask is updated right after that
  step's optimizer step, with the gradient of the batch just seen.
- ``dsl`` -- "Dynamic Sparse Learning: A Novel Paradigm for Efficient Recommendation" (Wang et
  al.): random uniform sparsity at initialisation, then magnitude pruning and gradient regrowth
  with a cosine-annealed update ratio, one ranking over all tensors, so the sparsity distribution
  across tensors (e.g. user and item embedding tables) adapts while the total stays fixed. Regrowth
  uses the dense gradient as ``rigl``. The paper's update interval and ratio are not given in its
  abstract; the defaults are those of ``set`` and ``rigl``.

Both ``set`` and ``rigl`` start from Erdős-Rényi-Kernel layer densities (RigL's default); tensors
the allocation keeps dense have nothing to regrow into and are left alone. Defaults: RigL's drop
fraction 0.3 and end 0.75, but an update every 50 steps, not RigL's 100: RigL's runs have ~10^5
steps (hundreds of updates), the arena's ~10^3. Active weights are the mask's ones: a weight regrown
at zero counts as active, but not in ``count_nonzero`` until it is updated (and never where its
gradient is always zero, e.g. weights from a constant-zero input pixel).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import torch
from torch import nn

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.registry import register
from nnarena.sparsity.allocation import top_k
from nnarena.sparsity.masks import Mask, Target, set_mask
from nnarena.sparsity.random_pruning import Distribution, RandomPruning

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from nnarena.train.trainer import FitResult, Trainer

__all__ = ["DSL", "SET", "DynamicSparsifier", "RigL", "prune_and_grow"]

Growth = Literal["random", "gradient"]


def prune_and_grow(mask: torch.Tensor, magnitude: torch.Tensor, growth: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the ``k`` active positions of smallest ``magnitude``, then activate the ``k`` positions
    of largest ``growth`` among the inactive ones (the just-dropped included).

    Returns:
        ``(after_drop, new_mask)``, boolean, ``mask``'s shape; ``new_mask`` has ``mask``'s count.
    """
    dropped = top_k(torch.where(mask, -magnitude, -torch.inf), k)
    after_drop = mask & ~dropped
    grown = top_k(torch.where(after_drop, -torch.inf, growth), k)
    return after_drop, after_drop | grown


class DynamicSparsifier(RandomPruning):
    """Prune-and-regrow at a constant number of active weights (see the module docstring).

    Args:
        sparsity: fraction of zeros over the maskable weights, from initialisation on.
        distribution: initial layer densities, ``erk`` or ``uniform``.
        drop: fraction of each tensor's active weights replaced at the first update (decays).
        every: steps between updates.
        end: last update, as a fraction of the training steps.
    """

    growth: ClassVar[Growth] = "random"
    per_tensor: ClassVar[bool] = True

    def __init__(self, sparsity: float = 0.8, distribution: Distribution = "erk",
                 drop: float = 0.3, every: int = 50, end: float = 0.75) -> None:
        method = type(self).__name__.lower()
        if distribution not in get_args(Distribution):
            raise ConfigError(f"{method} distribution must be one of "
                              f"{', '.join(get_args(Distribution))}; got {distribution!r}")
        if not 0.0 < drop <= 1.0:
            raise ConfigError(f"{method} drop must be in (0, 1], got {drop}")
        if every < 1:
            raise ConfigError(f"{method} every must be >= 1, got {every}")
        if not 0.0 < end <= 1.0:
            raise ConfigError(f"{method} end must be in (0, 1], got {end}")
        super().__init__(sparsity, distribution)
        self.drop, self.every, self.end = drop, every, end
        self.generator: torch.Generator | None = None
        self._grads: dict[str, torch.Tensor] = {}
        self._hooks: list[RemovableHandle] = []

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        super().on_fit_start(trainer, model)
        self.generator = torch.Generator().manual_seed(trainer.seed + 1)

    def drop_fraction(self, step: int, total_steps: int) -> float:
        """The fraction replaced at ``step``: ``drop`` cosine-decayed to 0 at ``end``; 0 on steps
        that do not update."""
        last = round(self.end * total_steps)
        if step % self.every or step > last or step >= total_steps:
            return 0.0
        return self.drop / 2.0 * (1.0 + math.cos(math.pi * step / max(last, 1)))

    def on_step_start(self, trainer: Trainer, model: nn.Module) -> None:
        if self.growth == "gradient" and self.drop_fraction(trainer.step + 1,
                                                            trainer.total_steps) > 0:
            for t in self.targets:
                self._hooks.append(_mask_module(t).register_forward_hook(self._capture(t.name)))

    def _capture(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if output.requires_grad:
                output.register_hook(lambda grad: self._accumulate(name, grad))
        return hook

    def _accumulate(self, name: str, grad: torch.Tensor) -> None:
        previous = self._grads.get(name)
        self._grads[name] = grad.detach().clone() if previous is None else previous + grad

    def on_step_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, float]) -> None:
        super().on_step_end(trainer, model, logs)
        self._remove_hooks()
        fraction = self.drop_fraction(trainer.step, trainer.total_steps)
        if fraction > 0:
            regrown = self.update(fraction)
            self.history.append({"step": trainer.step, "drop_fraction": fraction,
                                 "regrown": regrown})
        self._grads = {}

    def on_fit_end(self, trainer: Trainer, model: nn.Module, result: FitResult) -> None:
        self._remove_hooks()  # a run that stopped mid-step
        super().on_fit_end(trainer, model, result)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def growth_scores(self, target: Target) -> torch.Tensor:
        """Higher = regrow first: uniform noise (``random``) or ``|dL/dw_eff|`` (``gradient``)."""
        original = target.original
        if self.growth == "random":
            assert self.generator is not None
            return torch.rand(original.shape, generator=self.generator).to(original.device)
        grad = self._grads.get(target.name, original.grad)
        if grad is None:
            raise IncompatibleError(f"sparsity '{self.name}' regrows by gradient, but "
                                    f"{target.name} got none this step")
        return grad.detach().abs()

    def update(self, fraction: float) -> int:
        """One prune-and-grow update replacing ``fraction`` of the active weights; returns how
        many positions became active."""
        regrown = 0
        with torch.no_grad():
            if self.per_tensor:
                for t in self.targets:
                    mask = t.mask.bool()
                    if bool(mask.all()):
                        continue
                    k = round(fraction * int(mask.sum()))
                    regrown += self._apply(t, *prune_and_grow(mask, t.original.abs(),
                                                              self.growth_scores(t), k))
            else:
                masks = [t.mask.bool().flatten() for t in self.targets]
                flat = torch.cat(masks)
                k = round(fraction * int(flat.sum()))
                after, new = prune_and_grow(
                    flat, torch.cat([t.original.abs().flatten() for t in self.targets]),
                    torch.cat([self.growth_scores(t).flatten() for t in self.targets]), k)
                offset = 0
                for t, mask in zip(self.targets, masks, strict=True):
                    n = mask.numel()
                    shape = t.original.shape
                    regrown += self._apply(t, after[offset:offset + n].view(shape),
                                           new[offset:offset + n].view(shape))
                    offset += n
        return regrown

    def _apply(self, target: Target, after_drop: torch.Tensor, new: torch.Tensor) -> int:
        """Set the new mask (dropped and regrown values restart at zero, as their optimizer
        state); returns how many positions became active."""
        old = target.mask.bool()
        set_mask(target, after_drop)
        set_mask(target, new)
        changed = (old & ~after_drop) | (new & ~after_drop)
        state = self.optimizer.state.get(target.original, {}) if self.optimizer else {}
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == changed.shape:
                value[changed] = 0.0
        return int((new & ~old).sum())


def _mask_module(target: Target) -> Mask:
    return next(p for p in target.module.parametrizations[target.param] if isinstance(p, Mask))


@register("sparsity", "set", summary="Sparse from init (ERK); smallest |w| dropped, regrown at "
          "random (SET, Mocanu et al. 2018).")
class SET(DynamicSparsifier):
    """SET: per-tensor magnitude drop, random regrowth (arguments as `DynamicSparsifier`)."""


@register("sparsity", "rigl", summary="Sparse from init (ERK); smallest |w| dropped, regrown where "
          "the dense gradient is largest (RigL, Evci et al. 2020).")
class RigL(DynamicSparsifier):
    """RigL: per-tensor magnitude drop, dense-gradient regrowth (arguments as
    `DynamicSparsifier`)."""

    growth: ClassVar[Growth] = "gradient"


@register("sparsity", "dsl",
          paper="Dynamic Sparse Learning: A Novel Paradigm for Efficient Recommendation",
          summary="Sparse from init; global magnitude drop and gradient regrowth, so per-tensor "
                  "densities adapt at a fixed total.")
class DSL(DynamicSparsifier):
    """DSL: global magnitude drop, global dense-gradient regrowth; uniform random start.

    Args:
        sparsity: fraction of zeros over the maskable weights, from initialisation on.
        distribution: initial layer densities, ``uniform`` (the paper's) or ``erk``.
        drop: fraction of the active weights replaced at the first update (decays).
        every: steps between updates.
        end: last update, as a fraction of the training steps.
    """

    growth: ClassVar[Growth] = "gradient"
    per_tensor: ClassVar[bool] = False

    def __init__(self, sparsity: float = 0.8, distribution: Distribution = "uniform",
                 drop: float = 0.3, every: int = 50, end: float = 0.75) -> None:
        super().__init__(sparsity, distribution, drop, every, end)
