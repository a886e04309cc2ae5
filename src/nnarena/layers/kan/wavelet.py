"""Wavelet KAN layer with learnable per-input scales and translations (Wav-KAN-style).

Paper: "Kolmogorov-Arnold Convolutions: Design Principles and Empirical Studies" (arXiv 2407.01092),
which studies wavelet bases for KAN convolutions; the layer follows Wav-KAN ("Wav-KAN: Wavelet
Kolmogorov-Arnold Networks", arXiv 2405.12832).

Implemented: ``B_ib(x) = psi((x_i - t_ib) / s_ib)`` with the Mexican-hat wavelet
``psi(u) = (1 - u^2) exp(-u^2 / 2)``, learnable translation ``t`` and scale ``s > 0`` per (input,
wavelet), and per-edge weights as the layer's coefficients, plus the base branch. The basis has a
fused autograd function (one in-place buffer forward, closed-form backward), about twice as fast
as plain autograd.

Deviations: Wav-KAN gives every edge ``(o, i)`` its own scale and translation, which needs an
``(N, out, in)`` tensor per batch; here they are per (input, wavelet), so the basis stays
``(N, in, n_wavelets)`` and the layer is one GEMM, with the wavelets of each input spread over
``grid_range`` at init (Wav-KAN's identical init would make them all equal). Scales are stored as
logarithms so they stay positive. The Gaussian factor is cut at exponent 20 like
`nnarena.layers.kan.rbf.gaussian`, so far-away inputs give exact zeros, not subnormals. The
wavelet's normalising constant is left to the coefficients; Wav-KAN's other mother wavelets are
not provided.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nnarena.errors import ConfigError
from nnarena.layers.kan._base import KANLayer
from nnarena.layers.kan._register import register_kan
from nnarena.layers.kan.rbf import GAUSSIAN_CUTOFF, gaussian

__all__ = ["WaveletKAN", "mexican_hat", "mexican_hat_basis"]

_FLOOR = math.exp(-GAUSSIAN_CUTOFF)


def mexican_hat(u: torch.Tensor) -> torch.Tensor:
    """``(1 - u^2) exp(-u^2 / 2)``, with the Gaussian cut like `gaussian`."""
    sq = u * u
    return (1 - sq) * gaussian(0.5 * sq)


class _MexicanHatBasis(torch.autograd.Function):
    """``mexican_hat((x - t) * exp(-log_s))`` with a fused forward and a closed-form backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, translation: torch.Tensor, log_scale: torch.Tensor
                ) -> torch.Tensor:
        inv_s = torch.exp(-log_scale)
        u = torch.sub(x.unsqueeze(-1), translation).mul_(inv_s)
        envelope = u.square().mul_(-0.5).clamp_(min=-GAUSSIAN_CUTOFF).exp_().sub_(_FLOOR) \
            .clamp_(min=0)
        psi = torch.addcmul(envelope, envelope * u, u, value=-1)  # (1 - u^2) * envelope
        ctx.save_for_backward(u, envelope, inv_s)
        return psi

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        u, envelope, inv_s = ctx.saved_tensors
        # psi'(u) = u (u^2 - 3) exp(-u^2 / 2); the envelope is 0 where the cut is active, so is
        # the gradient (as the derivative of the clamp gives).
        grad_u = (grad * envelope).mul_(u).mul_(u.square().sub_(3))
        grad_log_s = -(grad_u * u).sum(0) if ctx.needs_input_grad[2] else None
        grad_u.mul_(inv_s)  # du/dx = inv_s = -du/dt
        grad_x = grad_u.sum(-1) if ctx.needs_input_grad[0] else None
        grad_t = -grad_u.sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_t, grad_log_s


def mexican_hat_basis(x: torch.Tensor, translation: torch.Tensor, log_scale: torch.Tensor
                      ) -> torch.Tensor:
    """``mexican_hat((x_i - t_ib) / exp(log_s_ib))``: ``(N, in) -> (N, in, nb)``."""
    return _MexicanHatBasis.apply(x, translation, log_scale)


@register_kan("kan-wavelet", paper="Kolmogorov-Arnold Convolutions: Design Principles and "
              "Empirical Studies", summary="KAN with Mexican-hat wavelets of learnable scale and "
              "translation per input (Wav-KAN).")
class WaveletKAN(KANLayer):
    """KAN layer with ``n_wavelets`` learnable Mexican-hat wavelets per input.

    Args:
        in_features: input features.
        out_features: output features.
        n_wavelets: wavelets per input (coefficients per edge).
        grid_range: ``(low, high)`` span of the initial translations; initial scales equal their
            spacing.
        base_activation: activation of the residual base branch (``None``: none).
        bias: add a learnable output bias.
    """

    def __init__(self, in_features: int, out_features: int, n_wavelets: int = 8, *,
                 grid_range: tuple[float, float] = (-2.0, 2.0),
                 base_activation: str | None = "silu", bias: bool = True) -> None:
        if n_wavelets < 1:
            raise ConfigError(f"kan-wavelet n_wavelets={n_wavelets} must be >= 1")
        low, high = grid_range
        if not high > low:
            raise ConfigError(f"kan-wavelet grid_range={grid_range} must be increasing")
        super().__init__(in_features, out_features, n_wavelets, base_activation=base_activation,
                         bias=bias)
        self.grid_range = (float(low), float(high))
        centers = torch.linspace(low, high, n_wavelets) if n_wavelets > 1 \
            else torch.tensor([(low + high) / 2])
        spacing = (high - low) / max(n_wavelets - 1, 1)
        self.translation = nn.Parameter(centers.repeat(in_features, 1))
        self.log_scale = nn.Parameter(torch.full((in_features, n_wavelets), math.log(spacing)))

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        return mexican_hat_basis(x, self.translation, self.log_scale)

    def _copy_input_state(self, small: KANLayer, keep_inputs: torch.Tensor) -> None:
        small.translation.copy_(self.translation[keep_inputs])
        small.log_scale.copy_(self.log_scale[keep_inputs])

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_wavelets": self.n_basis, "grid_range": self.grid_range}
