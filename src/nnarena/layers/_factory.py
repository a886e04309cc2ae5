"""`create_layer` / `create_conv_layer`: every model builds its layers through these two.

A layer entry (family ``layer``) is a factory ``(in_features, out_features, **kw) -> nn.Module``;
its conv form, if it has one, is ``entry.extra["conv"]`` with signature
``(in_channels, out_channels, kernel_size, *, dim, stride, padding, **kw)``. Capability
``nonlinear`` marks layers that carry their own nonlinearity (KAN layers), after which builders add
no activation by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from nnarena.errors import IncompatibleError
from nnarena.registry import REGISTRY

__all__ = ["LayerType", "create_conv_layer", "create_layer", "is_nonlinear"]

LayerType = str | Callable[..., nn.Module]


def create_layer(layer: LayerType, in_features: int, out_features: int, **kwargs: Any) -> nn.Module:
    """A dense layer ``in_features -> out_features`` by registry name or callable."""
    if not isinstance(layer, str):
        return layer(in_features, out_features, **kwargs)
    entry = REGISTRY.get("layer", layer)
    entry.check_kwargs(kwargs, given=["in_features", "out_features"])
    return entry.factory(in_features, out_features, **kwargs)


def create_conv_layer(
    layer: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    dim: int,
    stride: int = 1,
    padding: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """The conv form (1-D or 2-D) of layer ``layer``."""
    entry = REGISTRY.get("layer", layer)
    conv = entry.extra.get("conv")
    if conv is None:
        with_conv = [e.name for e in REGISTRY.list("layer") if e.extra.get("conv")]
        raise IncompatibleError(
            f"layer '{layer}' has no conv form; layers with one: {', '.join(with_conv)}"
        )
    return conv(in_channels, out_channels, kernel_size, dim=dim, stride=stride, padding=padding,
                **kwargs)


def is_nonlinear(layer: LayerType) -> bool:
    """Whether the layer carries its own nonlinearity (then builders add no activation)."""
    if not isinstance(layer, str):
        return bool(getattr(layer, "nonlinear", False))
    return bool(REGISTRY.get("layer", layer).capabilities.get("nonlinear", False))
