"""Layers by registry name; models build theirs through `create_layer` / `create_conv_layer`."""

from __future__ import annotations

from nnarena.layers import attention as attention
from nnarena.layers import black_box as black_box
from nnarena.layers import kan as kan
from nnarena.layers import linear as linear
from nnarena.layers._act import create_act as create_act
from nnarena.layers._act import create_norm as create_norm
from nnarena.layers._factory import LayerType as LayerType
from nnarena.layers._factory import create_conv_layer as create_conv_layer
from nnarena.layers._factory import create_layer as create_layer
from nnarena.layers._factory import is_nonlinear as is_nonlinear
from nnarena.layers.attention import create_attention as create_attention
from nnarena.layers.black_box import BlackBox as BlackBox

__all__ = ["BlackBox", "LayerType", "create_act", "create_attention", "create_conv_layer",
           "create_layer", "create_norm", "is_nonlinear"]
