"""`BlackBox`: a simulated physical layer that can be measured but not differentiated.

Stands in for the physical nonlinear systems of "Backpropagation-free Training of Deep Physical
Neural Networks" (Momeni et al., arXiv:2304.11042): a fixed random projection followed by a
saturating nonlinearity, ``tanh(gain * (P x + b))``, with optional Gaussian measurement noise on
its output. The transform is fixed (buffers, saved with the model, never trained) and opaque:
autograd may run forward through it, but its backward raises `BlackBoxGradientError`, so a rule
that would need a gradient of the physical system fails loudly instead of silently cheating.
Models holding one are trainable only by rules with ``capabilities.supports_black_box``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nnarena.errors import NNArenaError

__all__ = ["BlackBox", "BlackBoxGradientError"]


class BlackBoxGradientError(NNArenaError, RuntimeError):
    """Something asked for a gradient through a `BlackBox`."""


class BlackBox(nn.Module):
    """A fixed nonlinear "physical" map ``in_features -> out_features``, queried forward only.

    Args:
        in_features: size of the input (the drive of the physical system).
        out_features: number of measured outputs.
        noise_std: standard deviation of Gaussian noise added to every measurement (training and
            evaluation alike: the noise is physical).
        gain: scale of the projection and its offset; larger values saturate the nonlinearity
            more.
    """

    def __init__(self, in_features: int, out_features: int, noise_std: float = 0.0,
                 gain: float = 1.0) -> None:
        super().__init__()
        if noise_std < 0:
            raise ValueError(f"BlackBox noise_std must be >= 0, got {noise_std}")
        self.in_features, self.out_features = in_features, out_features
        self.noise_std = noise_std
        self.register_buffer(
            "projection", torch.randn(out_features, in_features) * (gain / math.sqrt(in_features)))
        self.register_buffer("offset", (torch.rand(out_features) * 2 - 1) * gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Measure.apply(x, self)

    def measure(self, x: torch.Tensor) -> torch.Tensor:
        """One measurement of the physical output (no autograd graph)."""
        with torch.no_grad():
            out = torch.tanh(torch.nn.functional.linear(x, self.projection, self.offset))
            if self.noise_std:
                out = out + self.noise_std * torch.randn_like(out)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"noise_std={self.noise_std}")


class _Measure(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, box: BlackBox) -> torch.Tensor:
        return box.measure(x)

    @staticmethod
    def backward(ctx: Any, _grad: torch.Tensor) -> tuple[None, None]:
        raise BlackBoxGradientError(
            "no gradient through a BlackBox (a physical layer is only measured forward); "
            "train this model with a black-box capable rule such as 'ff-model-free'")
