"""The block runner and the gradient-replacing identity: what every non-backprop rule builds on.

`run_blockwise` trains a `Blocks` model block by block: each block runs on the previous output
*detached*, its local signal (a loss, or a gradient for its output) is backpropagated at once,
reaching only that block and whatever the signal used (an auxiliary head, a feedback matrix), and
its graph is freed before the next block runs. No gradient crosses a block boundary and the peak
saved-activation memory is one block's, whatever the depth. Local learning, forward-forward,
DRTP, tpSGD and two-pass DFA are this loop with different signals.

`replace_grad` is an identity whose backward ignores the incoming gradient and returns another
one, for rules that keep one autograd graph but replace what flows into a layer (one-pass DFA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nnarena.models import Blocks

__all__ = ["LocalSignal", "replace_grad", "run_blockwise"]

LocalSignal = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None
"""What a block's local step returns: a scalar loss, ``(output, gradient for it)``, or ``None``."""


def run_blockwise(
    model: Blocks,
    x: torch.Tensor,
    local: Callable[[int, torch.Tensor], LocalSignal],
    head: Callable[[torch.Tensor], LocalSignal] | None = None,
    between: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Forward ``model`` block by block, backpropagating each block's local signal at once.

    Args:
        model: the network; its blocks run in order, then its head.
        x: the input batch.
        local: ``(block index, block output) -> signal`` for each block.
        head: ``head output -> signal`` (``None``: the head is not trained here).
        between: applied to each detached block output before the next block (e.g. FF's
            length normalisation).

    Returns:
        The head's output (detached) and the local losses, in block order (head last), of the
        signals that were losses.
    """
    losses: list[torch.Tensor] = []
    h = x
    for index, block in enumerate(model.blocks):
        h = block(h)
        _backward(local(index, h), losses)
        h = h.detach()
        if between is not None:
            h = between(h)
    out = model.head(h)
    if head is not None:
        _backward(head(out), losses)
    return out.detach(), [float(v) for v in torch.stack(losses).tolist()] if losses else []


def _backward(signal: LocalSignal, losses: list[torch.Tensor]) -> None:
    if signal is None:
        return
    if isinstance(signal, tuple):
        output, grad = signal
        if output.requires_grad:
            output.backward(grad)
        return
    if signal.requires_grad:
        signal.backward()
    losses.append(signal.detach())


class _ReplaceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, grad: Any) -> torch.Tensor:
        ctx.grad = grad
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, _incoming: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = ctx.grad() if callable(ctx.grad) else ctx.grad
        return grad, None


def replace_grad(x: torch.Tensor,
                 grad: torch.Tensor | Callable[[], torch.Tensor]) -> torch.Tensor:
    """``x`` unchanged; in backward, ``grad`` (or ``grad()``, evaluated then) replaces the incoming
    gradient, so nothing from above ``x`` reaches below it."""
    return _ReplaceGrad.apply(x, grad)

