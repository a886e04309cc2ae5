"""Deep physical network: black-box physical layers interleaved with trainable digital layers.

The architecture of "Backpropagation-free Training of Deep Physical Neural Networks" (Momeni et
al., arXiv:2304.11042): each layer is a physical nonlinear system (a `BlackBox`, measured only)
followed by a trainable digital linear layer. Every `BlackBox` opens its block, so a rule that
trains blocks locally (``ff-model-free``) never needs a gradient through it.
"""

from __future__ import annotations

import math

from torch import nn

from nnarena.errors import ConfigError
from nnarena.layers import BlackBox
from nnarena.models._blocks import Blocks, activation_for
from nnarena.registry import register

__all__ = ["physical_mlp"]


@register("model", "physical-mlp", capabilities={"conv": False, "black_box": True},
          summary="MLP whose blocks open with a fixed black-box physical layer.")
def physical_mlp(
    input_shape: tuple[int, ...],
    n_outputs: int,
    width: int = 256,
    depth: int = 2,
    physical_blocks: tuple[int, ...] | None = None,
    physical_width: int | None = None,
    noise_std: float = 0.0,
    gain: float = 1.0,
    act: str | None = None,
) -> Blocks:
    """Block ``i`` is ``[BlackBox] -> Linear -> act``; the head is a digital Linear.

    Args:
        input_shape: shape of one example (flattened).
        n_outputs: classes or regression outputs.
        width: width of every digital layer.
        depth: number of blocks.
        physical_blocks: indices of the blocks that open with a `BlackBox` (default: all of them,
            the paper's layout).
        physical_width: measured outputs of each `BlackBox` (default: ``width``).
        noise_std: measurement noise of every `BlackBox`.
        gain: projection scale of every `BlackBox`.
        act: activation after each digital layer (default ReLU).
    """
    physical = set(range(depth) if physical_blocks is None else physical_blocks)
    if not physical <= set(range(depth)):
        raise ConfigError(f"physical_blocks {sorted(physical)} must be block indices in "
                          f"0..{depth - 1}")
    d_in = math.prod(input_shape)
    blocks = []
    for i in range(depth):
        parts: list[nn.Module] = [nn.Flatten()] if i == 0 else []
        if i in physical:
            parts.append(BlackBox(d_in, physical_width or width, noise_std=noise_std, gain=gain))
            d_in = physical_width or width
        parts += [nn.Linear(d_in, width), activation_for("linear", act)]
        blocks.append(nn.Sequential(*parts))
        d_in = width
    head = nn.Linear(d_in, n_outputs)
    return Blocks(blocks, head if depth else nn.Sequential(nn.Flatten(), head))
