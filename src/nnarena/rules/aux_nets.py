"""Auxiliary networks for local learning, by name: ``linear``, ``infopro``, ``auglocal``, ``man``.

Each block of a `Blocks` model gets its own auxiliary network (an `Auxiliary`) mapping the block's
output to predictions; its `Auxiliary.loss` is the block's local objective. A builder
(`AuxBuilder`) validates its options when created and builds one `Auxiliary` per block from the
model and the shapes it produces on an example batch (`Probe`). Builders by name:

* ``linear`` -- "Greedy Layerwise Learning Can Scale to ImageNet" (Belilovsky et al., ICML 2019,
  arXiv 1812.11446): a linear classifier; conv features are first averaged down to 2x2 (the
  paper's k = 1 auxiliary problem).
* ``infopro`` -- "Revisiting Locally Supervised Learning: an Alternative to End-to-end Training"
  (Wang et al., ICLR 2021): a small classifier plus a decoder reconstructing the input; the loss
  ``recon_k * MSE(decoder(h), x) + ce_k * criterion(classifier(h), y)`` has weights interpolated
  linearly from the first block, (5, 0.5) as in the reference's CIFAR runs, to the last, (0, 1):
  classification alone. Deviation: MSE on the (standardised) input instead
  of BCE on the [0, 1] image; flat features use ``fc-ReLU-fc`` heads and a linear decoder.
* ``auglocal`` -- "Scaling Supervised Local Learning with Augmented Auxiliary Networks" (Ma et
  al., ICLR 2024): block k's auxiliary network is fresh copies (same architecture, new weights) of
  blocks sampled uniformly from those after k, then a pooled linear classifier; the number
  sampled shrinks linearly from ``depth`` at the first block to ``depth * (1 - shrink) + shrink``
  at the last but one (the paper's pyramid). The last block gets the classifier alone. Where a
  skipped block changes the channel count a fresh 1x1 projection adapts it (the reference code
  rebuilds its sampled layers for the incoming width instead).
* ``man`` -- "Momentum Auxiliary Network for Supervised Local Learning" (Su et al., 2024,
  arXiv 2407.05623): block k's auxiliary network runs block k+1's architecture with parameters
  ``EMA(theta_{k+1}) + b``, ``b`` learnable biases (zero at the start, so it starts as an exact
  copy of block k+1), then a pooled linear classifier; the last block's runs ``EMA(head) + b``.
  The EMA, ``ema <- m * ema + (1 - m) * theta``, is updated once per step (`Auxiliary.after_step`).
  The sum ``ema + b`` is what is stored and optimised (see `_MomentumAux`), so weight decay, if
  any, acts on it rather than on ``b``. Deviations: the reference sums the outputs of an EMA copy
  and of a trainable copy, where we add the learnable biases to the EMA parameters (the same for
  a linear map); its InfoPro loss is replaced by the classifier loss alone.
"""

from __future__ import annotations

import copy
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import Blocks
from nnarena.registry import closest

__all__ = [
    "AUX_BUILDERS",
    "AugLocalNets",
    "AuxBuilder",
    "Auxiliary",
    "InfoProNets",
    "LinearHeads",
    "MomentumNets",
    "Probe",
    "classifier",
    "create_aux_builder",
    "sample_following",
]

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Probe:
    """Per-example shapes a model produces: its input, each block's output; and its outputs."""

    input_shape: tuple[int, ...]
    features: tuple[tuple[int, ...], ...]
    n_outputs: int

    @classmethod
    def of(cls, model: Blocks, x: torch.Tensor) -> Probe:
        """Run ``model`` on ``x[:2]`` in eval mode, without touching its state."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                features, out = model.forward_intermediates(x[:2])
        finally:
            model.train(was_training)
        return cls(tuple(x.shape[1:]), tuple(tuple(f.shape[1:]) for f in features),
                   out.shape[1] if out.dim() > 1 else 1)


class Auxiliary(nn.Module):
    """One block's auxiliary network: ``net`` maps the block's output to predictions."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @override
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)

    def loss(self, h: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             criterion: Criterion) -> torch.Tensor:
        """The block's local loss for its output ``h`` on the batch ``(x, y)``."""
        return criterion(self(h), y)

    def after_step(self, model: Blocks) -> None:
        """Update state that is not learnt by gradient, once per step (nothing by default)."""


