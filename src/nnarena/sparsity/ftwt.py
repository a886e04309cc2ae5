"""``ftwt``: "Fire Together Wire Together: A Dynamic Pruning Approach with Self-Supervised Mask
Prediction" (Elkerdawy, Elhoushi, Zhang, Ray; CVPR 2022).

The paper: dynamic (input-dependent) channel pruning. Every conv layer gets a small mask
predictor that reads the layer's input -- the previous layer's activations, pooled -- and outputs
one keep-logit per filter. The layer's output (after its norm and activation) is multiplied by the
binary prediction (logit > 0), so at inference only the predicted filters need computing. The
predictors are trained decoupled from the task: their input is detached and their own loss is a
binary cross-entropy against self-supervised targets, the top-k filters of the layer's output by
heatmap magnitude (``max |a|`` over positions), ``k`` chosen per input as the fewest filters
covering a fraction ``mass`` of the summed heatmaps. As the targets depend only on ``mass``, the
FLOPs reduction can be estimated before training by running the network with target masks.

Implemented, as a `Sparsifier` callback (the learning rule and its gradients are untouched):

- ``on_fit_start`` gates every Conv1d/2d/3d and Linear layer of the model except the last one (the
  output layer): a `MaskPredictor` becomes the submodule ``ftwt_predictor`` of the layer (so
  ``state_dict`` and `nnarena.checkpoint.save_weights` carry it), forward hooks are added, and the
  predictors join the trainer's optimizer as their own parameter group (``predictor_lr``, no
  weight decay). The mask multiplies the output of the layer's *unit*: the layer and the batch
  norms, element-wise activations and dropout right after it in its ``nn.Sequential``, so a
  masked filter is exactly zero downstream and skipping it is exact. Targets come from the unit
  output before masking.
- Training: for the first ``warmup`` fraction of the steps the unit output is masked with the
  targets, then with the predictions. Until ``cooldown`` (a fraction of the steps),
  ``on_after_backward`` back-propagates the predictor loss -- the mean over gated layers of the BCE
  summed over filters and averaged over the batch -- into the predictors only (their inputs are
  detached, their mask is hard: the task loss does not reach them); afterwards they are frozen.
- Evaluation always uses the predicted masks: the hooks stay on the model.
- ``on_fit_end`` adds, besides the base metrics (weight counts stay dense: this is not weight
  sparsity), on the test inputs: ``ftwt_kept_fraction`` (kept over gated filters, mean over
  inputs); ``ftwt_flops_per_sample``, realized: each Conv/Linear layer's multiply-add FLOPs (as
  ``flops_per_sample`` counts them) scaled per input by its kept output filters and by the input
  channels the previous gate closed, plus the predictors; ``ftwt_dense_flops_per_sample``;
  ``ftwt_flops_reduction``; ``ftwt_precision``/``ftwt_recall`` of the predicted masks against the
  targets; and ``ftwt_estimated_flops_reduction``, the same count on up to 512 training inputs
  with target masks and batch statistics, at ``on_fit_start`` before any step (no state changed).

Deviations: the authors start from a pretrained backbone and freeze the predictors halfway
(``cooldown`` 0.5); trained from scratch here, the backbone first learns under the target masks
(``warmup``) and the predictors keep learning to the end (``cooldown`` 1.0; 0.5 lost 0.5 point on
digits). Targets keep the fewest filters reaching ``mass`` (the authors' code keeps those whose
cumulative share stays below it: one filter fewer). The predictor is adaptive average pooling to
about ``embedding`` features (``round((embedding / C_in) ** (1 / d))`` per spatial dim, at most the
input's size; the authors' option, theirs defaulting to global pooling), then one linear map
(their 1x1 conv), without their optional softmax. Linear layers (MLPs; not in the paper) are
gated the same way, the predictor reading the input average-pooled to at most ``embedding``
features: as costly as the layer itself when the layer is that narrow, so an MLP saves no FLOPs.
Realized FLOPs are counted from the masks, not timed: the masked forward computes every filter.

Saving and loading: the predictors are parameters of the model, so ``save_weights`` writes them
(``<layer>.ftwt_predictor.weight`` and ``.bias``). A fresh model needs them attached, with the same
options and input shape, before the (strict) ``load_weights``::

    FTWT(embedding=128).attach(model, example_inputs)
    load_weights(path, model)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from nnarena.errors import ConfigError, IncompatibleError
from nnarena.registry import register
from nnarena.sparsity.base import Sparsifier

if TYPE_CHECKING:
    from nnarena.train.trainer import FitResult, Trainer

__all__ = ["FTWT", "MaskPredictor", "mass_targets"]

MaskSource = Literal["target", "predicted"]

_GATED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Modules after a gated layer that keep a zero channel zero: the mask goes after them.
_CHANNELWISE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Identity, nn.Dropout, nn.ReLU,
                nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid)
_POOLS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_MEASURE_BATCH = 512


def mass_targets(heat: torch.Tensor, mass: float) -> torch.Tensor:
    """Boolean ``(N, C)`` targets: in each row the fewest largest ``heat`` entries whose sum
    reaches ``mass`` of the row's total (entries of zero heat are never kept)."""
    values, order = heat.sort(dim=1, descending=True)
    before = values.cumsum(1) - values  # heat of the larger entries
    keep = (before < mass * values.sum(1, keepdim=True)) & (values > 0)
    return torch.zeros_like(keep).scatter(1, order, keep)


