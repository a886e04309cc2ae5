"""Rational KAN layers: per-edge rational functions and KAT's group-rational KAN (GR-KAN).

Paper: "Kolmogorov-Arnold Transformer" (arXiv 2409.10594).

Implemented:

* ``kan-gr`` (GR-KAN): input channels are split into ``groups``; group ``g`` has one safe Padé
  rational ``R_g(x) = P_g(x) / (1 + |Q_g(x)|)`` (``P`` of degree ``num_degree``, ``Q`` of degree
  ``den_degree`` without constant term, 5/4 by default as in KAT), and the layer is
  ``y = W R(x) + b``. Through the basis path this is ``n_basis = 1`` with basis
  ``R_g(i)(x_i)`` and ``coef = W``. Variance-preserving init: the rationals start as a
  least-squares fit of ``init`` (GELU, SiLU or identity) and ``W ~ N(0, Var[x] / (in *
  E[R(x)^2]))`` for ``x ~ N(0, 1)``, so ``Var[y] = Var[x]`` at init.
* ``kan-rational``: every edge is a rational ``P_oi(x) / (1 + |Q_i(x)|)``: per-edge numerators
  (the layer's coefficients on the basis ``x^j / (1 + |Q_i(x)|)``, ``j = 0..num_degree``) over a
  learnable denominator per input, so the layer stays one GEMM.

Deviations: KAT fits its initial rationals offline and ships a CUDA kernel; here the fit is a
linearised least squares (``P - f Q = f`` on [-5, 5], cached) and evaluation is Horner's rule in
PyTorch. KAT's layer order is rational-then-linear, which is what ``kan-gr`` computes; a model's
first GR-KAN then sees raw inputs (KAT initialises that one to the identity: pass
``init="identity"``). ``kan-rational``'s per-edge numerators are our extension (KAT shares
whole rationals per group); it forms the powers ``x^j`` explicitly, so at degree 7 float32 inputs
beyond ~1e5 overflow (normalised activations are far below that).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnarena.errors import ConfigError
from nnarena.layers.kan._base import KANLayer
from nnarena.layers.kan._register import register_kan

__all__ = ["GroupRationalKAN", "RationalKAN", "fit_rational", "powers", "rational",
           "safe_denominator"]

_PAPER = "Kolmogorov-Arnold Transformer"
Init = Literal["gelu", "silu", "identity"]
_TARGETS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "silu": F.silu, "identity": lambda x: x}
# Wide enough that the fit (numerator one degree above the denominator, so it grows linearly)
# stays close to the target well outside the +-3 of normalised activations.
_FIT_RANGE = 5.0


def _horner(x: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
    """``sum_j coefs[..., j] x^j`` by Horner's rule; ``coefs`` broadcasts against ``x``'s shape."""
    out = coefs[..., -1].expand_as(x)
    for j in range(coefs.shape[-1] - 2, -1, -1):
        out = torch.addcmul(coefs[..., j], out, x)
    return out


def safe_denominator(x: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """KAT's safe denominator ``1 + |b_1 x + ... + b_n x^n|`` (``den`` holds ``b_1..b_n``)."""
    return 1 + (_horner(x, den) * x).abs()


