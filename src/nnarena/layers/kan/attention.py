"""Kolmogorov-Arnold Attention (KArAt): attention with a learnable KAN in place of softmax.

Paper: "Kolmogorov-Arnold Attention: Is Learnable Attention Better For Vision Transformers?"
(arXiv 2503.10632).

Softmax maps each row ``a in R^T`` of an attention score matrix (``T`` tokens) to a row of weights.
KArAt replaces it with a learnable operator ``Phi: R^T -> R^T`` that is a KAN layer: every output
weight is a sum of learnable univariate functions of the row's scores, in any basis (Fourier in
the paper's Fourier-KArAt). That needs ``T * T`` functions per operator, so the paper proposes a
modular, low-rank version; we read it as a KAN ``R^T -> R^r`` (``r << T``) followed by a learnable
linear map ``R^r -> R^T``.

Implemented: `KArAtAttention`, attention entry ``karat`` (``transformer(attention="karat")``), a
drop-in self-attention block (``(B, T, d) -> (B, T, d)``: QKV projection, attention, output
projection; see `nnarena.layers.attention`) whose row operator is a registered KAN layer
``kan-<basis>`` with ``n_tokens`` inputs and ``rank`` outputs (``rank=None``: the full ``T -> T``
operator with no projection), then the ``rank -> T`` linear map. One operator serves all heads of
the block.

Choices of ours (we could not confirm them from the paper text we had): the low-rank form above;
the operator is shared by the block's heads; rows are divided by their L1 norm
(``normalize=True``) so that, like softmax rows, their magnitudes sum to 1 whatever the learned
function's scale (``normalize=False`` keeps the raw operator output).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nnarena.errors import ConfigError
from nnarena.layers._factory import create_layer
from nnarena.layers.attention import SelfAttention
from nnarena.registry import register

__all__ = ["KArAtAttention"]


@register("attention", "karat",
          paper=("Kolmogorov-Arnold Attention: Is Learnable Attention Better For "
                 "Vision Transformers?"),
          summary="Attention whose softmax is a learnable KAN operator on each score row.")
class KArAtAttention(SelfAttention):
    """Multi-head self-attention whose softmax is a learnable KAN operator on each score row.

    Args:
        d_model: token width.
        n_heads: attention heads (must divide ``d_model``).
        n_tokens: sequence length ``T`` (the operator acts on rows of ``T`` scores).
        basis: KAN basis of the operator: layer ``kan-<basis>`` (e.g. ``fourier``, ``rbf``).
        rank: KAN outputs before the linear map back to ``T`` (the paper's low-rank form);
            ``None``: the full ``T -> T`` KAN.
        normalize: divide each weight row by its L1 norm.
        dropout: dropout on the attention weights (training only).
        basis_kwargs: keyword arguments for the KAN layer (e.g. ``n_freqs``).
    """

    def __init__(self, d_model: int, n_heads: int, n_tokens: int, *, basis: str = "fourier",
                 rank: int | None = 8, normalize: bool = True, dropout: float = 0.0,
                 basis_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(d_model, n_heads, n_tokens, dropout=dropout)
        if rank is not None and rank < 1:
            raise ConfigError(f"KArAt rank={rank} must be >= 1 (or None for the full operator)")
        self.normalize = normalize
        self.scale = (d_model // n_heads) ** -0.5
        self.operator = create_layer(f"kan-{basis}", n_tokens, n_tokens if rank is None else rank,
                                     **(basis_kwargs or {}))
        self.expand = nn.Linear(rank, n_tokens, bias=False) if rank is not None else None
        self.drop = nn.Dropout(dropout)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Weights ``(B, H, T, T)`` from queries and keys ``(B, H, T, d_head)``."""
        if q.shape[-2] != self.n_tokens or k.shape[-2] != self.n_tokens:
            raise ConfigError(f"KArAt was built for {self.n_tokens} tokens, got {q.shape[-2]}")
        weights = self.operator(q @ k.transpose(-2, -1) * self.scale)
        if self.expand is not None:
            weights = self.expand(weights)
        if self.normalize:
            weights = weights / (weights.abs().sum(-1, keepdim=True) + 1e-6)
        return weights

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.drop(self.attention_weights(q, k)) @ v
