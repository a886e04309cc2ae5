"""Kolmogorov-Arnold layers: every basis goes through `KANLayer`'s one basis -> GEMM path."""

from __future__ import annotations

from nnarena.layers.kan import (  # noqa: F401  (importing a basis module registers it)
    attention,
    bspline,
    cauchy,
    fourier,
    mlp_kan,
    polynomial,
    rational,
    rbf,
    relu_kan,
    skan,
    wavelet,
)
from nnarena.layers.kan._base import KANLayer as KANLayer
from nnarena.layers.kan._register import register_kan as register_kan
from nnarena.layers.kan.conv import KANConv as KANConv

__all__ = ["KANConv", "KANLayer", "register_kan"]
