"""`KANLayer`: the one basis -> GEMM path every Kolmogorov-Arnold layer goes through.

A KAN layer puts a learnable function on each edge ``i -> o``:
``phi_oi(x_i) = base_weight[o, i] * act(x_i) + sum_b coef[o, i, b] * B_b(x_i)``, and sums the
edges into each output. Subclasses only say how to evaluate the basis ``B`` (``(N, in) -> (N, in,
n_basis)``); the base class turns it into one GEMM against ``coef`` viewed as ``(out, in *
n_basis)``, and adds the per-edge tools every basis shares: edge activations, the KAN paper's
regulariser (L1 + entropy of edge magnitudes), edge/node pruning and plots of the learned edges.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnarena.layers._act import create_act

__all__ = ["KANLayer"]


class KANLayer(nn.Module, ABC):
    """Base of every KAN layer: ``y = F.linear(basis(x), coef) + F.linear(act(x), base_weight)``.

    Args:
        in_features: input features.
        out_features: output features.
        n_basis: basis functions per input (coefficients per edge).
        base_activation: activation of the residual base branch (``None``: no base branch).
        bias: add a learnable output bias.
        coef_std: standard deviation of the initial coefficients, scaled by
            ``1 / sqrt(in_features * n_basis)``.
    """

    nonlinear = True  # builders add no activation after a KAN layer
    sparse_params = ("coef", "base_weight")  # the tensors sparsity masks apply to

    def __init__(self, in_features: int, out_features: int, n_basis: int, *,
                 base_activation: str | None = "silu", bias: bool = True,
                 coef_std: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.n_basis = in_features, out_features, n_basis
        self.coef = nn.Parameter(torch.randn(out_features, in_features, n_basis)
                                 * (coef_std / math.sqrt(in_features * n_basis)))
        self.base_activation = base_activation
        self.base_act = create_act(base_activation) if base_activation else None
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features)) \
            if base_activation else None
        if self.base_weight is not None and out_features:
            nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @abstractmethod
    def basis(self, x: torch.Tensor) -> torch.Tensor:
        """Basis values ``(N, in_features) -> (N, in_features, n_basis)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        phi = self.basis(x).reshape(len(x), self.in_features * self.n_basis)
        out = F.linear(phi, self.coef.view(self.out_features, -1), self.bias)
        if self.base_weight is not None:
            out = torch.addmm(out, self.base_act(x), self.base_weight.t())
        return out.reshape(*lead, self.out_features)

    def edge_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Every edge's value ``phi_oi(x_i)``: ``(N, in) -> (N, out, in)``; they sum to the output
        (less the bias)."""
        x = x.reshape(-1, self.in_features)
        edges = torch.einsum("nib,oib->noi", self.basis(x), self.coef)
        if self.base_weight is not None:
            edges = edges + self.base_act(x)[:, None, :] * self.base_weight
        return edges

    def edge_importance(self, x: torch.Tensor) -> torch.Tensor:
        """Mean absolute edge activation on ``x`` (the KAN paper's edge L1 norm), ``(out, in)``."""
        with torch.no_grad():
            return self.edge_activations(x).abs().mean(0)

    def regularization(self, x: torch.Tensor, l1: float = 1.0, entropy: float = 1.0
                       ) -> torch.Tensor:
        """The KAN paper's sparsity regulariser on a batch: ``l1 * |Phi|_1 + entropy * S(Phi)``.

        ``|Phi|_1`` sums the edges' mean absolute activations; ``S`` is the entropy of their
        distribution ``|phi| / |Phi|_1``. Differentiable: add it to the loss.
        """
        norms = self.edge_activations(x).abs().mean(0)
        total = norms.sum()
        p = norms / (total + 1e-12)
        return l1 * total + entropy * -(p * torch.log(p + 1e-12)).sum()

    def prune(self, keep_inputs: torch.Tensor | None = None,
              keep_outputs: torch.Tensor | None = None) -> KANLayer:
        """A smaller copy that keeps only the given inputs and outputs (boolean masks).

        Kept outputs equal the original outputs minus the removed inputs' edges.
        """
        keep_in = torch.ones(self.in_features, dtype=torch.bool) if keep_inputs is None \
            else keep_inputs.bool().cpu()
        keep_out = torch.ones(self.out_features, dtype=torch.bool) if keep_outputs is None \
            else keep_outputs.bool().cpu()
        small = self._resized(int(keep_in.sum()), int(keep_out.sum()))
        with torch.no_grad():
            small.coef.copy_(self.coef[keep_out][:, keep_in])
            if self.base_weight is not None:
                small.base_weight.copy_(self.base_weight[keep_out][:, keep_in])
            if self.bias is not None:
                small.bias.copy_(self.bias[keep_out])
            self._copy_input_state(small, keep_in)
        return small

    def prune_edges(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        """Zero the edges whose importance on ``x`` is below ``threshold``; return the kept mask."""
        keep = self.edge_importance(x) >= threshold
        with torch.no_grad():
            self.coef.mul_(keep[..., None])
            if self.base_weight is not None:
                self.base_weight.mul_(keep)
        return keep

    def _resized(self, in_features: int, out_features: int) -> KANLayer:
        """A new layer of this class and settings with other sizes (for `prune`)."""
        return type(self)(in_features, out_features, **self.config())

    def _copy_input_state(self, small: KANLayer, keep_inputs: torch.Tensor) -> None:
        """Copy per-input state (e.g. B-spline grids) into a pruned copy; none by default."""

    def config(self) -> dict[str, Any]:
        """Constructor keywords (besides the sizes) that rebuild this layer."""
        return {"base_activation": self.base_activation, "bias": self.bias is not None}

    @torch.no_grad()
    def plot(self, x_range: tuple[float, float] = (-1.0, 1.0), points: int = 200,
             max_edges: int = 64) -> Any:
        """A matplotlib figure with the learned edge functions ``phi_oi`` on ``x_range``."""
        from matplotlib.figure import Figure

        xs = torch.linspace(*x_range, points, device=self.coef.device)
        edges = self.edge_activations(xs[:, None].expand(points, self.in_features)).cpu()
        n_in, n_out = min(self.in_features, max_edges), min(self.out_features, max_edges)
        fig = Figure(figsize=(1.6 * n_in + 1, 1.2 * n_out + 1))
        axes = fig.subplots(n_out, n_in, squeeze=False, sharex=True)
        for o in range(n_out):
            for i in range(n_in):
                ax = axes[o][i]
                ax.plot(xs.cpu(), edges[:, o, i], lw=1.2)
                ax.set_title(f"{i}→{o}", fontsize=7)
                ax.tick_params(labelsize=6)
        fig.tight_layout()
        return fig

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"n_basis={self.n_basis}, base_activation={self.base_activation}")
