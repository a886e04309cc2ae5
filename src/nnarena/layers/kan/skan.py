"""Activation-space selectable KAN layer (S-KAN).

Paper: "Activation Space Selectable Kolmogorov-Arnold Networks" (arXiv 2408.08338).

Our reading of the paper: every KAN node keeps a pool of candidate activation spaces (B-spline,
Chebyshev, Fourier, RBF, wavelet, ...) and learns, from data, weights that choose among them; the
node's activation is the weighted combination of its candidates, trained end to end.

Implemented: for input node ``i`` with selection logits ``z_i`` (one per space ``s``), every edge
leaving it is ``phi_oi(x) = sum_s w_is sum_b c_oisb B_sb(x)``, ``w_i = S * softmax(z_i)`` (mean 1,
so the initial scale matches a single-space KAN). The weights multiply the basis, so the layer is
one GEMM over the concatenated ``(N, in, S * n_per_space)`` basis. Candidate spaces:
``chebyshev`` and ``legendre`` (polynomials of ``tanh x``), ``fourier`` (``cos/sin k x``), ``rbf``
(Gaussians) and ``wavelet`` (Mexican hats), the latter two on a fixed grid over [-2, 2].

Deviations: the paper's pool includes B-splines and it trains in three stages (all spaces, then
selection, then pruning the unselected spaces); here the pool is the B-spline-free families of this
package, and selection stays soft (read `selection` to see or act on it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nnarena.errors import ConfigError
from nnarena.layers.kan._base import KANLayer
from nnarena.layers.kan._register import register_kan
from nnarena.layers.kan.fourier import fourier
from nnarena.layers.kan.polynomial import chebyshev, legendre
from nnarena.layers.kan.rbf import gaussian_rbf
from nnarena.layers.kan.wavelet import mexican_hat

__all__ = ["SPACES", "SelectableKAN"]

SPACES = ("chebyshev", "legendre", "fourier", "rbf", "wavelet")
_GRID = (-2.0, 2.0)  # span of the rbf and wavelet centres


@register_kan("kan-skan", paper="Activation Space Selectable Kolmogorov-Arnold Networks",
              summary="S-KAN: each input node mixes several activation spaces with learned "
              "softmax selection weights.")
class SelectableKAN(KANLayer):
    """KAN layer whose input nodes softly select among candidate activation spaces.

    Args:
        in_features: input features.
        out_features: output features.
        spaces: candidate spaces, from ``chebyshev``, ``legendre``, ``fourier``, ``rbf``,
            ``wavelet``.
        n_per_space: basis functions per space (even for ``fourier``; at least 2);
            ``len(spaces) * n_per_space`` coefficients per edge.
        base_activation: activation of the residual base branch (``None``: none).
        bias: add a learnable output bias.
    """

    def __init__(self, in_features: int, out_features: int,
                 spaces: tuple[str, ...] = ("chebyshev", "fourier", "rbf"),
                 n_per_space: int = 4, *, base_activation: str | None = "silu",
                 bias: bool = True) -> None:
        spaces = tuple(spaces)
        unknown = [s for s in spaces if s not in SPACES]
        if unknown or not spaces or len(set(spaces)) != len(spaces):
            raise ConfigError(f"kan-skan spaces={spaces} must be distinct names from "
                              f"{', '.join(SPACES)}")
        if n_per_space < 2 or ("fourier" in spaces and n_per_space % 2):
            raise ConfigError(f"kan-skan n_per_space={n_per_space} must be >= 2 (and even with "
                              "fourier)")
        super().__init__(in_features, out_features, len(spaces) * n_per_space,
                         base_activation=base_activation, bias=bias)
        self.spaces, self.n_per_space = spaces, n_per_space
        self.logits = nn.Parameter(torch.zeros(in_features, len(spaces)))
        self.register_buffer("freqs", torch.arange(1, n_per_space // 2 + 1, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("centers", torch.linspace(*_GRID, n_per_space), persistent=False)
        self.inv_h = (n_per_space - 1) / (_GRID[1] - _GRID[0])

    def selection(self) -> torch.Tensor:
        """Selection weights per input node over its spaces: ``(in, n_spaces)``, rows sum to 1."""
        return torch.softmax(self.logits, dim=-1)

    def _space(self, name: str, x: torch.Tensor) -> torch.Tensor:
        n = self.n_per_space
        if name == "chebyshev":
            return chebyshev(torch.tanh(x), n - 1)
        if name == "legendre":
            return legendre(torch.tanh(x), n - 1)
        if name == "fourier":
            return fourier(x, self.freqs.to(x.dtype))
        centers = self.centers.to(x.dtype)
        if name == "rbf":
            return gaussian_rbf(x, centers, self.inv_h)
        return mexican_hat((x.unsqueeze(-1) - centers) * self.inv_h)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        phi = torch.stack([self._space(s, x) for s in self.spaces], dim=-2)  # (N, in, S, n)
        weights = self.selection() * len(self.spaces)
        return (phi * weights.unsqueeze(-1)).flatten(-2)

    def _copy_input_state(self, small: KANLayer, keep_inputs: torch.Tensor) -> None:
        small.logits.copy_(self.logits[keep_inputs])

    def config(self) -> dict[str, Any]:
        return {**super().config(), "spaces": self.spaces, "n_per_space": self.n_per_space}
