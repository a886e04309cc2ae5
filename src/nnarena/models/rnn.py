"""Recurrent network over the input read as a sequence: ``[recurrent layer] x depth -> last state
-> layer``.

An example of shape ``(L,)`` is read as L steps of one feature, ``(C, L)`` as L steps of C
features (mnist1d's ``(1, 40)`` signal: 40 steps of one value) and ``(C, H, W)`` as H steps of
``C * W`` features (an image row by row). Each block is one recurrent layer over the whole sequence
and returns every step's state, ``(N, L, hidden)``, so block-wise rules train it layer by layer;
the head reads the last step's state.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from nnarena.errors import ConfigError
from nnarena.models._blocks import Blocks
from nnarena.registry import register

__all__ = ["LastStep", "Recurrent", "ToSequence", "rnn"]

Cell = Literal["rnn", "gru", "lstm"]
_CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class ToSequence(nn.Module):
    """``(N, L)``, ``(N, C, L)`` or ``(N, C, H, W)`` -> ``(N, steps, features)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return x.unsqueeze(-1)
        if x.dim() == 3:
            return x.transpose(1, 2)
        return x.permute(0, 2, 1, 3).flatten(2)


class Recurrent(nn.Module):
    """One recurrent layer (zero initial state) returning the states of every step."""

    def __init__(self, in_features: int, hidden: int, cell: Cell) -> None:
        super().__init__()
        self.rnn = _CELLS[cell](in_features, hidden, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class LastStep(nn.Module):
    """``(N, L, H)`` -> ``(N, H)``: the state after the last step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]


@register("model", "rnn", capabilities={"conv": False})
def rnn(
    input_shape: tuple[int, ...],
    n_outputs: int,
    hidden: int = 64,
    depth: int = 1,
    cell: Cell = "gru",
) -> Blocks:
    """Recurrent network; one block per recurrent layer, a dense head on the last state.

    Args:
        input_shape: ``(L,)``, ``(C, L)`` or ``(C, H, W)``; see the module docstring.
        n_outputs: classes or regression outputs.
        hidden: state size of every recurrent layer.
        depth: number of stacked recurrent layers (>= 1).
        cell: ``rnn`` (Elman, tanh), ``gru`` or ``lstm``.

    Raises:
        ConfigError: an unknown cell, ``depth < 1`` or an input of another rank.
    """
    if cell not in _CELLS:
        raise ConfigError(f"model 'rnn' cell '{cell}' is unknown; valid: {', '.join(_CELLS)}")
    if depth < 1:
        raise ConfigError(f"model 'rnn' depth must be >= 1, got {depth}")
    if len(input_shape) not in (1, 2, 3):
        raise ConfigError(f"model 'rnn' reads (L,), (C, L) or (C, H, W) inputs as sequences, "
                          f"got {input_shape}")
    features = {1: 1, 2: input_shape[0]}.get(len(input_shape), input_shape[0] * input_shape[-1])
    blocks: list[nn.Module] = [nn.Sequential(ToSequence(), Recurrent(features, hidden, cell))]
    blocks += [Recurrent(hidden, hidden, cell) for _ in range(depth - 1)]
    return Blocks(blocks, nn.Sequential(LastStep(), nn.Linear(hidden, n_outputs)))
