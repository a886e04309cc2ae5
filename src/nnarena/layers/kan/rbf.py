"""Gaussian radial-basis KAN layer (FastKAN-style).

Paper: "Kolmogorov-Arnold Convolutions: Design Principles and Empirical Studies" (arXiv 2407.01092),
which studies RBF bases for KAN convolutions; the basis is FastKAN's ("Kolmogorov-Arnold Networks
are Radial Basis Function Networks", arXiv 2405.06721), which approximates the KAN paper's cubic
B-splines.

Implemented: ``B_b(x) = exp(-((x - c_b) / h)^2)`` on ``n_centers`` fixed, evenly spaced centres
``c_b`` over ``grid_range`` with ``h`` the centre spacing, plus the base branch.

Deviations: FastKAN puts a LayerNorm before the basis; normalisation is the model's job here. The
Gaussian is cut to exactly 0 once the exponent reaches 20 (see `gaussian`), so inputs far from
every centre give zeros, never subnormal numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nnarena.errors import ConfigError
from nnarena.layers.kan._base import KANLayer
from nnarena.layers.kan._register import register_kan

__all__ = ["GAUSSIAN_CUTOFF", "RBFKAN", "gaussian", "gaussian_rbf"]

# exp(-20) ~ 2e-9 is below float32 resolution next to the peak value 1, so cutting the Gaussian
# there changes no sum of basis values; it keeps values far above the subnormal range (< 1.2e-38),
# where CPU GEMMs on them run 10-30x slower.
GAUSSIAN_CUTOFF = 20.0
_FLOOR = math.exp(-GAUSSIAN_CUTOFF)


def gaussian(sq: torch.Tensor) -> torch.Tensor:
    """``exp(-sq)`` for ``sq >= 0``, shifted down by ``exp(-20)`` and clipped at 0.

    Continuous, exactly 0 for ``sq >= 20``, and never subnormal: the shift is ~2e-9, and the
    smallest non-zero value is one float32 step above it.
    """
    return torch.relu(torch.exp(-sq.clamp(max=GAUSSIAN_CUTOFF)) - _FLOOR)


class _GaussianRBF(torch.autograd.Function):
    """`gaussian` of ``((x - c) * inv_h)^2`` with a fused, memory-light backward.

    Forward runs in place on one ``(N, in, n_basis)`` buffer, and backward rebuilds ``x - c``
    rather than saving it, so the basis costs about a third of the autograd version's memory
    traffic (which matters most when the number of centres grows).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, centers: torch.Tensor, inv_h: float) -> torch.Tensor:
        t = torch.sub(x.unsqueeze(-1), centers).mul_(inv_h)
        phi = t.square_().clamp_(max=GAUSSIAN_CUTOFF).neg_().exp_().sub_(_FLOOR).clamp_(min=0)
        ctx.save_for_backward(x, centers, phi)
        ctx.inv_h = inv_h
        return phi

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        x, centers, phi = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # d/dx exp(-((x - c) h')^2) = -2 h'^2 (x - c) exp(...); where the cut is active phi = 0,
        # so the gradient is 0 there too. Using phi for exp(...) drops a 2e-9 shift (see gaussian).
        diff = torch.sub(x.unsqueeze(-1), centers)
        grad_x = (grad * phi).mul_(diff).sum(-1).mul_(-2.0 * ctx.inv_h ** 2)
        return grad_x, None, None


def gaussian_rbf(x: torch.Tensor, centers: torch.Tensor, inv_h: float) -> torch.Tensor:
    """Gaussians ``exp(-((x - c_b) * inv_h)^2)``, cut at exponent 20: ``(...) -> (..., nb)``."""
    return _GaussianRBF.apply(x, centers, inv_h)


@register_kan("kan-rbf", paper="Kolmogorov-Arnold Convolutions: Design Principles and Empirical "
              "Studies", summary="KAN with Gaussian radial basis functions on a fixed grid "
              "(FastKAN).")
class RBFKAN(KANLayer):
    """KAN layer with Gaussian radial basis functions on a fixed grid of centres.

    Args:
        in_features: input features.
        out_features: output features.
        n_centers: Gaussian centres per input (coefficients per edge).
        grid_range: ``(low, high)`` span of the centres.
        base_activation: activation of the residual base branch (``None``: none).
        bias: add a learnable output bias.
    """

    def __init__(self, in_features: int, out_features: int, n_centers: int = 8, *,
                 grid_range: tuple[float, float] = (-2.0, 2.0),
                 base_activation: str | None = "silu", bias: bool = True) -> None:
        if n_centers < 2:
            raise ConfigError(f"kan-rbf n_centers={n_centers} must be at least 2")
        low, high = grid_range
        if not high > low:
            raise ConfigError(f"kan-rbf grid_range={grid_range} must be increasing")
        super().__init__(in_features, out_features, n_centers, base_activation=base_activation,
                         bias=bias)
        self.grid_range = (float(low), float(high))
        self.register_buffer("centers", torch.linspace(low, high, n_centers), persistent=False)
        self.inv_h = (n_centers - 1) / (high - low)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_rbf(x, self.centers.to(x.dtype), self.inv_h)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_centers": self.n_basis, "grid_range": self.grid_range}
