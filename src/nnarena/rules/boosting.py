"""Boosting rules that build a network stage by stage, without end-to-end backprop.

``gb-sequential`` -- "Sequential Training of Neural Networks with Gradient Boosting"
(Emami & Martínez-Muñoz). The output bias starts at the loss-minimising constant (log class
priors for cross-entropy, the mean for MSE). Stage ``t`` computes the pseudo-residuals ``-dL/dF``
of the current ensemble output ``F`` and fits a fresh block of ``J`` hidden units plus its output
weights to them (mean squared error, a short inner loop with the Trainer's optimizer, lr and
batch size); ``F`` grows by ``shrinkage`` times the block's output times the line-search step
``argmin_rho L(F + rho h_t)`` (Newton's method; exact for MSE), as in Friedman's gradient
boosting. The ``T`` blocks are then written into the model, an mlp with one hidden layer of width
``T*J``: the hidden layer is the blocks' units side by side, the head their (scaled) output
weights, the head bias the initial constant plus every block's output bias.
``inference_blocks = k`` switches the last ``T-k`` blocks off at prediction (anytime inference).
The Trainer's ``epochs`` budget is not used (``epochs_per_block`` is); its lr matters: 1e-2 suits
digits, while on 784 inputs 1e-2 kills the few ReLUs of a block and 1e-3 is needed.

``rfrboost`` -- "Random Feature Representation Boosting" (Zozoulenko, Cass, Lemercier et al.).
The model is ``rfr-resnet`` (registered here): a linear stem ``x_0`` (the identity when its width
equals the input size), residual blocks ``x_{t+1} = x_t + A_t f_t(x_t)`` with ``f_t = act(U_t x
+ c_t)`` random and untrained (``U_t``, ``c_t`` drawn by the builder), and a linear head. The
gradient-boosting variant of the paper is implemented, all in closed form: the top layer ``W`` is
fitted by ridge regression on ``x_t``; the functional gradient ``G = (Y - x_t W) W^T`` of the
squared loss is regressed on ``f_t(x_t)`` by ridge least squares, giving ``A_t``; the step along
it is the exact line search of the squared loss (times the learning rate ``eta``), folded into
``A_t``; finally the head is refitted by ridge regression. Deviation: classification uses the
squared loss on one-hot targets (the paper's classifier uses a logistic top layer and the
cross-entropy functional gradient).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.layers import create_act
from nnarena.models import Blocks
from nnarena.models.resnet import Residual
from nnarena.registry import register
from nnarena.rules.base import LearningRule, RuleCapabilities

if TYPE_CHECKING:
    from nnarena.data import DataBundle
    from nnarena.train.trainer import Trainer

__all__ = ["GBSequential", "RFRBoost", "rfr_resnet", "ridge"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class _Buffer(nn.Module):
    """One rule-owned tensor, kept in ``self.owned`` so checkpoints hold it."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)


def _no_step(name: str) -> IncompatibleError:
    return IncompatibleError(f"rule '{name}' is closed-form: it trains through fit() (the Trainer "
                             "calls it), not step()")


def _targets(task: str, y: torch.Tensor, n_outputs: int) -> torch.Tensor:
    """Float targets: one-hot for classification, ``y`` for regression."""
    return F.one_hot(y, n_outputs).float() if task == "classification" else y.float()