class AuxBuilder(ABC):
    """Builds one `Auxiliary` per block; options are validated in ``__init__``."""

    name: ClassVar[str]

    @abstractmethod
    def build(self, model: Blocks, probe: Probe) -> list[Auxiliary]:
        """The auxiliary networks of ``model``'s blocks, in block order."""


def classifier(shape: tuple[int, ...], n_outputs: int, pool: int = 1) -> nn.Module:
    """Linear classifier on features of ``shape``; conv maps are average-pooled to ``pool``."""
    if len(shape) == 1:
        return nn.Linear(shape[0], n_outputs)
    sizes = [min(pool, s) for s in shape[1:]]
    return nn.Sequential(_pool(len(sizes), sizes), nn.Flatten(),
                         nn.Linear(shape[0] * math.prod(sizes), n_outputs))


def _pool(dims: int, sizes: list[int]) -> nn.Module:
    if dims not in (1, 2):
        raise IncompatibleError(f"local auxiliary networks take flat, (C, L) or (C, H, W) "
                                f"features, got {dims} spatial dims")
    return (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[dims - 1](sizes)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"auxiliary option {name} must be > 0, got {value}")


def _fraction(name: str, value: float, *, closed: bool = True) -> None:
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
        bound = "1]" if closed else "1)"
        raise ConfigError(f"auxiliary option {name} must be in [0, {bound}, got {value}")


class LinearHeads(AuxBuilder):
    """Greedy local learning: a linear classifier per block (conv maps pooled to ``pool``).

    Args:
        pool: side of the average-pooled conv map fed to the linear layer (2 in the paper).
    """

    name = "linear"

    def __init__(self, pool: int = 2) -> None:
        _positive("pool", pool)
        self.pool = pool

    @override
    def build(self, model: Blocks, probe: Probe) -> list[Auxiliary]:
        return [Auxiliary(classifier(s, probe.n_outputs, self.pool)) for s in probe.features]


class _InfoProAux(Auxiliary):
    def __init__(self, net: nn.Module, decoder: nn.Module, recon: float, ce: float) -> None:
        super().__init__(net)
        self.decoder = decoder
        self.recon, self.ce = recon, ce

    @override
    def loss(self, h: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             criterion: Criterion) -> torch.Tensor:
        target = x.flatten(1) if h.dim() == 2 else x
        return (self.recon * F.mse_loss(self.decoder(h), target)
                + self.ce * criterion(self(h), y))


class _Decoder(nn.Module):
    """Conv features -> the input image: resize to the input's size, then two convs."""

    def __init__(self, channels: int, input_shape: tuple[int, ...], width: int = 12) -> None:
        super().__init__()
        dims = len(input_shape) - 1
        conv, norm = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d))[dims - 1]
        self.size = tuple(input_shape[1:])
        self.mode = ("linear", "bilinear")[dims - 1]
        self.net = nn.Sequential(conv(channels, width, 3, padding=1), norm(width), nn.ReLU(),
                                 conv(width, input_shape[0], 3, padding=1))

    @override
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(F.interpolate(h, size=self.size, mode=self.mode, align_corners=False))


