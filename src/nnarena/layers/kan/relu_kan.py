"""ReLU-KAN layer: squared products of ReLUs as a B-spline-like bump basis.

Paper: "Kolmogorov-Arnold Convolutions: Design Principles and Empirical Studies" (arXiv 2407.01092),
which studies ReLU-KAN convolutions; the basis is ReLU-KAN's ("ReLU-KAN: New Kolmogorov-Arnold
Networks that Only Need Matrix Addition, Dot Multiplication, and ReLU", arXiv 2406.02075).

Implemented: ``R_i(x) = r * (ReLU(e_i - x) * ReLU(x - s_i))^2`` for ``i < grid_size + order``,
with ``s_i = low + (i - order) w`` and ``e_i = s_i + (order + 1) w`` (``w`` the grid step), and
``r = 16 / ((order + 1) w)^4`` so every bump peaks at 1. Since ``s_i < e_i``, the product of the two
ReLUs equals ``ReLU((x - s_i)(e_i - x))``, which is what we evaluate (in one fused autograd
function): ``ReLU(1 - u^2)^2`` with ``u`` the position relative to the bump's centre and
half-width.

Deviations: the paper's inputs live in [0, 1]; here ``grid_range`` sets the span (default
[-1, 1]). An optional base branch is available but off by default, as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch

from nnarena.errors import ConfigError
from nnarena.layers.kan._base import KANLayer
from nnarena.layers.kan._register import register_kan

__all__ = ["ReLUKAN", "relu_bumps"]


class _ReLUBumps(torch.autograd.Function):
    """``ReLU(1 - u^2)^2`` with ``u = (x - c) * k``, computed in place with a closed-form backward
    (about half the memory traffic of autograd over the elementwise chain)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, centers: torch.Tensor, k: float) -> torch.Tensor:
        u = torch.sub(x.unsqueeze(-1), centers).mul_(k)
        hump = u.square().neg_().add_(1).clamp_(min=0)
        ctx.save_for_backward(u, hump)
        ctx.k = k
        return hump.square()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        u, hump = ctx.saved_tensors
        # d/dx ReLU(1 - u^2)^2 = 2 ReLU(1 - u^2) * (-2 u) * k
        return (grad * hump).mul_(u).sum(-1).mul_(-4.0 * ctx.k), None, None


def relu_bumps(x: torch.Tensor, centers: torch.Tensor, inv_half_width: float) -> torch.Tensor:
    """``ReLU(1 - ((x - c_i) * inv_half_width)^2)^2``: ``(...) -> (..., len(centers))``."""
    return _ReLUBumps.apply(x, centers, inv_half_width)


@register_kan("kan-relu", paper="Kolmogorov-Arnold Convolutions: Design Principles and Empirical "
              "Studies", summary="ReLU-KAN: normalised squared-ReLU bumps on a grid.")
class ReLUKAN(KANLayer):
    """KAN layer with ReLU-KAN's bump basis (``grid_size + order`` bumps per input).

    Args:
        in_features: input features.
        out_features: output features.
        grid_size: grid intervals over ``grid_range``.
        order: bump order ``k`` (each bump spans ``k + 1`` intervals).
        grid_range: ``(low, high)`` span of the grid.
        base_activation: activation of the residual base branch (``None``: none, as in ReLU-KAN).
        bias: add a learnable output bias.
    """

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, order: int = 3, *,
                 grid_range: tuple[float, float] = (-1.0, 1.0),
                 base_activation: str | None = None, bias: bool = True) -> None:
        if grid_size < 1 or order < 0:
            raise ConfigError(f"kan-relu needs grid_size >= 1 and order >= 0, got "
                              f"grid_size={grid_size}, order={order}")
        low, high = grid_range
        if not high > low:
            raise ConfigError(f"kan-relu grid_range={grid_range} must be increasing")
        super().__init__(in_features, out_features, grid_size + order,
                         base_activation=base_activation, bias=bias)
        self.grid_size, self.order, self.grid_range = grid_size, order, (float(low), float(high))
        step = (high - low) / grid_size
        starts = low + (torch.arange(grid_size + order, dtype=torch.float64) - order) * step
        half_width = (order + 1) * step / 2
        self.register_buffer("centers", (starts + half_width).float(), persistent=False)
        self.inv_half_width = 1.0 / half_width

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        return relu_bumps(x, self.centers.to(x.dtype), self.inv_half_width)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "grid_size": self.grid_size, "order": self.order,
                "grid_range": self.grid_range}