def ridge(features: torch.Tensor, targets: torch.Tensor, l2: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``argmin_{W,b} mean ||targets - features W - b||^2 + l2 ||W||^2`` in closed form.

    Returns ``(W, b)`` with ``W`` of shape ``(features, targets)``; the intercept is not penalised.
    """
    mu_x, mu_y = features.mean(0), targets.mean(0)
    xc, yc = features - mu_x, targets - mu_y
    gram = xc.T @ xc + l2 * len(features) * torch.eye(xc.shape[1], dtype=xc.dtype)
    weight = torch.linalg.solve(gram, xc.T @ yc) if l2 > 0 else torch.linalg.lstsq(xc, yc).solution
    return weight, mu_y - mu_x @ weight


# ---------------------------------------------------------------------------- gb-sequential


@register("rule", "gb-sequential",
          paper="Sequential Training of Neural Networks with Gradient Boosting",
          summary="Gradient boosting of blocks of hidden units, merged into one hidden layer.")
class GBSequential(LearningRule):
    """Gradient-boosted one-hidden-layer net: ``T = width / units_per_block`` stages.

    Args:
        units_per_block: hidden units ``J`` fitted per stage; the model's hidden width must be a
            multiple of it.
        epochs_per_block: inner passes over the training set fitting each block.
        shrinkage: factor on each block's output (the boosting learning rate).
        inference_blocks: blocks used at prediction (``None``: all); may be changed after fit.
    """

    capabilities = RuleCapabilities(supports_conv=False, closed_form=True)

    def __init__(self, units_per_block: int = 8, epochs_per_block: int = 20,
                 shrinkage: float = 0.3, inference_blocks: int | None = None) -> None:
        super().__init__()
        for key, value in (("units_per_block", units_per_block),
                           ("epochs_per_block", epochs_per_block), ("shrinkage", shrinkage)):
            if not value > 0:
                raise ConfigError(f"gb-sequential {key} must be > 0, got {value}")
        self.units_per_block = units_per_block
        self.epochs_per_block = epochs_per_block
        self.shrinkage = shrinkage
        self.inference_blocks = inference_blocks

    @override
    def check(self, model: nn.Module) -> None:
        super().check(model)
        self._layers(model)

    def _layers(self, model: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear]:
        """The hidden linear layer, the activation after it and the head; errors otherwise."""
        hint = ("gb-sequential trains an mlp with one hidden layer (model 'mlp', depth=1, "
                "layer='linear', no norm)")
        if not isinstance(model, Blocks) or len(model.blocks) != 1:
            depth = len(model.blocks) if isinstance(model, Blocks) else "?"
            raise IncompatibleError(f"{hint}; got {depth} hidden layers")
        parts = [m for m in model.blocks[0] if not isinstance(m, (nn.Flatten, nn.Identity))]
        if (not parts or type(parts[0]) is not nn.Linear or type(model.head) is not nn.Linear
                or any(isinstance(m, (nn.Linear, *_NORMS)) for m in parts[1:])):
            raise IncompatibleError(f"{hint}; got block {model.blocks[0]}")
        width = parts[0].out_features
        if width % self.units_per_block:
            raise IncompatibleError(
                f"gb-sequential builds a hidden layer of blocks x units_per_block units; width "
                f"{width} is not a multiple of units_per_block={self.units_per_block} (use e.g. "
                f"width={self.units_per_block * max(1, round(width / self.units_per_block))})")
        return parts[0], nn.Sequential(*parts[1:]), model.head

    @property
    def n_blocks(self) -> int:
        return self.owned["offsets"].value.shape[0] - 1

    @override
    def prepare(self, model: nn.Module, example_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        hidden, _, head = self._layers(model)
        n_blocks = hidden.out_features // self.units_per_block
        self.owned["offsets"] = _Buffer(torch.zeros(n_blocks + 1, head.out_features))

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        raise _no_step(self.name)

    def pseudo_residuals(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``-dL/dF`` per example: ``onehot - softmax(F)`` or ``y - F``."""
        if self.task == "classification":
            return target - output.softmax(-1)
        return target - output

    def line_search(self, output: torch.Tensor, update: torch.Tensor, y: torch.Tensor,
                    newton_steps: int = 10) -> float:
        """``argmin_rho L(output + rho * update)`` by Newton's method from 1 (exact for MSE)."""
        rho = torch.ones((), dtype=output.dtype, device=output.device, requires_grad=True)
        for _ in range(newton_steps):
            loss = self.criterion(output + rho * update, y)
            (grad,) = torch.autograd.grad(loss, rho, create_graph=True)
            (hess,) = torch.autograd.grad(grad, rho)
            rho = (rho - grad / hess.clamp_min(1e-12)).detach().requires_grad_()
        return rho.item()

    @override
    def fit(self, trainer: Trainer, model: nn.Module, data: DataBundle) -> dict[str, Any]:
        hidden, act, head = self._layers(model)
        device = hidden.weight.device
        x = data.train.x.to(device).flatten(1)
        target = _targets(self.task, data.train.y.to(device), head.out_features)
        if self.task == "classification":
            base = target.mean(0).clamp_min(1e-6).log()
        else:
            base = target.mean(0)
        output = base.expand_as(target).clone()
        offsets = [base]
        weights, biases, heads = [], [], []
        generator = torch.Generator().manual_seed(trainer.seed)
        for _ in range(self.n_blocks):
            residual = self.pseudo_residuals(output, target)
            layer = nn.Linear(x.shape[1], self.units_per_block).to(device)
            out = nn.Linear(self.units_per_block, head.out_features).to(device)
            block = nn.Sequential(layer, act, out)
            self._fit_block(trainer, block, x, residual, generator)
            with torch.no_grad():
                update = block(x)
            scale = self.shrinkage * self.line_search(output, update, data.train.y.to(device))
            output += scale * update
            weights.append(layer.weight.detach())
            biases.append(layer.bias.detach())
            heads.append(scale * out.weight.detach())
            offsets.append(scale * out.bias.detach())
        with torch.no_grad():
            hidden.weight.copy_(torch.cat(weights))
            hidden.bias.copy_(torch.cat(biases))
            head.weight.copy_(torch.cat(heads, 1))
            head.bias.copy_(torch.stack(offsets).sum(0))
            self.owned["offsets"].value.copy_(torch.stack(offsets))
        trainer.epoch = 1
        return {"train_loss": self.criterion(output, data.train.y.to(device)).item(),
                "blocks": self.n_blocks}

    def _fit_block(self, trainer: Trainer, block: nn.Module, x: torch.Tensor,
                   residual: torch.Tensor, generator: torch.Generator) -> None:
        """A few epochs of the Trainer's optimizer on ``mse(block(x), residual)``."""
        from nnarena.train.optim import create_optimizer  # nnarena.train imports the rules

        params = list(block.parameters())
        optimizer = create_optimizer(trainer.optimizer_name, params, **trainer.optimizer_kwargs)
        n, batch = len(x), trainer.batch_size
        for _ in range(self.epochs_per_block):
            order = torch.randperm(n, generator=generator).to(x.device)
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                optimizer.zero_grad(set_to_none=True)
                F.mse_loss(block(x[idx]), residual[idx]).backward()
                optimizer.step()
                trainer.step += 1

    @override
    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        k = self.inference_blocks
        if k is None or k >= self.n_blocks:
            return model(x)
        if k < 0:
            raise ConfigError(f"gb-sequential inference_blocks must be >= 0, got {k}")
        hidden, act, head = self._layers(model)
        units = k * self.units_per_block
        h = act(hidden(x.flatten(1)))[:, :units]
        return h @ head.weight[:, :units].T + self.owned["offsets"].value[:k + 1].sum(0)


# ---------------------------------------------------------------------------- rfrboost


_RFR_CAPABILITIES = RuleCapabilities(supports_conv=False, closed_form=True)


@register("model", "rfr-resnet", capabilities={"conv": False},
          summary="Residual random-feature network (stem, x + A f(x) blocks, linear head).")
def rfr_resnet(
    input_shape: tuple[int, ...],
    n_outputs: int,
    width: int | None = None,
    depth: int = 5,
    features: int = 256,
    act: str = "tanh",
) -> Blocks:
    """Residual random-feature net for `RFRBoost`: ``head(x_T)``, ``x_{t+1} = x_t + A_t f_t(x_t)``.

    Args:
        input_shape: shape of one example (flattened).
        n_outputs: classes or regression outputs.
        width: representation size; ``None``: the input size, with an identity stem.
        depth: number of residual random-feature blocks.
        features: random features per block.
        act: activation of the random features.
    """
    d_in = math.prod(input_shape)
    width = d_in if width is None else width
    stem = nn.Linear(d_in, width)
    if width == d_in:
        with torch.no_grad():
            stem.weight.copy_(torch.eye(d_in))
            stem.bias.zero_()
    blocks: list[nn.Module] = [nn.Sequential(nn.Flatten(), stem)]
    for _ in range(depth):
        random_features = nn.Linear(width, features)
        with torch.no_grad():
            random_features.weight.normal_(0.0, width ** -0.5)
            random_features.bias.normal_(0.0, 1.0)
        blocks.append(Residual(nn.Sequential(random_features, create_act(act),
                                             nn.Linear(features, width))))
    return Blocks(blocks, nn.Linear(width, n_outputs))


@register("rule", "rfrboost", paper="Random Feature Representation Boosting",
          summary="Residual random-feature network built by closed-form gradient boosting.",
          capabilities={**asdict(_RFR_CAPABILITIES), "models": ["rfr-resnet"]})
class RFRBoost(LearningRule):
    """Gradient RFRBoost on an ``rfr-resnet`` model, every solve in closed form.

    Args:
        eta: learning rate on each block's line-searched step.
        l2_features: ridge penalty fitting ``A_t`` to the functional gradient.
        l2_top: ridge penalty of the top linear layer.
    """

    capabilities = _RFR_CAPABILITIES

    def __init__(self, eta: float = 1.0, l2_features: float = 0.1, l2_top: float = 0.1
                 ) -> None:
        super().__init__()
        for key, value in (("eta", eta), ("l2_features", l2_features), ("l2_top", l2_top)):
            if not value >= 0:
                raise ConfigError(f"rfrboost {key} must be >= 0, got {value}")
        self.eta, self.l2_features, self.l2_top = eta, l2_features, l2_top

    @override
    def check(self, model: nn.Module) -> None:
        super().check(model)
        ok = (isinstance(model, Blocks) and len(model.blocks) >= 1
              and [type(m) for m in model.blocks[0]] == [nn.Flatten, nn.Linear]
              and type(model.head) is nn.Linear
              and all(isinstance(b, Residual) and len(b.body) == 3
                      and type(b.body[0]) is nn.Linear and type(b.body[2]) is nn.Linear
                      for b in model.blocks[1:]))
        if not ok:
            raise IncompatibleError("rule 'rfrboost' trains the residual random-feature network "
                                    "of model 'rfr-resnet'; build the model with it")

    @override
    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        raise _no_step(self.name)

    def boost_block(self, block: Residual, x: torch.Tensor, target: torch.Tensor
                    ) -> torch.Tensor:
        """Fit ``block``'s ``A_t`` at representation ``x``; return ``x_{t+1}``."""
        top, top_bias = ridge(x, target, self.l2_top)
        residual = target - x @ top - top_bias
        gradient = residual @ top.T  # -dL/dx of 1/2 ||Y - x W - b||^2, per example
        with torch.no_grad():
            feats = block.body[1](block.body[0](x))
        a, a0 = ridge(feats, gradient, self.l2_features)
        direction = feats @ a + a0
        moved = direction @ top
        step = (residual * moved).sum() / (moved * moved).sum().clamp_min(1e-12)
        scale = self.eta * step
        out = block.body[2]
        with torch.no_grad():
            out.weight.copy_(scale * a.T)
            out.bias.copy_(scale * a0)
        return x + scale * direction

    @override
    def fit(self, trainer: Trainer, model: nn.Module, data: DataBundle) -> dict[str, Any]:
        assert isinstance(model, Blocks)
        device = model.head.weight.device
        target = _targets(self.task, data.train.y.to(device), model.head.out_features)
        with torch.no_grad():
            x = model.blocks[0](data.train.x.to(device))
            for block in model.blocks[1:]:
                x = self.boost_block(block, x, target)
            weight, bias = ridge(x, target, self.l2_top)
            model.head.weight.copy_(weight.T)
            model.head.bias.copy_(bias)
            loss = self.criterion(model.head(x), data.train.y.to(device)).item()
        trainer.epoch = 1
        return {"train_loss": loss, "blocks": len(model.blocks) - 1}
