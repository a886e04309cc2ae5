"""Fourier-series KAN layer (FKAN).

Paper: "Implicit Neural Representations with Fourier Kolmogorov-Arnold Networks" (arXiv 2409.09323).

Implemented: each edge is the truncated Fourier series ``sum_k a_k cos(k x) + b_k sin(k x)`` for
``k = 1..n_freqs`` with learnable ``a``, ``b`` (``2 * n_freqs`` coefficients per edge); the
constant term is the layer's output bias.

Deviations: FKAN uses such layers as the first layer of an INR followed by ordinary layers; here it
is a general layer usable anywhere (the model decides where). An optional base branch is available
but off by default, as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch

from nnarena.errors import ConfigError
from nnarena.layers.kan._base import KANLayer
from nnarena.layers.kan._register import register_kan

__all__ = ["FourierKAN", "fourier"]


def fourier(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``cos(k x)`` then ``sin(k x)`` for ``k`` in ``freqs``: ``(...) -> (..., 2 len(freqs))``."""
    kx = x.unsqueeze(-1) * freqs
    return torch.cat([kx.cos(), kx.sin()], dim=-1)


@register_kan("kan-fourier", paper="Implicit Neural Representations with Fourier Kolmogorov-Arnold "
              "Networks", summary="KAN whose edges are truncated Fourier series (FKAN).")
class FourierKAN(KANLayer):
    """KAN layer with the Fourier basis ``cos(k x), sin(k x)``, ``k = 1..n_freqs``.

    Args:
        in_features: input features.
        out_features: output features.
        n_freqs: frequencies per input (``2 * n_freqs`` coefficients per edge).
        base_activation: activation of the residual base branch (``None``: none, as in FKAN).
        bias: add a learnable output bias (the series' constant term).
    """

    def __init__(self, in_features: int, out_features: int, n_freqs: int = 4, *,
                 base_activation: str | None = None, bias: bool = True) -> None:
        if n_freqs < 1:
            raise ConfigError(f"kan-fourier n_freqs={n_freqs} must be >= 1")
        super().__init__(in_features, out_features, 2 * n_freqs, base_activation=base_activation,
                         bias=bias)
        self.n_freqs = n_freqs
        self.register_buffer("freqs", torch.arange(1, n_freqs + 1, dtype=torch.float32),
                             persistent=False)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        return fourier(x, self.freqs.to(x.dtype))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_freqs": self.n_freqs}