def _heat(y: torch.Tensor) -> torch.Tensor:
    """Heatmap magnitude of each filter, ``max |y|`` over positions: ``(N, C, ...) -> (N, C)``."""
    return y.detach().abs().flatten(2).amax(2) if y.dim() > 2 else y.detach().abs()


class MaskPredictor(nn.Module):
    """Layer input -> one keep-logit per filter: adaptive average pooling, then a linear map.

    Args:
        in_channels: input channels (conv) or features (linear) of the gated layer.
        out_channels: its filters (conv) or units (linear).
        pool: pooled size per spatial dim (conv), or the pooled length of the input (linear).
    """

    def __init__(self, in_channels: int, out_channels: int, pool: tuple[int, ...] | int) -> None:
        super().__init__()
        self.pool = pool
        features = in_channels * math.prod(pool) if isinstance(pool, tuple) else pool
        self.weight = nn.Parameter(torch.empty(out_channels, features))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.uniform_(self.weight, -features ** -0.5, features ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.pool, tuple):
            z = _POOLS[len(self.pool)](x, self.pool).flatten(1)
        else:
            z = x.flatten(1)
            if z.shape[1] != self.pool:
                z = F.adaptive_avg_pool1d(z.unsqueeze(1), self.pool).squeeze(1)
        return F.linear(z, self.weight, self.bias)

    def flops(self) -> int:
        """Multiply-add FLOPs per example (the pooling is not counted)."""
        return 2 * self.weight.numel()


@dataclass
class _Stats:
    """Sums over the examples of one `FTWT.measure`."""

    examples: int = 0
    flops: float = 0.0
    dense_flops: float = 0.0
    kept: float = 0.0
    filters: float = 0.0
    true_pos: float = 0.0
    predicted: float = 0.0
    targets: float = 0.0
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # unit -> FLOPs before gate