class InfoProNets(AuxBuilder):
    """InfoPro: a small classifier and an input-reconstructing decoder per block.

    Args:
        recon: reconstruction-loss weight at the first and at the last block.
        ce: classification-loss weight at the first and at the last block.
        hidden: width of the classifier's hidden layer.
    """

    name = "infopro"

    def __init__(self, recon: tuple[float, float] = (5.0, 0.0),
                 ce: tuple[float, float] = (0.5, 1.0), hidden: int = 128) -> None:
        for key, pair in (("recon", recon), ("ce", ce)):
            if len(pair) != 2 or min(pair) < 0:
                raise ConfigError(f"auxiliary option {key} must be two weights >= 0 (first "
                                  f"block, last block), got {pair}")
        _positive("hidden", hidden)
        self.recon, self.ce, self.hidden = tuple(recon), tuple(ce), hidden

    @override
    def build(self, model: Blocks, probe: Probe) -> list[Auxiliary]:
        last = max(len(probe.features) - 1, 1)
        nets: list[Auxiliary] = []
        for k, shape in enumerate(probe.features):
            r = k / last
            recon = self.recon[0] * (1 - r) + self.recon[1] * r
            ce = self.ce[0] * (1 - r) + self.ce[1] * r
            nets.append(_InfoProAux(self._classifier(shape, probe.n_outputs),
                                    self._decoder(shape, probe.input_shape), recon, ce))
        return nets

    def _classifier(self, shape: tuple[int, ...], n_outputs: int) -> nn.Module:
        mlp = [nn.Linear(shape[0], self.hidden), nn.ReLU(), nn.Linear(self.hidden, n_outputs)]
        if len(shape) == 1:
            return nn.Sequential(*mlp)
        dims = len(shape) - 1
        conv, norm = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d))[dims - 1]
        c = shape[0]
        return nn.Sequential(conv(c, c, 3, stride=2, padding=1, bias=False), norm(c), nn.ReLU(),
                             _pool(dims, [1] * dims), nn.Flatten(), *mlp)

    @staticmethod
    def _decoder(shape: tuple[int, ...], input_shape: tuple[int, ...]) -> nn.Module:
        if len(shape) == 1:
            return nn.Linear(shape[0], math.prod(input_shape))
        if len(input_shape) != len(shape):
            raise IncompatibleError(f"infopro's decoder maps {shape} features back to the input, "
                                    f"but the input is {input_shape}")
        return _Decoder(shape[0], input_shape)


def sample_following(n_blocks: int, index: int, depth: int, shrink: float) -> list[int]:
    """AugLocal's choice of blocks for block ``index``'s auxiliary network.

    The count falls linearly from ``depth`` (first block) to ``depth * (1 - shrink) + shrink``
    (last but one), at least 1, at most the blocks that follow; they are spread uniformly over
    the following blocks and always include the last. The last block gets none.
    """
    following = n_blocks - 1 - index
    if following <= 0:
        return []
    r = index * shrink / (n_blocks - 2) if n_blocks > 2 else 0.0
    count = max(1, round(depth * (1 - r) + r))
    if count >= following:
        return list(range(index + 1, n_blocks))
    return [round(index + following * i / count) for i in range(1, count + 1)]


