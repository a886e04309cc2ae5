"""Cauchy-activation KAN layer (XNet's Cauchy kernels as a KAN basis).

Paper: "Model Comparisons: XNet Outperforms KAN" (arXiv 2410.02033).

XNet's Cauchy activation is ``phi(x) = (lambda1 x + lambda2) / (x^2 + d^2)`` with trainable
``lambda1``, ``lambda2`` and ``d``, applied to ``w . x + b`` in a (mostly one-hidden-layer)
network. Implemented here as a KAN basis: per input ``i`` and centre ``c_b``, the pair

    ``1 / (1 + u^2)`` and ``u / (1 + u^2)``, with ``u = (x_i - c_b) / d_ib``,

whose per-edge coefficients play ``lambda2`` and ``lambda1``, with a learnable width ``d_ib > 0``
per (input, centre). The pair is XNet's ``1 / ((x - c)^2 + d^2)`` and ``(x - c) / ((x - c)^2 +
d^2)`` times ``d^2`` and ``d``: the same functions up to per-(input, centre) constants, scaled so
they peak at 1 and 1/2 whatever ``d``.

Deviations: XNet feeds linear combinations of the inputs to its Cauchy units and reads them out
linearly; as a KAN, every edge gets its own Cauchy kernels on fixed centres (evenly spaced over
``grid_range``, widths starting at their spacing) instead. No base branch by default, as in XNet.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nnarena.errors import ConfigError
from nnarena.layers.kan._base import KANLayer
from nnarena.layers.kan._register import register_kan

__all__ = ["CauchyKAN", "cauchy_pair"]


def cauchy_pair(u: torch.Tensor) -> torch.Tensor:
    """``[1 / (1 + u^2), u / (1 + u^2)]`` interleaved per centre: ``(..., nc) -> (..., 2 nc)``."""
    even = torch.reciprocal(1 + u * u)
    return torch.stack([even, u * even], dim=-1).flatten(-2)


@register_kan("kan-cauchy", paper="Model Comparisons: XNet Outperforms KAN",
              summary="KAN with XNet's Cauchy kernels (two per centre, learnable widths).")
class CauchyKAN(KANLayer):
    """KAN layer with Cauchy kernel pairs on ``n_centers`` centres per input.

    Args:
        in_features: input features.
        out_features: output features.
        n_centers: centres per input (``2 * n_centers`` coefficients per edge).
        grid_range: ``(low, high)`` span of the centres.
        base_activation: activation of the residual base branch (``None``: none, as in XNet).
        bias: add a learnable output bias.
    """

    def __init__(self, in_features: int, out_features: int, n_centers: int = 4, *,
                 grid_range: tuple[float, float] = (-2.0, 2.0),
                 base_activation: str | None = None, bias: bool = True) -> None:
        if n_centers < 1:
            raise ConfigError(f"kan-cauchy n_centers={n_centers} must be >= 1")
        low, high = grid_range
        if not high > low:
            raise ConfigError(f"kan-cauchy grid_range={grid_range} must be increasing")
        super().__init__(in_features, out_features, 2 * n_centers,
                         base_activation=base_activation, bias=bias)
        self.n_centers, self.grid_range = n_centers, (float(low), float(high))
        centers = torch.linspace(low, high, n_centers) if n_centers > 1 \
            else torch.tensor([(low + high) / 2])
        self.register_buffer("centers", centers, persistent=False)
        spacing = (high - low) / max(n_centers - 1, 1)
        # Widths are stored as logarithms so they stay positive.
        self.log_width = nn.Parameter(torch.full((in_features, n_centers), math.log(spacing)))

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        u = (x.unsqueeze(-1) - self.centers.to(x.dtype)) * torch.exp(-self.log_width)
        return cauchy_pair(u)

    def _copy_input_state(self, small: KANLayer, keep_inputs: torch.Tensor) -> None:
        small.log_width.copy_(self.log_width[keep_inputs])

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_centers": self.n_centers, "grid_range": self.grid_range}
