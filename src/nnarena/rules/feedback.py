"""Feedback layers: Linear and Conv layers whose backward sends the error down through a separate
matrix ``B`` instead of the forward weight's transpose.

The forward pass is the plain layer's. In backward, the gradient for the layer's *input* is the
output gradient times ``B`` (``grad @ B`` for Linear, the transposed convolution with ``B`` for
Conv); the weight and bias gradients are the usual ones. ``B`` comes from a `FeedbackBank`:

* ``random``: a fixed random matrix drawn like PyTorch's default forward init (Kaiming uniform
  with ``a = sqrt(5)``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), as in feedback alignment;
* ``sign``: ``sign(W) * mean(|W|)`` of the *current* weight, recomputed at every backward, as in
  sign-concordant feedback (the scale keeps the backward signal at backprop's magnitude).

`convert(model, rule, mode)` turns every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` of a
model into its feedback form in place, by switching the module's class: the very same Parameter
objects stay, and the model's ``state_dict`` keys do not change. The bank (random matrices as
buffers) lives in ``rule.owned["feedback"]``, so ``rule.state_dict()`` and checkpoints carry it;
convert before loading a checkpoint into the rule. Only these layer types are converted:
normalisation, attention mixing, pooling and residual sums still backpropagate exactly, and KAN
layers (which carry their own nonlinearity) are rejected rather than left half-converted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from nnarena.errors import ConfigError, IncompatibleError

if TYPE_CHECKING:
    from nnarena.rules.base import LearningRule

__all__ = [
    "FeedbackBank",
    "FeedbackConv1d",
    "FeedbackConv2d",
    "FeedbackLayer",
    "FeedbackLinear",
    "FeedbackMode",
    "check_convertible",
    "conv_with_feedback",
    "convert",
    "linear_with_feedback",
    "sign_feedback",
]

FeedbackMode = Literal["random", "sign"]


def sign_feedback(weight: torch.Tensor) -> torch.Tensor:
    """Sign-concordant feedback: ``sign(W)`` scaled by ``mean(|W|)`` (same L1 norm as ``W``)."""
    return torch.sign(weight) * weight.abs().mean()


class FeedbackBank(nn.Module):
    """The feedback matrices of one converted model, one buffer per layer (none for ``sign``).

    Args:
        mode: ``random`` (fixed random matrices) or ``sign`` (computed from the current weight).
    """

    def __init__(self, mode: FeedbackMode) -> None:
        super().__init__()
        if mode not in get_args(FeedbackMode):
            raise ConfigError(f"feedback mode '{mode}' is unknown; valid: "
                              f"{', '.join(get_args(FeedbackMode))}")
        self.mode = mode

    def add(self, key: str, weight: torch.Tensor) -> None:
        """Create the feedback for a layer with forward weight ``weight``."""
        if self.mode == "random":
            matrix = torch.empty_like(weight, requires_grad=False)
            nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
            self.register_buffer(key, matrix)

    def matrix(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """``B`` for the layer ``key`` whose current forward weight is ``weight``."""
        if self.mode == "sign":
            return sign_feedback(weight)
        return self.get_buffer(key).to(weight)


class _Feedback:
    """A converted layer's handle on its bank; a plain object, so the bank is no submodule of
    the model and the model's ``state_dict`` keys stay as they were."""

    __slots__ = ("bank", "key")

    def __init__(self, bank: FeedbackBank, key: str) -> None:
        self.bank, self.key = bank, key

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.bank.matrix(self.key, weight)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                feedback: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, feedback(weight))
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, matrix = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad @ matrix if need_x else None
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = flat.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        grad_b = flat.sum(0) if need_b else None
        return grad_x, grad_w, grad_b, None


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                feedback: Callable[[torch.Tensor], torch.Tensor], stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], groups: int
                ) -> torch.Tensor:
        ctx.save_for_backward(x, feedback(weight))
        ctx.has_bias = bias is not None
        ctx.conv = (stride, padding, dilation, groups)
        return torch.convolution(x, weight, bias, stride, padding, dilation, False,
                                 [0] * len(stride), groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, matrix = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # The input gradient of a convolution is linear in the weight it is given and the weight
        # gradient does not depend on it, so one call with B in W's place gives all three.
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, matrix, [matrix.shape[0]] if ctx.has_bias else None, stride, padding,
            dilation, False, [0] * len(stride), groups, [need_x, need_w, need_b and ctx.has_bias])
        return grad_x, grad_w, grad_b, None, None, None, None, None


