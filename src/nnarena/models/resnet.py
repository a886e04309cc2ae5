"""Residual networks: pre-norm residual MLP blocks, or residual conv blocks for images/sequences."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from nnarena.layers import create_conv_layer, create_layer, create_norm
from nnarena.models._blocks import Blocks, activation_for
from nnarena.models.cnn import conv_dims
from nnarena.registry import register

__all__ = ["Residual", "resnet"]


class Residual(nn.Module):
    """``x + body(x)``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@register("model", "resnet", capabilities={"conv": True})
def resnet(
    input_shape: tuple[int, ...],
    n_outputs: int,
    width: int = 64,
    depth: int = 4,
    kind: Literal["auto", "mlp", "cnn"] = "auto",
    kernel_size: int = 3,
    layer: str = "linear",
    act: str | None = None,
    norm: str | None = None,
    layer_kwargs: dict[str, Any] | None = None,
) -> Blocks:
    """A stem block, ``depth`` residual blocks of two layers each, and a dense head.

    Args:
        input_shape: shape of one example.
        n_outputs: classes or regression outputs.
        width: features (mlp) or channels (cnn) of every block.
        depth: number of residual blocks.
        kind: ``mlp`` (flattened input), ``cnn`` (conv blocks, global average pool), or ``auto``
            (cnn for ``(C, L)`` / ``(C, H, W)`` inputs, mlp otherwise).
        kernel_size: conv kernel size (cnn only).
        layer: layer registry name.
        act: activation name; default ReLU, none for layers with their own nonlinearity.
        norm: ``batch``, ``layer`` or ``None`` (default: layer for mlp, batch for cnn).
        layer_kwargs: keyword arguments for every layer.
    """
    if kind == "auto":
        kind = "cnn" if len(input_shape) in (2, 3) else "mlp"
    kw = layer_kwargs or {}
    if kind == "mlp":
        norm = "layer" if norm is None else norm
        stem = nn.Sequential(nn.Flatten(), create_layer(layer, math.prod(input_shape), width, **kw))

        def body() -> nn.Module:
            return nn.Sequential(create_norm(norm, width),
                                 create_layer(layer, width, width, **kw),
                                 activation_for(layer, act),
                                 create_layer(layer, width, width, **kw))

        head = nn.Sequential(create_norm(norm, width), activation_for(layer, act),
                             create_layer(layer, width, n_outputs, **kw))
    else:
        dim = conv_dims(input_shape, "resnet")
        norm = "batch" if norm is None else norm
        pad = kernel_size // 2

        def conv(c_in: int) -> nn.Module:
            return create_conv_layer(layer, c_in, width, kernel_size, dim=dim, padding=pad, **kw)

        stem = nn.Sequential(conv(input_shape[0]), create_norm(norm, width, dim=dim),
                             activation_for(layer, act))

        def body() -> nn.Module:
            return nn.Sequential(conv(width), create_norm(norm, width, dim=dim),
                                 activation_for(layer, act), conv(width),
                                 create_norm(norm, width, dim=dim))

        pool = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)[dim - 1](1)
        head = nn.Sequential(activation_for(layer, act), pool, nn.Flatten(),
                             create_layer(layer, width, n_outputs, **kw))
    return Blocks([stem, *(Residual(body()) for _ in range(depth))], head)
