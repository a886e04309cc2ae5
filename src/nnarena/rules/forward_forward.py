"""Forward-forward learning, and its model-free form for physical networks.

``forward-forward``: "The Forward-Forward Algorithm: Some Preliminary Investigations" (Hinton,
arXiv:2212.13345). Each block is trained on its own to give high goodness to positive data (an
input with its true label embedded) and low goodness to negative data (the same input with a
wrong label): ``loss = softplus(threshold - g(pos)) + softplus(g(neg) - threshold)``. The input
of every block is length-normalised, so a block cannot pass its goodness on to the next one.
Inference embeds every label in turn and picks the one with the highest goodness accumulated over
the blocks; `predict` returns these accumulated goodnesses as class scores. The model's head is
neither trained nor used.

``ff-model-free``: "Backpropagation-free Training of Deep Physical Neural Networks" (Momeni et
al., arXiv:2304.11042). The same local objective trains the digital layers of a network in which
each block opens with a black-box physical layer (`nnarena.layers.BlackBox`, e.g. the
``physical-mlp`` model): the physical output is only measured, never differentiated, because the
goodness gradient of a block stops at the block's (detached) input. Putting the trainable layer
after the physical one (goodness measured on the digital output) is our reading of the paper's
architecture; the rule checks that layout and otherwise is forward-forward unchanged.

Implemented with `run_blockwise`: one block's graph at a time, positives and negatives in two
passes (the loss is a sum over examples, so the gradients are those of one joint batch, at half
the peak memory). Deviations: goodness is the *mean* (not the sum) of the squared activities, so one
threshold fits every width (the sum's threshold is ``threshold * width``); blocks are normalised
to unit root-mean-square rather than unit length, the same up to a constant factor per width;
the label is embedded by overwriting the first ``n_classes`` input features with a one-hot of
height ``label_scale`` (Hinton's supervised MNIST variant; concatenation would change the input
size the arena builds models for, and on MNIST these features are always-blank border pixels);
negatives use a wrong label drawn uniformly (or, with ``hard_negatives``, from the network's own
scores), never the true one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.layers import BlackBox
from nnarena.models import Blocks
from nnarena.registry import register
from nnarena.rules.base import LearningRule, RuleCapabilities
from nnarena.rules.blockwise import run_blockwise

__all__ = ["FFModelFree", "ForwardForward"]

_EPS = 1e-8


class _Labels(nn.Module):
    """The rule's state: how many classes the labels embedded in the input range over."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("n_classes", torch.tensor(0))


@register("rule", "forward-forward",
          paper="The Forward-Forward Algorithm: Some Preliminary Investigations",
          summary="Each block scores label-embedded positives above negatives by its goodness.")
