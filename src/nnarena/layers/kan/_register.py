"""`register_kan`: registers a KAN layer class as a dense layer and, through `KANConv`, its conv."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from nnarena.layers.kan._base import KANLayer
from nnarena.layers.kan.conv import KANConv
from nnarena.registry import register

__all__ = ["register_kan"]


def register_kan(name: str, *, paper: str | None, summary: str, status: str = "stable",
                 **presets: Any) -> Callable[[type[KANLayer]], type[KANLayer]]:
    """Class decorator: layer ``name`` (dense and conv forms), with optional preset keywords.

    Use it once per class, and call it again as a function for preset variants::

        register_kan("kan-bspline-k7", paper=..., summary=..., spline_order=7)(KANLinear)
    """

    def decorator(cls: type[KANLayer]) -> type[KANLayer]:
        dense = functools.partial(cls, **presets) if presets else cls
        conv = functools.partial(KANConv, layer_cls=cls, **presets)
        register("layer", name, paper=paper, summary=summary, status=status,
                 capabilities={"nonlinear": True, "conv": True}, conv=conv)(dense)
        return cls

    return decorator
