"""Orthogonal-polynomial KAN layers: Chebyshev, Legendre and Gram bases.

Paper: "Kolmogorov-Arnold Convolutions: Design Principles and Empirical Studies" (arXiv 2407.01092),
which studies these bases (its KACN, KALN and KAGN layers).

Implemented: each edge is ``sum_n c_n P_n(tanh(x))`` for ``n = 0..degree``, with ``P_n`` computed by
its three-term recurrence on ``(N, in)`` tensors and stacked once, plus the base branch.

Deviations from the paper's reference code: every basis squashes inputs with ``tanh`` (the Legendre
layer there rescales by the batch min/max, which makes an example's output depend on its batch);
the Gram basis is the classic discrete-orthogonal Gram polynomials on ``n_points`` equispaced
points (the reference replaces their recurrence constants by learnable weights and applies SiLU to
the basis); no norm layer is built in (the model adds one).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch

from nnarena.errors import ConfigError
from nnarena.layers.kan._base import KANLayer
from nnarena.layers.kan._register import register_kan

__all__ = ["ChebyshevKAN", "GramKAN", "LegendreKAN", "chebyshev", "gram", "legendre"]

_PAPER = "Kolmogorov-Arnold Convolutions: Design Principles and Empirical Studies"


def chebyshev(t: torch.Tensor, degree: int) -> torch.Tensor:
    """Chebyshev polynomials ``T_0..T_degree`` of ``t``: ``(...) -> (..., degree + 1)``."""
    polys = [torch.ones_like(t), t]
    two_t = 2 * t
    for _ in range(degree - 1):
        polys.append(two_t * polys[-1] - polys[-2])
    return torch.stack(polys[: degree + 1], dim=-1)


def legendre(t: torch.Tensor, degree: int) -> torch.Tensor:
    """Legendre polynomials ``P_0..P_degree`` of ``t``: ``(...) -> (..., degree + 1)``."""
    polys = [torch.ones_like(t), t]
    for n in range(1, degree):
        # (n + 1) P_{n+1} = (2n + 1) t P_n - n P_{n-1}
        polys.append(((2 * n + 1) / (n + 1)) * t * polys[-1] - (n / (n + 1)) * polys[-2])
    return torch.stack(polys[: degree + 1], dim=-1)


def gram(t: torch.Tensor, degree: int, n_points: int) -> torch.Tensor:
    """Gram polynomials ``G_0..G_degree`` of ``t``: ``(...) -> (..., degree + 1)``.

    They are orthogonal on the ``n_points`` points ``-1 + (2i + 1) / n_points``: ``sum_i G_j G_k =
    n_points * delta_jk``, so ``G_0 = 1`` and the values stay O(1) (scaled by ``sqrt(n_points)``
    from the orthonormal ones; as ``n_points`` grows they tend to ``sqrt(2n + 1) P_n``).
    """
    m = n_points
    # Orthonormal recurrence p_{n+1} = a_n t p_n - (a_n / a_{n-1}) p_{n-1}, with
    # a_n = m / (n + 1) * sqrt((4 (n + 1)^2 - 1) / (m^2 - (n + 1)^2)).
    alpha = [m / (n + 1) * math.sqrt((4 * (n + 1) ** 2 - 1) / (m * m - (n + 1) ** 2))
             for n in range(degree)]
    polys = [torch.ones_like(t)]
    if degree >= 1:
        polys.append(alpha[0] * t)
    for n in range(1, degree):
        polys.append(alpha[n] * t * polys[-1] - (alpha[n] / alpha[n - 1]) * polys[-2])
    return torch.stack(polys, dim=-1)


class _PolynomialKAN(KANLayer):
    """Shared body: ``basis(x) = [P_0(tanh x), ..., P_degree(tanh x)]``."""

    def __init__(self, in_features: int, out_features: int, degree: int, *,
                 base_activation: str | None, bias: bool) -> None:
        if degree < 0:
            raise ConfigError(f"polynomial KAN degree={degree} must be >= 0")
        super().__init__(in_features, out_features, degree + 1, base_activation=base_activation,
                         bias=bias)
        self.degree = degree

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        return self._polynomials(torch.tanh(x))

    @abstractmethod
    def _polynomials(self, t: torch.Tensor) -> torch.Tensor:
        """The polynomials of ``t`` in [-1, 1]: ``(N, in) -> (N, in, degree + 1)``."""

    def config(self) -> dict[str, Any]:
        return {**super().config(), "degree": self.degree}


@register_kan("kan-cheby", paper=_PAPER, summary="KAN with Chebyshev polynomials of tanh(x).")
class ChebyshevKAN(_PolynomialKAN):
    """KAN layer with Chebyshev polynomials ``T_0..T_degree`` of ``tanh(x)``.

    Args:
        in_features: input features.
        out_features: output features.
        degree: highest polynomial degree (``degree + 1`` coefficients per edge).
        base_activation: activation of the residual base branch; none by default, as in the
            paper's KACN layer.
        bias: add a learnable output bias.
    """

    def __init__(self, in_features: int, out_features: int, degree: int = 3, *,
                 base_activation: str | None = None, bias: bool = True) -> None:
        super().__init__(in_features, out_features, degree, base_activation=base_activation,
                         bias=bias)

    def _polynomials(self, t: torch.Tensor) -> torch.Tensor:
        return chebyshev(t, self.degree)


@register_kan("kan-legendre", paper=_PAPER, summary="KAN with Legendre polynomials of tanh(x).")
class LegendreKAN(_PolynomialKAN):
    """KAN layer with Legendre polynomials ``P_0..P_degree`` of ``tanh(x)``.

    Args:
        in_features: input features.
        out_features: output features.
        degree: highest polynomial degree (``degree + 1`` coefficients per edge).
        base_activation: activation of the residual base branch (``None``: none).
        bias: add a learnable output bias.
    """

    def __init__(self, in_features: int, out_features: int, degree: int = 3, *,
                 base_activation: str | None = "silu", bias: bool = True) -> None:
        super().__init__(in_features, out_features, degree, base_activation=base_activation,
                         bias=bias)

    def _polynomials(self, t: torch.Tensor) -> torch.Tensor:
        return legendre(t, self.degree)


@register_kan("kan-gram", paper=_PAPER,
              summary="KAN with discrete-orthogonal Gram polynomials of tanh(x).")
class GramKAN(_PolynomialKAN):
    """KAN layer with Gram polynomials ``G_0..G_degree`` of ``tanh(x)`` (see `gram`).

    Args:
        in_features: input features.
        out_features: output features.
        degree: highest polynomial degree (``degree + 1`` coefficients per edge).
        n_points: equispaced points of [-1, 1] the polynomials are orthogonal on (more than
            ``degree``); ``None``: ``2 * (degree + 1)``.
        base_activation: activation of the residual base branch (``None``: none).
        bias: add a learnable output bias.
    """

    def __init__(self, in_features: int, out_features: int, degree: int = 3, *,
                 n_points: int | None = None, base_activation: str | None = "silu",
                 bias: bool = True) -> None:
        n_points = 2 * (degree + 1) if n_points is None else n_points
        if n_points <= degree:
            raise ConfigError(f"kan-gram n_points={n_points} must exceed degree={degree}")
        super().__init__(in_features, out_features, degree, base_activation=base_activation,
                         bias=bias)
        self.n_points = n_points

    def _polynomials(self, t: torch.Tensor) -> torch.Tensor:
        return gram(t, self.degree, self.n_points)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_points": self.n_points}