def rational(x: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``P(x) / (1 + |Q(x)|)``; ``num`` holds ``a_0..a_m``, ``den`` holds ``b_1..b_n``."""
    return _horner(x, num) / safe_denominator(x, den)


def powers(x: torch.Tensor, degree: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * [1, x, ..., x^degree]`` (``scale`` broadcasts against ``x``; default 1):
    ``(...) -> (..., degree + 1)``.

    Scaling the ``(...)``-shaped terms before the one ``stack`` keeps every op but that one off the
    ``degree + 1`` times larger result.
    """
    out = [torch.ones_like(x) if scale is None else scale.expand_as(x)]
    for _ in range(degree):
        out.append(out[-1] * x)
    return torch.stack(out, dim=-1)


@functools.cache
def fit_rational(init: str, num_degree: int, den_degree: int
                 ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Coefficients ``(a_0..a_m, b_1..b_n)`` of a rational fitted to ``init`` on [-5, 5].

    Solves the linearised problem ``P(x) - f(x) Q(x) = f(x)`` by minimum-norm least squares (which
    gives the exact answer for the identity). It equals the fit of ``P / (1 + |Q|)`` wherever
    ``Q >= 0``, which holds on the fitting range for GELU and SiLU at the usual degrees.
    """
    x = torch.linspace(-_FIT_RANGE, _FIT_RANGE, 1001, dtype=torch.float64)
    f = _TARGETS[init](x)
    system = torch.cat([powers(x, num_degree), -f[:, None] * powers(x, den_degree)[:, 1:]], 1)
    sol = torch.linalg.lstsq(system, f[:, None], driver="gelsd").solution[:, 0]
    return tuple(sol[: num_degree + 1].tolist()), tuple(sol[num_degree + 1:].tolist())


def _second_moment(num: torch.Tensor, den: torch.Tensor) -> float:
    """``E[R(x)^2]`` for ``x ~ N(0, 1)``, by 64-point Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    values = rational(torch.from_numpy(nodes), num.double(), den.double())
    return float((torch.from_numpy(weights) * values.square()).sum()) / math.sqrt(2 * math.pi)


def _check_degrees(name: str, num_degree: int, den_degree: int) -> None:
    if num_degree < 0 or den_degree < 1:
        raise ConfigError(f"{name} needs num_degree >= 0 and den_degree >= 1, got "
                          f"{num_degree}/{den_degree}")


@register_kan("kan-gr", paper=_PAPER, summary="Group-rational KAN (KAT's GR-KAN): one safe Padé "
              "rational per channel group, then a linear map.")
class GroupRationalKAN(KANLayer):
    """GR-KAN layer: ``y = W R(x) + b`` with one rational per group of input channels.

    Args:
        in_features: input features.
        out_features: output features.
        num_degree: numerator degree ``m``.
        den_degree: denominator degree ``n``.
        groups: channel groups sharing a rational (inputs are split into contiguous, near-equal
            groups; any ``in_features`` works).
        init: function the rationals start as (``gelu``, ``silu`` or ``identity``).
        base_activation: activation of a residual base branch (``None``: none, as in KAT).
        bias: add a learnable output bias.
    """

    def __init__(self, in_features: int, out_features: int, num_degree: int = 5,
                 den_degree: int = 4, *, groups: int = 8, init: Init = "gelu",
                 base_activation: str | None = None, bias: bool = True) -> None:
        _check_degrees("kan-gr", num_degree, den_degree)
        if groups < 1:
            raise ConfigError(f"kan-gr groups={groups} must be >= 1")
        if init not in _TARGETS:
            raise ConfigError(f"kan-gr init='{init}' is unknown; valid: {', '.join(_TARGETS)}")
        num, den = (torch.tensor(c) for c in fit_rational(init, num_degree, den_degree))
        super().__init__(in_features, out_features, 1, base_activation=base_activation,
                         bias=bias, coef_std=1 / math.sqrt(_second_moment(num, den)))
        self.num_degree, self.den_degree, self.groups, self.init = \
            num_degree, den_degree, groups, init
        self.numerator = nn.Parameter(num.float().repeat(groups, 1))
        self.denominator = nn.Parameter(den.float().repeat(groups, 1))
        self.register_buffer("group_index", torch.arange(in_features) * groups // max(
            in_features, 1))

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        num, den = self.numerator[self.group_index], self.denominator[self.group_index]
        return rational(x, num, den).unsqueeze(-1)

    def _copy_input_state(self, small: KANLayer, keep_inputs: torch.Tensor) -> None:
        small.numerator.copy_(self.numerator)
        small.denominator.copy_(self.denominator)
        small.group_index.copy_(self.group_index[keep_inputs])

    def config(self) -> dict[str, Any]:
        return {**super().config(), "num_degree": self.num_degree,
                "den_degree": self.den_degree, "groups": self.groups, "init": self.init}


@register_kan("kan-rational", paper=_PAPER, summary="KAN whose edges are safe Padé rationals "
              "P_oi(x) / (1 + |Q_i(x)|) (per-edge numerator, per-input denominator).")
class RationalKAN(KANLayer):
    """KAN layer with rational edges ``P_oi(x) / (1 + |Q_i(x)|)``.

    The basis is ``x^j / (1 + |Q_i(x)|)``, ``j = 0..num_degree``; each input's denominator starts
    as ``1 + |x|^den_degree``, which keeps every basis function bounded by ``1 + |x|`` when
    ``num_degree <= den_degree + 1``.

    Args:
        in_features: input features.
        out_features: output features.
        num_degree: numerator degree (``num_degree + 1`` coefficients per edge).
        den_degree: denominator degree; ``None``: ``max(num_degree - 1, 1)``, so edges grow at
            most linearly.
        base_activation: activation of the residual base branch (``None``: none).
        bias: add a learnable output bias.
    """

    def __init__(self, in_features: int, out_features: int, num_degree: int = 5,
                 den_degree: int | None = None, *, base_activation: str | None = None,
                 bias: bool = True) -> None:
        den_degree = max(num_degree - 1, 1) if den_degree is None else den_degree
        _check_degrees("kan-rational", num_degree, den_degree)
        super().__init__(in_features, out_features, num_degree + 1,
                         base_activation=base_activation, bias=bias)
        self.num_degree, self.den_degree = num_degree, den_degree
        den = torch.zeros(in_features, den_degree)
        den[:, -1] = 1.0
        self.denominator = nn.Parameter(den)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        return powers(x, self.num_degree, torch.reciprocal(safe_denominator(x, self.denominator)))

    def _copy_input_state(self, small: KANLayer, keep_inputs: torch.Tensor) -> None:
        small.denominator.copy_(self.denominator[keep_inputs])

    def config(self) -> dict[str, Any]:
        return {**super().config(), "num_degree": self.num_degree, "den_degree": self.den_degree}