class ForwardForward(LearningRule):
    """Forward-forward: each block separates positive from negative data by its goodness.

    Defaults were tuned on mnist5k (MLP 784-256-256, 15 epochs, batch 64) with Adam at lr 3e-3.

    Args:
        threshold: goodness (mean squared activity) that separates positive from negative data.
        label_scale: height of the one-hot label written over the first input features.
        hard_negatives: draw each wrong label in proportion to the softmax of the network's own
            goodness scores (Hinton's hard negatives; one extra inference pass per step) instead
            of uniformly.
    """

    capabilities = RuleCapabilities(needs_blocks=True, supports_conv=False,
                                    supports_regression=False)

    def __init__(self, threshold: float = 2.0, label_scale: float = 3.0,
                 hard_negatives: bool = False) -> None:
        super().__init__()
        if threshold <= 0:
            raise ConfigError(f"forward-forward threshold must be > 0, got {threshold}")
        self.threshold = threshold
        self.label_scale = label_scale
        self.hard_negatives = hard_negatives
        self.owned["labels"] = _Labels()

    @override
    def check(self, model: nn.Module) -> None:
        super().check(model)
        if not _as_blocks(model).blocks:
            raise IncompatibleError(f"rule '{self.name}' trains blocks by their goodness, and this "
                                    "model has none; use a model with depth >= 1")

    @property
    def n_classes(self) -> int:
        return int(self.owned["labels"].n_classes)

    @override
    def prepare(self, model: nn.Module, example_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x = example_batch[0]
        was_training = model.training
        model.eval()  # a shape probe: no batch-norm statistics updated
        with torch.no_grad():
            n_classes = model(x[:1]).shape[-1]
        model.train(was_training)
        if n_classes < 2 or n_classes > x[0].numel():
            raise IncompatibleError(
                f"rule '{self.name}' embeds the label in the input: needs 2 to {x[0].numel()} "
                f"classes (the input size), got {n_classes}")
        self.owned["labels"].n_classes.fill_(n_classes)

    def embed(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Flattened ``x`` with its first ``n_classes`` features replaced by one-hot ``labels``."""
        out = x.flatten(1).clone()
        out[:, :self.n_classes] = 0.0
        out[torch.arange(len(out), device=out.device), labels] = self.label_scale
        return out

    def wrong_labels(self, y: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """A label other than ``y`` per example: uniform, or by the softmax of class ``scores``."""
        if scores is None:
            shift = torch.randint(1, self.n_classes, y.shape, device=y.device)
            return (y + shift) % self.n_classes
        scores = scores.masked_fill(F.one_hot(y, self.n_classes).bool(), -torch.inf)
        return torch.multinomial(torch.softmax(scores, 1), 1).squeeze(1)

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        scores = self.predict(model, x) if self.hard_negatives else None
        wrong = self.wrong_labels(y, scores)
        loss = 0.0
        # The loss is a sum over examples, so positives and negatives can go in separate passes:
        # the same gradients, and each block's graph holds one batch, not two.
        for labels, sign in ((y, 1.0), (wrong, -1.0)):  # +1: goodness should exceed threshold

            def local(_index: int, h: torch.Tensor, sign: float = sign) -> torch.Tensor:
                return F.softplus(sign * (self.threshold - goodness(h))).mean() / 2

            _, losses = run_blockwise(_as_blocks(model), normalise(self.embed(x, labels)), local,
                                      between=normalise)
            loss += sum(losses) / len(losses)
        return {"loss": loss}

    @override
    @torch.no_grad()
    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Goodness summed over the blocks for each label embedded in ``x``: (batch, classes)."""
        n = self.n_classes
        labels = torch.arange(n, device=x.device).repeat(len(x))
        scores = torch.zeros(len(x) * n, device=x.device)

        def accumulate(_index: int, h: torch.Tensor) -> None:
            scores.add_(goodness(h))

        run_blockwise(_as_blocks(model), normalise(self.embed(x.repeat_interleave(n, 0), labels)),
                      accumulate, between=normalise)
        return scores.view(len(x), n)


@register("rule", "ff-model-free",
          paper="Backpropagation-free Training of Deep Physical Neural Networks",
          summary="Forward-forward on digital layers between black-box physical layers.")
class FFModelFree(ForwardForward):
    """Model-free forward-forward: digital layers trained around measured physical layers.

    Every `BlackBox` must open its block (before the block's trainable layers), so the goodness
    gradient never has to cross it; ``physical-mlp`` builds such models.
    """

    capabilities = RuleCapabilities(needs_blocks=True, supports_conv=False,
                                    supports_regression=False, supports_black_box=True)

    @override
    def check(self, model: nn.Module) -> None:
        super().check(model)
        for index, block in enumerate(_as_blocks(model).blocks):
            trainable_seen = False
            for module in block.modules():
                if isinstance(module, BlackBox) and trainable_seen:
                    raise IncompatibleError(
                        f"rule '{self.name}': block {index} has a BlackBox after trainable layers, "
                        "so its goodness gradient would have to cross the black box; open each "
                        "block with its BlackBox (as the 'physical-mlp' model does)")
                trainable_seen |= any(p.requires_grad for p in module.parameters(recurse=False))


def goodness(h: torch.Tensor) -> torch.Tensor:
    """Mean squared activity of each example."""
    return h.flatten(1).square().mean(1)


def normalise(h: torch.Tensor) -> torch.Tensor:
    """Each example scaled to unit root-mean-square (length ``sqrt(features)``)."""
    return h / (h.flatten(1).square().mean(1).sqrt() + _EPS).view(-1, *[1] * (h.dim() - 1))


def _as_blocks(model: nn.Module) -> Blocks:
    if not isinstance(model, Blocks):  # check() rejects this before training; predict may not
        raise IncompatibleError("forward-forward needs a Blocks model (model.blocks + model.head)")
    return model
