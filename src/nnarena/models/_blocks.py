"""`Blocks`: an ordered list of blocks plus a head, the model contract every builder returns.

Backprop sees one `nn.Module`; local and forward-only rules cut the network at block boundaries
using `forward_intermediates`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nnarena.layers import LayerType, create_act, is_nonlinear

__all__ = ["Blocks", "activation_for"]


class Blocks(nn.Module):
    """``head(blocks[-1](...blocks[0](x)))``.

    Args:
        blocks: the trunk, run in order.
        head: maps the last block's output to the task's outputs (logits or regression values).
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def forward_intermediates(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every block's output and the head's output, in one pass."""
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features, self.head(x)


def activation_for(layer: LayerType, act: str | None) -> nn.Module:
    """The activation after a layer: ``act`` if given, else ReLU, or none for nonlinear layers."""
    if act is None:
        act = "identity" if is_nonlinear(layer) else "relu"
    return create_act(act)
