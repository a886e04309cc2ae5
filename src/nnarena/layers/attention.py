"""Self-attention blocks by registry name (family ``attention``); transformers build theirs here.

An attention entry is a module ``(d_model, n_heads, n_tokens, *, dropout, **kw)`` mapping
``(B, T, d_model) -> (B, T, d_model)``: QKV projection, a token mixer, output projection. Subclasses
of `SelfAttention` change only the mixer (`SelfAttention.mix`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnarena.errors import ConfigError
from nnarena.registry import REGISTRY, register

__all__ = ["SelfAttention", "create_attention"]


@register("attention", "softmax", summary="Multi-head scaled dot-product softmax attention.")
class SelfAttention(nn.Module):
    """Multi-head self-attention with softmax weights (fused scaled dot-product kernel).

    Args:
        d_model: token width.
        n_heads: attention heads (must divide ``d_model``).
        n_tokens: sequence length (unused by softmax; mixers with per-token parameters need it).
        dropout: dropout on the attention weights (training only).
    """

    def __init__(self, d_model: int, n_heads: int, n_tokens: int | None = None, *,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"attention d_model={d_model} must be divisible by "
                              f"n_heads={n_heads}")
        self.n_heads, self.n_tokens, self.dropout = n_heads, n_tokens, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Mixed values ``(B, H, T, d_head)`` from queries, keys and values of that shape."""
        drop = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(self.mix(q, k, v).transpose(1, 2).reshape(b, t, d))


def create_attention(name: str, d_model: int, n_heads: int, n_tokens: int,
                     **kwargs: Any) -> nn.Module:
    """An attention block by registry name (``softmax``, ``karat``, ...)."""
    entry = REGISTRY.get("attention", name)
    entry.check_kwargs(kwargs, given=["d_model", "n_heads", "n_tokens"])
    return entry.factory(d_model, n_heads, n_tokens, **kwargs)