def linear_with_feedback(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         feedback: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose input gradient is ``grad @ feedback(weight)``; the
    weight and bias gradients are the true ones. ``feedback`` runs once, in the forward."""
    return _LinearFn.apply(x, weight, bias, feedback)


def conv_with_feedback(conv: nn.modules.conv._ConvNd, x: torch.Tensor,
                       feedback: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``conv(x)`` whose input gradient uses ``feedback(conv.weight)`` in the weight's place;
    the weight and bias gradients are the true ones."""
    padding = conv.padding
    if conv.padding_mode != "zeros" or isinstance(padding, str):
        # as nn.ConvNd does for these paddings: pad explicitly, then convolve unpadded
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(conv.kernel_size)
    return _ConvFn.apply(x, conv.weight, conv.bias, feedback, conv.stride, padding,
                         conv.dilation, conv.groups)


class FeedbackLayer:
    """Marks a converted layer; ``feedback`` maps its current weight to its ``B``."""

    feedback: _Feedback


class FeedbackLinear(FeedbackLayer, nn.Linear):
    """``nn.Linear`` whose input gradient is ``grad @ B``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_with_feedback(x, self.weight, self.bias, self.feedback)


class _FeedbackConv(FeedbackLayer, nn.modules.conv._ConvNd):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_with_feedback(self, x, self.feedback)


class FeedbackConv1d(_FeedbackConv, nn.Conv1d):
    """``nn.Conv1d`` whose input gradient is the transposed convolution with ``B``."""


class FeedbackConv2d(_FeedbackConv, nn.Conv2d):
    """``nn.Conv2d`` whose input gradient is the transposed convolution with ``B``."""


_CONVERTED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: FeedbackLinear, nn.Conv1d: FeedbackConv1d, nn.Conv2d: FeedbackConv2d}


def check_convertible(model: nn.Module, rule_name: str) -> None:
    """Raise `IncompatibleError` unless ``model`` has layers to convert and nothing that a
    conversion would silently miss (KAN layers, ``nn.MultiheadAttention``)."""
    for name, module in model.named_modules():
        if getattr(module, "nonlinear", False):
            raise IncompatibleError(
                f"rule '{rule_name}' replaces the backward of nn.Linear/nn.Conv1d/nn.Conv2d "
                f"only, and '{name}' is a KAN layer ({type(module).__name__}), which it does "
                "not convert; use layer='linear'")
        if isinstance(module, nn.MultiheadAttention):
            raise IncompatibleError(
                f"rule '{rule_name}' cannot convert nn.MultiheadAttention ('{name}'), whose "
                "projections bypass their forward; use nnarena's attention layers")
    if not any(isinstance(m, tuple(_CONVERTED)) for m in model.modules()):
        raise IncompatibleError(f"rule '{rule_name}' needs nn.Linear, nn.Conv1d or nn.Conv2d "
                                "layers, and the model has none; use layer='linear'")


def convert(model: nn.Module, rule: LearningRule, mode: FeedbackMode) -> list[str]:
    """Turn every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` of ``model`` into its feedback form,
    in place, with its feedback in ``rule.owned["feedback"]``; return the converted layer names.

    Parameters and ``state_dict`` keys are unchanged. Converting again for the same rule changes
    nothing (the feedback is kept).

    Raises:
        IncompatibleError: ``model`` cannot be converted (see `check_convertible`), a layer is a
            subclass of a supported type, or was converted for another rule or mode.
    """
    check_convertible(model, rule.name)
    if "feedback" not in rule.owned:
        rule.owned["feedback"] = FeedbackBank(mode)
    bank = rule.owned["feedback"]
    if not isinstance(bank, FeedbackBank) or bank.mode != mode:
        raise IncompatibleError(f"rule '{rule.name}' already holds other feedback state; use a "
                                "fresh rule")
    names = []
    for name, module in model.named_modules():
        if isinstance(module, FeedbackLayer):
            if module.feedback.bank is not bank:
                raise IncompatibleError(f"layer '{name}' was converted for another feedback "
                                        f"rule; build a fresh model for rule '{rule.name}'")
            names.append(name)
            continue
        if not isinstance(module, tuple(_CONVERTED)):
            continue
        target = _CONVERTED.get(type(module))
        if target is None:
            raise IncompatibleError(
                f"layer '{name}' is a {type(module).__name__}, a subclass the feedback form "
                "cannot replace; convert plain nn.Linear/nn.Conv1d/nn.Conv2d layers (and "
                "before adding parametrizations such as sparsity masks)")
        key = name.replace(".", "/") or "self"
        bank.add(key, module.weight)
        module.__class__ = target
        module.feedback = _Feedback(bank, key)  # type: ignore[assignment]
        names.append(name)
    return names
