"""A small pre-norm transformer encoder over patches (images, sequences, vectors) or tokens."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnarena.errors import ConfigError
from nnarena.layers import create_act, create_attention, create_layer, is_nonlinear
from nnarena.models._blocks import Blocks
from nnarena.registry import register

__all__ = ["EncoderBlock", "Tokenizer", "transformer"]


class Tokenizer(nn.Module):
    """Turns one example into ``(tokens, d_model)`` and adds learned position embeddings.

    Token ids (when ``vocab_size`` is set) are embedded; otherwise the input is cut into
    non-overlapping patches: ``(D,)`` into chunks of ``patch`` features, ``(C, L)`` into
    ``patch``-long windows, ``(C, H, W)`` into ``patch x patch`` squares.
    """

    def __init__(self, input_shape: tuple[int, ...], d_model: int, patch: int,
                 vocab_size: int | None) -> None:
        super().__init__()
        self.input_shape, self.patch, self.vocab_size = input_shape, patch, vocab_size
        if vocab_size is not None:
            n_tokens, self.embed = input_shape[0], nn.Embedding(vocab_size, d_model)
        else:
            if len(input_shape) == 1:
                n_tokens, patch_dim = math.ceil(input_shape[0] / patch), patch
            elif len(input_shape) == 2:
                n_tokens, patch_dim = input_shape[1] // patch, input_shape[0] * patch
            else:
                n_tokens = (input_shape[1] // patch) * (input_shape[2] // patch)
                patch_dim = input_shape[0] * patch * patch
            if n_tokens == 0:
                raise ConfigError(f"transformer patch={patch} is larger than the input "
                                  f"{input_shape}; choose a smaller patch")
            self.embed = nn.Linear(patch_dim, d_model)
        self.n_tokens = n_tokens
        self.position = nn.Parameter(torch.zeros(1, n_tokens, d_model))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vocab_size is not None:
            return self.embed(x.long()) + self.position
        p = self.patch
        if x.dim() == 2:
            x = F.pad(x, (0, (-x.shape[1]) % p)).reshape(x.shape[0], -1, p)
        elif x.dim() == 3:
            x = x.unfold(2, p, p).permute(0, 2, 1, 3).flatten(2)
        else:
            x = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, h, w, p, p)
            x = x.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        return self.embed(x) + self.position


class EncoderBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``."""

    def __init__(self, d_model: int, hidden: int, layer: str, act: str, attn: nn.Module,
                 layer_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = attn
        self.ffn = nn.Sequential(
            create_layer(layer, d_model, hidden, **layer_kwargs),
            create_act("identity" if is_nonlinear(layer) else act),
            create_layer(layer, hidden, d_model, **layer_kwargs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class _PoolHead(nn.Module):
    def __init__(self, d_model: int, n_outputs: int, layer: str, kw: dict[str, Any]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.out = create_layer(layer, d_model, n_outputs, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x).mean(1))


@register("model", "transformer", capabilities={"conv": False})
def transformer(
    input_shape: tuple[int, ...],
    n_outputs: int,
    d_model: int = 64,
    n_heads: int = 4,
    depth: int = 2,
    mlp_ratio: float = 2.0,
    patch: int = 4,
    vocab_size: int | None = None,
    layer: str = "linear",
    act: str = "gelu",
    dropout: float = 0.0,
    layer_kwargs: dict[str, Any] | None = None,
    attention: str = "softmax",
    attention_kwargs: dict[str, Any] | None = None,
) -> Blocks:
    """Tokenizer block, ``depth`` encoder blocks, mean-pooled dense head.

    Args:
        input_shape: shape of one example (token ids of length ``L`` when ``vocab_size`` is set).
        n_outputs: classes or regression outputs.
        d_model: token width.
        n_heads: attention heads (must divide ``d_model``).
        depth: encoder blocks.
        mlp_ratio: feed-forward hidden width as a multiple of ``d_model``.
        patch: patch size for non-token inputs.
        vocab_size: set for integer token inputs.
        layer: layer registry name of the feed-forward layers and the head.
        act: feed-forward activation (none for layers with their own nonlinearity).
        dropout: attention dropout.
        layer_kwargs: keyword arguments for every layer.
        attention: attention registry name (``softmax``, ``karat`` ...).
        attention_kwargs: keyword arguments for every attention block (e.g. KArAt's ``basis``).
    """
    kw = layer_kwargs or {}
    hidden = int(d_model * mlp_ratio)
    tokenizer = Tokenizer(input_shape, d_model, patch, vocab_size)
    blocks: list[nn.Module] = [tokenizer]
    for _ in range(depth):
        attn = create_attention(attention, d_model, n_heads, tokenizer.n_tokens, dropout=dropout,
                                **(attention_kwargs or {}))
        blocks.append(EncoderBlock(d_model, hidden, layer, act, attn, kw))
    return Blocks(blocks, _PoolHead(d_model, n_outputs, layer, kw))
