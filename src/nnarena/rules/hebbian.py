"""SoftHebb: soft winner-take-all Hebbian learning of the hidden layers, a readout on top.

Rule ``hebbian`` ("Hebbian Deep Learning Without Feedback", Journé, Rodriguez, Guo and Moraitis,
ICLR 2023, arXiv 2209.11883). Each hidden block's linear layer learns without any feedback:
with pre-activations ``u = W x`` (no bias) and the softmax-inhibited responses
``y = softmax(u / temperature)``, neuron ``k`` moves by ``dW_k = y_k (x - u_k W_k)`` (the
paper's SoftHebb rule, which drives every ``||W_k||`` to 1), averaged over the batch. The rule
writes ``-dW`` into ``.grad`` so the Trainer's optimizer applies it (with SGD at rate ``lr`` it is
exactly ``W += lr * dW``). The model head is a linear readout trained by the task loss on the
detached features of the last block. Blocks run one at a time through `run_blockwise` without
an autograd graph (the Hebbian update needs none), so only the head's graph is ever saved.

`softhebb_update` is the update itself, for tests and for ``nhl-tta`` (`hebbian_tta`).

Deviations: the paper's convolutional layers, triangle activation, adaptive per-neuron rates
and input-normalisation tricks are not used; on an MLP each block keeps its own activation
(ReLU by default) after the Hebbian linear layer, and its bias is not learned (it keeps its
initial value). The default temperature (0.003) was tuned on mnist5k under the arena protocol
(Adam, lr 3e-3, 15 epochs, batch 64); there it reaches 0.853 (seeds 0-2) against 0.905 for a
linear model on raw pixels and 0.943 for backprop, and 0.918 on digits (linear 0.918,
backprop 0.970): with this optimiser the Hebbian features do not beat raw pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import Blocks
from nnarena.registry import register
from nnarena.rules.base import LearningRule, RuleCapabilities, set_grad
from nnarena.rules.blockwise import run_blockwise

__all__ = ["SoftHebb", "softhebb_update"]


def softhebb_update(w: torch.Tensor, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """The batch mean of SoftHebb's ``dW_k = y_k (x - u_k W_k)``, ``y = softmax(W x / T)``.

    Args:
        w: weights, ``(out_features, in_features)``.
        x: inputs, ``(batch, in_features)``.
        temperature: softmax temperature ``T`` of the lateral inhibition.
    """
    u = x @ w.t()
    y = torch.softmax(u / temperature, dim=1)
    return (y.t() @ x - (y * u).sum(0).unsqueeze(1) * w) / x.shape[0]


def _linear_of(block: nn.Module, index: int) -> nn.Linear:
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise IncompatibleError(f"rule 'hebbian' needs one nn.Linear per block; block {index} "
                                f"has {len(linears)}; use an mlp model with layer='linear'")
    return linears[0]


@register("rule", "hebbian", paper="Hebbian Deep Learning Without Feedback",
          summary="SoftHebb: soft winner-take-all Hebbian hidden layers, readout trained by "
                  "the task loss.")
class SoftHebb(LearningRule):
    """SoftHebb hidden layers (no feedback) plus a linear readout trained by the task loss.

    Args:
        temperature: softmax temperature of the soft winner-take-all.

    Raises:
        ConfigError: ``temperature`` is not positive.
    """

    capabilities = RuleCapabilities(needs_blocks=True, supports_conv=False)

    def __init__(self, temperature: float = 0.003) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"rule 'hebbian' temperature must be > 0, got {temperature}")
        self.temperature = temperature

    @override
    def check(self, model: nn.Module) -> None:
        super().check(model)
        for index, block in enumerate(cast(Blocks, model).blocks):
            _linear_of(block, index)

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        blocks = cast(Blocks, model)
        linears = [_linear_of(block, i) for i, block in enumerate(blocks.blocks)]
        inputs: list[torch.Tensor] = []  # each linear layer's input, then the head's

        def hebbian(index: int, _out: torch.Tensor) -> None:
            update = softhebb_update(linears[index].weight.detach(), inputs[index],
                                     self.temperature)
            set_grad(linears[index], "weight", -update)

        def readout(_out: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():  # the head's graph only: the blocks ran without one
                return self.criterion(blocks.head(inputs[-1]), y)

        with torch.no_grad(), _capture_inputs([*linears, blocks.head], inputs):
            _, losses = run_blockwise(blocks, x, hebbian, head=readout)
        return {"loss": losses[-1]}


@contextmanager
def _capture_inputs(modules: list[nn.Module], inputs: list[torch.Tensor]) -> Iterator[None]:
    """Append each module's (detached) input to ``inputs`` while the context is open."""
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.append(args[0].detach())

    handles = [module.register_forward_pre_hook(hook) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
