"""Activations and norms by name."""

from __future__ import annotations

from torch import nn

from nnarena.errors import UnknownNameError
from nnarena.registry import closest

__all__ = ["create_act", "create_norm"]

_ACTS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky-relu": nn.LeakyReLU,
    "identity": nn.Identity,
}


def create_act(name: str) -> nn.Module:
    """An activation module by name (``relu``, ``gelu``, ``silu``, ``tanh``, ...)."""
    return _lookup(_ACTS, name, "activation")()


def create_norm(name: str | None, features: int, *, dim: int = 0) -> nn.Module:
    """A norm layer by name: ``batch``, ``layer`` or ``None`` (identity).

    Args:
        name: norm kind.
        features: channels (conv) or features (dense).
        dim: spatial dims of the input (0 dense, 1 or 2 conv).
    """
    if name is None or name == "none":
        return nn.Identity()
    if name == "batch":
        return (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d)[dim](features)
    if name == "layer":
        return nn.LayerNorm(features) if dim == 0 else nn.GroupNorm(1, features)
    return _lookup({"batch": None, "layer": None, "none": None}, name, "norm")


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        near = closest(name, table)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UnknownNameError(f"unknown {what} '{name}'{hint}; valid: {', '.join(table)}")
    return table[name]
