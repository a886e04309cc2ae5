"""Convolutional network, 1-D or 2-D by input shape: ``[conv, norm, act, pool] x n -> layer``."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from torch import nn

from nnarena.errors import IncompatibleError
from nnarena.layers import create_conv_layer, create_layer, create_norm
from nnarena.models._blocks import Blocks, activation_for
from nnarena.registry import register

__all__ = ["cnn", "conv_dims"]


def conv_dims(input_shape: tuple[int, ...], model: str) -> int:
    """Spatial dims (1 or 2) of a ``(C, L)`` or ``(C, H, W)`` input, else `IncompatibleError`."""
    if len(input_shape) not in (2, 3):
        raise IncompatibleError(
            f"model '{model}' needs (C, L) or (C, H, W) inputs, the dataset gives {input_shape}; "
            "use an mlp for flat features"
        )
    return len(input_shape) - 1


@register("model", "cnn", capabilities={"conv": True})
def cnn(
    input_shape: tuple[int, ...],
    n_outputs: int,
    channels: tuple[int, ...] = (32, 64),
    kernel_size: int = 3,
    pool: int = 2,
    layer: str = "linear",
    act: str | None = None,
    norm: str | None = "batch",
    layer_kwargs: dict[str, Any] | None = None,
) -> Blocks:
    """Conv blocks then a dense head on the flattened feature map.

    Args:
        input_shape: ``(C, L)`` for 1-D or ``(C, H, W)`` for 2-D inputs.
        n_outputs: classes or regression outputs.
        channels: output channels of each conv block.
        kernel_size: conv kernel size ("same" padding).
        pool: max-pool factor after each block while the map is large enough (1 = none).
        layer: layer registry name (its conv form for the blocks, its dense form for the head).
        act: activation name; default ReLU, none for layers with their own nonlinearity.
        norm: ``batch``, ``layer`` or ``None``.
        layer_kwargs: keyword arguments for every layer.
    """
    dim = conv_dims(input_shape, "cnn")
    kw = layer_kwargs or {}
    c_in, size = input_shape[0], list(input_shape[1:])
    blocks = []
    for c_out in channels:
        parts = [create_conv_layer(layer, c_in, c_out, kernel_size, dim=dim,
                                   padding=kernel_size // 2, **kw),
                 create_norm(norm, c_out, dim=dim), activation_for(layer, act)]
        if pool > 1 and min(size) >= 2 * pool:
            parts.append((nn.MaxPool1d, nn.MaxPool2d)[dim - 1](pool))
            size = [s // pool for s in size]
        blocks.append(nn.Sequential(*parts))
        c_in = c_out
    head = nn.Sequential(nn.Flatten(), create_layer(layer, c_in * math.prod(size), n_outputs, **kw))
    return Blocks(blocks, head)


register("model", "cnn-tiny", summary="Tiny CNN (one block of 8 channels) for tests.",
         capabilities={"conv": True})(partial(cnn, channels=(8,)))
