"""Multi-layer perceptron: ``Flatten -> [layer, norm, act, dropout] x depth -> layer``."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from torch import nn

from nnarena.layers import create_layer, create_norm
from nnarena.models._blocks import Blocks, activation_for
from nnarena.registry import register

__all__ = ["mlp"]


@register("model", "mlp", capabilities={"conv": False})
def mlp(
    input_shape: tuple[int, ...],
    n_outputs: int,
    width: int = 256,
    depth: int = 2,
    hidden: tuple[int, ...] | None = None,
    layer: str = "linear",
    act: str | None = None,
    norm: str | None = None,
    dropout: float = 0.0,
    layer_kwargs: dict[str, Any] | None = None,
) -> Blocks:
    """Multi-layer perceptron; one block per hidden layer.

    Args:
        input_shape: shape of one example (flattened).
        n_outputs: classes or regression outputs.
        width: hidden width (ignored when ``hidden`` is given).
        depth: number of hidden layers (ignored when ``hidden`` is given).
        hidden: explicit hidden widths, e.g. ``(5,)`` for a [2, 5, 1] KAN.
        layer: layer registry name for every layer, head included.
        act: activation name; default ReLU, none for layers with their own nonlinearity.
        norm: ``batch``, ``layer`` or ``None``.
        dropout: dropout after each hidden activation.
        layer_kwargs: keyword arguments for every layer.
    """
    widths = list(hidden) if hidden is not None else [width] * depth
    kw = layer_kwargs or {}
    d_in = math.prod(input_shape)
    blocks = []
    for i, w in enumerate(widths):
        parts = [nn.Flatten()] if i == 0 else []
        parts += [create_layer(layer, d_in, w, **kw), create_norm(norm, w),
                  activation_for(layer, act)]
        if dropout:
            parts.append(nn.Dropout(dropout))
        blocks.append(nn.Sequential(*parts))
        d_in = w
    head = create_layer(layer, d_in, n_outputs, **kw)
    return Blocks(blocks, head if widths else nn.Sequential(nn.Flatten(), head))


register("model", "mlp-tiny", summary="Tiny MLP (one hidden layer of 32) for tests.",
         capabilities={"conv": False})(partial(mlp, width=32, depth=1))
register("model", "linear", summary="Linear model (no hidden layer): the floor to beat.",
         capabilities={"conv": False})(partial(mlp, depth=0))
