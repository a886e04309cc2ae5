"""Direct Feedback Alignment: each block learns from the output error sent through a fixed random
matrix, straight from the output, instead of the error backpropagated through the layers above.

Paper: "Direct Feedback Alignment Provides Learning in Deep Neural Networks" (Nøkland, NeurIPS
2016, arXiv:1609.01596). With ``e = dL/d(output)``, block l's output ``h_l`` receives the
gradient ``B_l e`` (reshaped to ``h_l``'s shape, so conv feature maps and sequences work too);
autograd inside the block applies ``f'(a_l)`` and the weight gradient, giving the paper's
``δa_l = (B_l e) ⊙ f'(a_l)``. The head learns from the true loss.

Two forms, the same gradients:

* ``two-pass`` (default): a forward pass without a graph gives ``e``; a second pass runs the model
  block by block (`run_blockwise`), giving each block ``(h_l, B_l e)`` and freeing its graph
  before the next block, so the peak saved memory is one block's whatever the depth. The first
  pass replays exactly in the second: the RNG is forked (same dropout masks) and the model's
  buffers (batch-norm running statistics) are restored.
* ``one-pass``: one forward keeping the whole graph and one backward; `replace_grad` at each
  block's output swaps the gradient arriving from above for ``B_l e``, with ``e`` read off the
  output during that same backward. Memory as backprop's.

Deviations: the unit that receives ``B_l e`` is a block (for a cnn: conv, norm, activation and
pooling), not each layer, and gradients inside a block are exact; the feedback matrices are
Kaiming-uniform (bound ``sqrt(6 / size of h_l)``), as in the DRTP authors' reference code; the
Trainer's optimizer applies the gradients, not the paper's SGD settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError
from nnarena.models import Blocks
from nnarena.registry import register
from nnarena.rules.base import LearningRule, RuleCapabilities
from nnarena.rules.blockwise import replace_grad, run_blockwise

__all__ = ["DFA", "DirectFeedback"]

Mode = Literal["two-pass", "one-pass"]
_MODES = ("two-pass", "one-pass")


class DirectFeedback(nn.Module):
    """Fixed random matrices, one per block, sending a per-example vector to a block's output.

    Buffer ``b{l}`` has shape ``(signal size, numel of block l's output)`` (it holds the paper's
    ``B_l`` transposed); ``self(l, s)`` is ``s @ b{l}`` reshaped to block l's output shape, and
    ``self.read(l, h)`` maps the other way.

    Args:
        shapes: each block's output shape for one example.
        n_signal: size of the vector sent (the model's outputs or classes).
        unit: entries of unit variance, ``U(-sqrt(3), sqrt(3))``, instead of Kaiming-uniform's
            ``U(-sqrt(6 / numel), sqrt(6 / numel))``.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], n_signal: int, unit: bool = False
                 ) -> None:
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        self.n_signal = n_signal
        for index, shape in enumerate(self.shapes):
            matrix = torch.empty(n_signal, math.prod(shape))
            if unit:
                nn.init.uniform_(matrix, -math.sqrt(3), math.sqrt(3))
            else:
                nn.init.kaiming_uniform_(matrix)
            self.register_buffer(f"b{index}", matrix)

    @classmethod
    def for_model(cls, model: Blocks, x: torch.Tensor, unit: bool = False) -> DirectFeedback:
        """Matrices from ``model``'s outputs to its blocks, shapes found by an eval-mode pass on
        ``x``."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            features, out = model.forward_intermediates(x)
        model.train(was_training)
        return cls([tuple(h.shape[1:]) for h in features], out.shape[1], unit).to(x.device)

    def matrix(self, index: int) -> torch.Tensor:
        return self.get_buffer(f"b{index}")

    def forward(self, index: int, signal: torch.Tensor) -> torch.Tensor:
        return (signal @ self.matrix(index)).view(-1, *self.shapes[index])

    def read(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """The other way: block l's output ``h`` (flattened) to the signal's space."""
        return h.flatten(1) @ self.matrix(index).T


@contextmanager
def _replayed(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run a pass that leaves no trace: RNG state (dropout) and model buffers are restored."""
    buffers = [b.clone() for b in model.buffers()]
    cuda = [] if device.type != "cuda" else [
        device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        yield
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers, strict=True):
            b.copy_(saved)


@register("rule", "dfa",
          paper="Direct Feedback Alignment Provides Learning in Deep Neural Networks",
          summary="Direct Feedback Alignment: the output error through fixed random matrices "
                  "to every block.")
class DFA(LearningRule):
    """Direct Feedback Alignment.

    Args:
        mode: ``two-pass`` (block by block, memory flat in depth) or ``one-pass`` (one graph,
            `replace_grad` at block outputs).
    """

    capabilities = RuleCapabilities(needs_blocks=True)

    def __init__(self, mode: Mode = "two-pass") -> None:
        super().__init__()
        if mode not in _MODES:
            raise ConfigError(f"rule 'dfa' mode '{mode}' is unknown; valid: {', '.join(_MODES)}")
        self.mode = mode

    @override
    def prepare(self, model: nn.Module, example_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.owned["feedback"] = DirectFeedback.for_model(model, example_batch[0])

    @property
    def feedback(self) -> DirectFeedback:
        return self.owned["feedback"]

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        if self.mode == "one-pass":
            return self._one_pass(model, x, y)
        with _replayed(model, x.device), torch.no_grad():
            out = model(x)
        out = out.detach().requires_grad_()
        (error,) = torch.autograd.grad(self.criterion(out, y), out)
        _, losses = run_blockwise(model, x, lambda i, h: (h, self.feedback(i, error)),
                                  head=lambda o: self.criterion(o, y))
        return {"loss": losses[-1]}

    def _one_pass(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        seen: dict[str, torch.Tensor] = {}
        h = x
        for index, block in enumerate(model.blocks):
            h = replace_grad(block(h), lambda i=index: self.feedback(i, seen["error"]))
        out = model.head(h)
        out.register_hook(lambda g: seen.update(error=g))
        loss = self.criterion(out, y)
        loss.backward()
        return {"loss": loss.item()}
