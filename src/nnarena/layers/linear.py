"""The dense affine layer and its convolution: the baseline every other layer is compared with."""

from __future__ import annotations

from torch import nn

from nnarena.registry import register

__all__ = ["conv", "linear"]


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    dim: int = 2,
    stride: int = 1,
    padding: int = 0,
    bias: bool = True,
) -> nn.Module:
    """``nn.Conv1d`` or ``nn.Conv2d``."""
    cls = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
    return cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)


@register("layer", "linear", summary="Dense affine layer (nn.Linear); conv form nn.ConvNd.",
          capabilities={"nonlinear": False, "conv": True}, conv=conv)
def linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """``nn.Linear``."""
    return nn.Linear(in_features, out_features, bias=bias)