class _Unit:
    """One Conv/Linear layer: its FLOPs account and, unless it is the output layer, its gate.

    The gate's mask multiplies the output of ``point``: the layer itself or the last channel-wise
    module (norm, activation) after it.
    """

    def __init__(self, owner: FTWT, index: int, layer: nn.Module, point: nn.Module | None,
                 predictor: MaskPredictor | None, producer: _Unit | None) -> None:
        self.owner, self.index, self.layer = owner, index, layer
        self.point, self.predictor = point, predictor
        self.producer = producer  # the gated unit feeding this one: its closed channels are skipped
        self.logits: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # (N, C) bool, of the last forward

    @property
    def gated(self) -> bool:
        return self.predictor is not None

    def layer_hook(self, layer: nn.Module, args: tuple[torch.Tensor, ...],
                   output: torch.Tensor) -> torch.Tensor | None:
        x = args[0]
        if self.owner.stats is not None:
            self.owner.stats.pending[self.index] = self._dense_flops(output) * self._input_kept(x)
        if self.predictor is not None:
            with torch.set_grad_enabled(layer.training and self.owner.learning):
                self.logits = self.predictor(x.detach())
        if self.point is layer or self.predictor is None:
            return self.gate(output)
        return None

    def point_hook(self, point: nn.Module, args: tuple[torch.Tensor, ...],
                   output: torch.Tensor) -> torch.Tensor:
        return self.gate(output)

    def gate(self, y: torch.Tensor) -> torch.Tensor:
        """Mask the unit output ``y``; record the predictor's training pair and the counts."""
        owner, stats = self.owner, self.owner.stats
        if self.predictor is None:
            if stats is not None:
                stats.flops += float(stats.pending.pop(self.index).sum())
                stats.dense_flops += self._dense_flops(y) * len(y)
            return y
        assert self.logits is not None
        logits, self.logits = self.logits, None
        training = self.layer.training
        source = owner.source if training else "predicted"
        record = training and owner.learning
        targets = None
        if record or stats is not None or source == "target":
            targets = mass_targets(_heat(y), owner.mass)  # from the unmasked unit output
        if record:
            owner.records.append((logits, targets))
        predicted = logits.detach() > 0
        self.mask = mask = targets if source == "target" else predicted
        assert mask is not None
        if stats is not None:
            assert targets is not None
            flops = stats.pending.pop(self.index) * mask.float().mean(1)
            stats.flops += float(flops.sum()) + self.predictor.flops() * len(y)
            stats.dense_flops += self._dense_flops(y) * len(y)
            stats.kept += float(mask.sum())
            stats.filters += mask.numel()
            stats.true_pos += float((predicted & targets).sum())
            stats.predicted += float(predicted.sum())
            stats.targets += float(targets.sum())
        return y * mask.view(*mask.shape, *(1,) * (y.dim() - 2)).to(y.dtype)

    def _dense_flops(self, output: torch.Tensor) -> float:
        """Multiply-add FLOPs per example of the whole layer (as ``flops_per_sample`` counts)."""
        m = self.layer
        if isinstance(m, nn.Linear):
            return 2.0 * m.in_features * output[0].numel()
        assert isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        return 2.0 * output[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def _input_kept(self, x: torch.Tensor) -> torch.Tensor:
        """Per example, 1 - the fraction of the input channels the producer's gate closed (and
        that are zero here, so a residual or a norm in between gets no credit)."""
        ones = torch.ones(len(x), device=x.device)
        mask = self.producer.mask if self.producer is not None else None
        if mask is None or len(mask) != len(x):
            return ones
        channels = mask.shape[1]
        if x.shape[1] != channels if x.dim() > 2 else x.shape[1] % channels:
            return ones  # not the producer's channels (channel-major when flattened)
        zero = x.detach().reshape(len(x), channels, -1).abs().amax(2) == 0
        return 1.0 - (zero & ~mask).float().sum(1) / channels


@register("sparsity", "ftwt",
          paper="Fire Together Wire Together: A Dynamic Pruning Approach with Self-Supervised "
                "Mask Prediction",
          summary="Per-input filter gating by predictors trained, decoupled, on top-mass filters.")
class FTWT(Sparsifier):
    """Dynamic filter pruning with self-supervised mask predictors (see the module docstring).

    Args:
        mass: fraction of each layer's heatmap mass the target filters cover (lower: fewer
            filters kept, more FLOPs saved).
        embedding: about how many pooled input features each predictor reads.
        predictor_lr: learning rate of the predictors (scaled by the trainer's lr schedule).
        warmup: fraction of the training steps masked with the targets before the predictions.
        cooldown: fraction of the training steps after which the predictors stop learning.
    """

    def __init__(self, mass: float = 0.8, embedding: int = 128, predictor_lr: float = 1e-2,
                 warmup: float = 0.1, cooldown: float = 1.0) -> None:
        if not 0.0 < mass <= 1.0:
            raise ConfigError(f"ftwt mass must be in (0, 1], got {mass}")
        if embedding < 1:
            raise ConfigError(f"ftwt embedding must be >= 1, got {embedding}")
        if not predictor_lr > 0:
            raise ConfigError(f"ftwt predictor_lr must be > 0, got {predictor_lr}")
        for name, value in (("warmup", warmup), ("cooldown", cooldown)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"ftwt {name} must be in [0, 1], got {value}")
        super().__init__(sparsity=0.0)
        self.mass, self.embedding, self.predictor_lr = mass, embedding, predictor_lr
        self.warmup, self.cooldown = warmup, cooldown
        self.model: nn.Module | None = None
        self.units: list[_Unit] = []
        self.source: MaskSource = "predicted"  # mask of training forwards (eval: predicted)
        self.learning = False  # training forwards record (logits, targets) for the predictors
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stats: _Stats | None = None
        self.estimate: dict[str, float] = {}

    def attach(self, model: nn.Module, example: torch.Tensor) -> list[MaskPredictor]:
        """Gate every Conv/Linear layer of ``model`` but the last (the output layer), sizing the
        predictors on a forward pass of ``example`` inputs; return the predictors."""
        if self.model is model:
            return self.predictors()
        if self.model is not None or any(n.endswith("ftwt_predictor")
                                         for n, _ in model.named_modules()):
            raise IncompatibleError("sparsity 'ftwt': the callback or the model is already "
                                    "gated; use one FTWT per model")
        layers = [m for m in model.modules() if isinstance(m, _GATED)]
        if len(layers) < 2:
            raise IncompatibleError("sparsity 'ftwt' gates the Conv/Linear layers before the "
                                    "output layer; the model has none")
        shapes = _io_shapes(model, layers[:-1], example)
        parents = {id(c): p for p in model.modules() for c in p.children()}
        self.model, self.units = model, []
        for index, layer in enumerate(layers):
            predictor = point = None
            if index < len(layers) - 1:
                predictor = self._predictor(layer, *shapes[index])
                layer.register_module("ftwt_predictor", predictor.to(layer.weight.device))
                point = _gate_point(layer, parents.get(id(layer)))
            producer = self.units[-1] if self.units and self.units[-1].gated else None
            unit = _Unit(self, index, layer, point, predictor, producer)
            self.units.append(unit)
            layer.register_forward_hook(unit.layer_hook)
            if point is not None and point is not layer:
                point.register_forward_hook(unit.point_hook)
        return self.predictors()

    def predictors(self) -> list[MaskPredictor]:
        return [u.predictor for u in self.units if u.predictor is not None]

    def _predictor(self, layer: nn.Module, x: torch.Size, y: torch.Size) -> MaskPredictor:
        if isinstance(layer, nn.Linear):
            if len(y) != 2:
                raise IncompatibleError(f"sparsity 'ftwt' gates linear layers with (batch, "
                                        f"units) outputs; got {tuple(y)}")
            return MaskPredictor(layer.in_features, layer.out_features,
                                 min(layer.in_features, self.embedding))
        assert isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        size = max(1, round((self.embedding / layer.in_channels) ** (1.0 / (len(x) - 2))))
        return MaskPredictor(layer.in_channels, layer.out_channels,
                             tuple(min(size, s) for s in x[2:]))

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        if trainer.rule.capabilities.closed_form:
            raise IncompatibleError(f"sparsity '{self.name}' gates around gradient steps; rule "
                                    f"'{trainer.rule.name}' is closed-form")
        if trainer.optimizer is None or trainer.data is None:
            raise IncompatibleError(f"sparsity '{self.name}' runs inside Trainer.fit only")
        x = trainer.data.train.x[:_MEASURE_BATCH].to(trainer.device)
        self.attach(model, x[:2])
        trainer.optimizer.add_param_group({
            "params": [p for m in self.predictors() for p in m.parameters()],
            "lr": self.predictor_lr, "weight_decay": 0.0})
        self.estimate = self.measure(trainer, model, x, source="target", train=True)
        self._phase(trainer)

    def on_step_start(self, trainer: Trainer, model: nn.Module) -> None:
        self._phase(trainer)
        self.records.clear()

    def on_step_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, float]) -> None:
        """Nothing to prune between steps: the gates act inside every forward pass."""

    def on_after_backward(self, trainer: Trainer, model: nn.Module) -> None:
        """The predictor loss, back-propagated into the predictors only (inputs detached)."""
        if not self.records:
            return
        loss = torch.stack([
            F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype),
                                               reduction="none").sum(1).mean()
            for logits, targets in self.records]).mean()
        self.records.clear()
        loss.backward()

    def on_fit_end(self, trainer: Trainer, model: nn.Module, result: FitResult) -> None:
        super().on_fit_end(trainer, model, result)
        if trainer.data is None or not self.units:
            return
        x = trainer.data.test.x.to(trainer.device)
        realized = self.measure(trainer, model, x, source="predicted", train=False)
        result.metrics.update({f"ftwt_{k}": v for k, v in realized.items()})
        result.metrics["ftwt_estimated_flops_reduction"] = self.estimate["flops_reduction"]

    @torch.no_grad()
    def measure(self, trainer: Trainer, model: nn.Module, x: torch.Tensor, source: MaskSource,
                train: bool) -> dict[str, float]:
        """Kept fraction, realized FLOPs and precision/recall of the predictions against the
        targets, on inputs ``x`` with ``source`` masks, in train mode (batch statistics; every
        buffer restored after) or eval mode (``source`` is then ``predicted``)."""
        was_training, phase = model.training, (self.source, self.learning)
        buffers = [(b, b.clone()) for b in model.buffers()]
        self.source, self.learning, self.stats = source, False, (s := _Stats())
        model.train(train)
        try:
            for i in range(0, len(x), _MEASURE_BATCH):
                batch = x[i:i + _MEASURE_BATCH]
                trainer.rule.predict(model, batch)
                s.examples += len(batch)
        finally:
            self.stats = None
            self.source, self.learning = phase
            model.train(was_training)
            for buffer, value in buffers:
                buffer.copy_(value)
        n = max(s.examples, 1)
        return {"kept_fraction": s.kept / max(s.filters, 1.0),
                "flops_per_sample": s.flops / n,
                "dense_flops_per_sample": s.dense_flops / n,
                "flops_reduction": 1.0 - s.flops / max(s.dense_flops, 1.0),
                "precision": s.true_pos / max(s.predicted, 1.0),
                "recall": s.true_pos / max(s.targets, 1.0)}

    def _phase(self, trainer: Trainer) -> None:
        step, total = trainer.step, max(trainer.total_steps, 1)
        self.source = "target" if step < self.warmup * total else "predicted"
        self.learning = step < self.cooldown * total


def _gate_point(layer: nn.Module, parent: nn.Module | None) -> nn.Module:
    """The last module of ``layer``'s unit: the layer and the channel-wise modules after it."""
    point = layer
    if isinstance(parent, nn.Sequential):
        siblings = list(parent)
        for module in siblings[siblings.index(layer) + 1:]:
            if not isinstance(module, _CHANNELWISE):
                break
            point = module
    return point


@torch.no_grad()
def _io_shapes(model: nn.Module, layers: list[nn.Module], example: torch.Tensor
               ) -> list[tuple[torch.Size, torch.Size]]:
    """Input and output shapes of ``layers`` on ``example`` (an eval-mode forward)."""
    shapes: dict[int, tuple[torch.Size, torch.Size]] = {}

    def hook(layer: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        shapes[id(layer)] = (args[0].shape, output.shape)

    handles = [layer.register_forward_hook(hook) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if len(shapes) < len(layers):
        raise IncompatibleError("sparsity 'ftwt': some Conv/Linear layers do not run in the "
                                "model's forward pass")
    return [shapes[id(layer)] for layer in layers]
