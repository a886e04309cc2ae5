"""KAN convolutions (1-D and 2-D) for every basis, as in "Kolmogorov-Arnold Convolutions: Design
Principles and Empirical Studies" (arXiv 2407.01092) and "Convolutional Kolmogorov-Arnold
Networks" (arXiv 2406.13155).

A KAN conv applies a learnable function to every (input channel, kernel position) -> output
channel edge of each patch: ``unfold -> basis -> GEMM``. Because the basis acts on each input value
on its own, ``basis(unfold(x)) == unfold(basis(x))``: the basis is computed once per pixel (not
once per pixel per kernel position) and the GEMM is a regular convolution over ``C * n_basis``
basis channels. Border patches must see ``B(0)``, the basis of the zero padding, as the unfold form
does; rather than evaluate the basis on the padded image, the convolution zero-pads
``B(x) - B(0)`` and adds the constant image's response ``sum W B(0)`` to the bias (exact, and 10%
faster at 32 x 32 with padding 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nnarena.layers.kan._base import KANLayer

__all__ = ["KANConv"]

_CONV = {1: F.conv1d, 2: F.conv2d}


class KANConv(nn.Module):
    """Convolution whose edges are KAN functions of basis ``layer_cls``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square (or 1-D) kernel size.
        layer_cls: the `KANLayer` subclass giving the basis (and its per-channel state).
        dim: 1 or 2 spatial dims.
        stride: convolution stride.
        padding: zero padding on each side.
        **layer_kwargs: basis settings for ``layer_cls`` (e.g. ``grid_size``).
    """

    nonlinear = True
    sparse_params = ("weight", "base_weight")  # the tensors sparsity masks apply to

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 layer_cls: type[KANLayer], dim: int = 2, stride: int = 1, padding: int = 0,
                 **layer_kwargs) -> None:
        super().__init__()
        self.dim, self.stride, self.padding = dim, stride, padding
        self.kernel_size = kernel_size
        # The basis' per-channel state only: an edge-less layer (out_features=0, no bias).
        self.kan = layer_cls(in_channels, 0, **{**layer_kwargs, "bias": False})
        nb = self.kan.n_basis
        kernel = (kernel_size,) * dim
        fan_in = in_channels * kernel_size ** dim
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels * nb, *kernel)
                                   / math.sqrt(fan_in * nb))
        self.base_weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel)) \
            if self.kan.base_act is not None else None
        if self.base_weight is not None:
            nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
            # The base activation is fixed: padding needs a shift only where it is nonzero at 0.
            self.base_shifted = bool(self.kan.base_act(torch.zeros(1)).abs().item() > 0)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_channels = x.shape[1]
        channels_last = x.movedim(1, -1)  # (B, *spatial, C)
        phi = self.kan.basis(channels_last.reshape(-1, n_channels))  # (N, C, nb)
        phi = phi.reshape(*channels_last.shape[:-1], -1).movedim(-1, 1)  # (B, C*nb, *spatial)
        out = self._conv(phi, self.kan.basis(x.new_zeros(1, n_channels)).reshape(-1),
                         self.weight, self.bias)
        if self.base_weight is not None:
            at_zero = self.kan.base_act(x.new_zeros(n_channels)) if self.base_shifted else None
            out = out + self._conv(self.kan.base_act(x), at_zero, self.base_weight)
        return out

    def _conv(self, features: torch.Tensor, at_zero: torch.Tensor | None, weight: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve ``features`` (of ``x``) as if ``x`` had been zero-padded first."""
        if self.padding and at_zero is not None:
            features = features - at_zero.view(-1, *(1,) * self.dim)
            shift = (weight.flatten(2).sum(2) * at_zero).sum(1)
            bias = shift if bias is None else bias + shift
        return _CONV[self.dim](features, weight, bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, dim={self.dim}, stride={self.stride}, "
                f"padding={self.padding}")