def _fresh(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with new weights: re-initialised, or (for a sub-module without
    ``reset_parameters``) its own initial values shuffled along the first axis."""
    fresh = copy.deepcopy(module)
    for sub in fresh.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
            continue
        with torch.no_grad():
            for p in sub.parameters(recurse=False):
                p.copy_(p[torch.randperm(p.shape[0], device=p.device)] if p.dim() else p)
    return fresh


def _adapter(c_in: int, c_out: int, dims: int) -> nn.Module:
    if dims == 0:
        return nn.Linear(c_in, c_out)
    return (nn.Conv1d, nn.Conv2d)[dims - 1](c_in, c_out, 1)


class _AugLocalAux(Auxiliary):
    def __init__(self, net: nn.Module, sampled: list[int]) -> None:
        super().__init__(net)
        self.sampled = tuple(sampled)


class AugLocalNets(AuxBuilder):
    """AugLocal: fresh copies of uniformly sampled later blocks, then a pooled classifier.

    Args:
        depth: blocks sampled for the first block's auxiliary network (1, 3 or 5 in the paper).
        shrink: how much of ``depth - 1`` is shed by the last but one block (0.5 in the paper;
            0 keeps the depth constant).
    """

    name = "auglocal"

    def __init__(self, depth: int = 3, shrink: float = 0.5) -> None:
        _positive("depth", depth)
        _fraction("shrink", shrink)
        self.depth, self.shrink = depth, shrink

    @override
    def build(self, model: Blocks, probe: Probe) -> list[Auxiliary]:
        n = len(model.blocks)
        nets: list[Auxiliary] = []
        for k, shape in enumerate(probe.features):
            sampled = sample_following(n, k, self.depth, self.shrink)
            layers: list[nn.Module] = []
            current = shape
            for j in sampled:
                wanted = probe.features[j - 1]
                if wanted[0] != current[0]:
                    layers.append(_adapter(current[0], wanted[0], len(current) - 1))
                layers.append(_fresh(model.blocks[j]))
                current = probe.features[j]
            layers.append(classifier(current, probe.n_outputs))
            nets.append(_AugLocalAux(nn.Sequential(*layers), sampled))
        return nets


class _MomentumAux(Auxiliary):
    """``head(f(h; ema + b))``, ``f`` the source module's architecture.

    ``shifted`` (a copy of the source) holds ``ema + b`` as its trainable parameters and ``ema``
    is kept beside it, frozen, so the learnable biases are ``b = shifted - ema``: their gradient
    is ``shifted``'s, and the EMA update moves ``ema`` and ``shifted`` by the same amount, leaving
    ``b`` unchanged. No ``ema + b`` tensor is built per step.
    """

    def __init__(self, source: nn.Module, source_index: int | None, head: nn.Module,
                 momentum: float) -> None:
        super().__init__(head)
        self.shifted = copy.deepcopy(source).requires_grad_(True)
        self.names = list(_by_plain_name(source))
        self.ema = nn.ParameterList(nn.Parameter(p.detach().clone(), requires_grad=False)
                                    for p in _by_plain_name(source).values())
        self.source_index = source_index
        self.momentum = momentum

    @override
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(self.shifted(h))

    @override
    def after_step(self, model: Blocks) -> None:
        source = model.head if self.source_index is None else model.blocks[self.source_index]
        params, shifted = _by_plain_name(source), _by_plain_name(self.shifted)
        with torch.no_grad():
            for name, ema in zip(self.names, self.ema, strict=True):
                move = (params[name] - ema) * (1 - self.momentum)  # ema <- m ema + (1 - m) p
                ema.add_(move)
                shifted[name].add_(move)


def _by_plain_name(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, a parametrized one (e.g. a sparsity mask's) by its original's."""
    return {n.replace("parametrizations.", "").removesuffix(".original"): p
            for n, p in module.named_parameters()}


class MomentumNets(AuxBuilder):
    """MAN: an EMA copy of the next block (the head, for the last block) plus learnable biases.

    Args:
        momentum: EMA momentum ``m`` in ``ema <- m * ema + (1 - m) * theta`` (0.995 in the
            reference's CIFAR runs).
    """

    name = "man"

    def __init__(self, momentum: float = 0.995) -> None:
        _fraction("momentum", momentum, closed=False)
        self.momentum = momentum

    @override
    def build(self, model: Blocks, probe: Probe) -> list[Auxiliary]:
        n = len(model.blocks)
        nets: list[Auxiliary] = [
            _MomentumAux(model.blocks[k + 1], k + 1,
                         classifier(probe.features[k + 1], probe.n_outputs), self.momentum)
            for k in range(n - 1)]
        if n:
            nets.append(_MomentumAux(model.head, None, nn.Identity(), self.momentum))
        return nets


AUX_BUILDERS: dict[str, type[AuxBuilder]] = {
    b.name: b for b in (LinearHeads, InfoProNets, AugLocalNets, MomentumNets)}


def create_aux_builder(name: str, **options: Any) -> AuxBuilder:
    """The builder ``name`` with ``options``; `ConfigError` naming the valid choices otherwise."""
    if name not in AUX_BUILDERS:
        near = closest(name, AUX_BUILDERS)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown auxiliary network '{name}'{hint}; "
                          f"valid: {', '.join(sorted(AUX_BUILDERS))}")
    builder = AUX_BUILDERS[name]
    accepted = list(inspect.signature(builder).parameters)
    for key in options:
        if key not in accepted:
            raise ConfigError(f"auxiliary network '{name}' has no option '{key}'; "
                              f"accepted: {', '.join(accepted) or '(none)'}")
    return builder(**options)
