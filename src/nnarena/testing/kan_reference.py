"""Reference B-spline KAN from "KAN: Kolmogorov-Arnold Networks" (arXiv 2404.19756).

`cox_de_boor` is the textbook recursive B-spline basis, written as plainly as possible so tests can
trust it; `CoxDeBoorKAN` is the straightforward "basis, then one GEMM" layer built on it, with the
same parameters as `nnarena.layers.kan.bspline.KANLinear`. Both are references for tests and
benchmarks, not for training: autograd differentiates through every step of the recursion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CoxDeBoorKAN", "cox_de_boor"]


def cox_de_boor(x: torch.Tensor, grid: torch.Tensor, k: int) -> torch.Tensor:
    """B-splines of order ``k`` on per-feature knots, by the Cox-de Boor recursion.

    Args:
        x: inputs ``(..., in)``.
        grid: increasing knots ``(in, M)``.
        k: spline order (degree).

    Returns:
        ``(..., in, M - k - 1)``; zero outside ``[grid[:, 0], grid[:, -1])``.
    """
    x = x.unsqueeze(-1)
    basis = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)  # degree 0: half-open intervals
    for d in range(1, k + 1):
        left = (x - grid[:, :-(d + 1)]) / (grid[:, d:-1] - grid[:, :-(d + 1)])
        right = (grid[:, d + 1:] - x) / (grid[:, d + 1:] - grid[:, 1:-d])
        basis = left * basis[..., :-1] + right * basis[..., 1:]
    return basis


class CoxDeBoorKAN(nn.Module):
    """``y = coef . cox_de_boor(x) + base_weight @ silu(x) + bias`` on a uniform extended grid.

    Args:
        in_features: input features.
        out_features: output features.
        grid_size: intervals ``G`` on ``grid_range``.
        spline_order: spline order ``k``; ``G + k`` coefficients per edge.
        grid_range: the range the ``G`` intervals cover; ``k`` more knots extend it on each side.
    """

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5,
                 spline_order: int = 3, grid_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        self.spline_order = spline_order
        lo, hi = grid_range
        h = (hi - lo) / grid_size
        knots = lo + h * torch.arange(-spline_order, grid_size + spline_order + 1,
                                      dtype=torch.float64)
        self.register_buffer("grid", knots.float().expand(in_features, -1).contiguous())
        n_basis = grid_size + spline_order
        self.coef = nn.Parameter(torch.randn(out_features, in_features, n_basis)
                                 / math.sqrt(in_features * n_basis))
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        basis = cox_de_boor(x, self.grid, self.spline_order).flatten(-2)
        out = F.linear(basis, self.coef.flatten(1), self.bias)
        return out + F.linear(F.silu(x), self.base_weight)
