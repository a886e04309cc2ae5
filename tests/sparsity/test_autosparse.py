"""``autosparse``: the soft-threshold forward and the Gradient Annealing backward (by hand), the
``alpha`` schedule, the thresholds trained by the Trainer's optimizer and frozen into a plain mask,
and the sparsity and accuracy reached on digits.

Oracles: ``sign(w) relu(|w| - tau)`` and its annealed derivative written out; the schedule's
closed form; the model's own effective weights and outputs before freezing.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from nnarena.cell import Cell, run_cell
from nnarena.data import DataBundle
from nnarena.errors import ConfigError
from nnarena.models import create_model
from nnarena.sparsity import Sparsifier, create_sparsifier
from nnarena.sparsity.autosparse import AutoSparse, SoftThreshold, ga_alpha, soft_threshold
from nnarena.sparsity.masks import Mask, count_nonzero
from nnarena.train import Callback, Trainer


@pytest.fixture(autouse=True)
def _no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the sparse-latency measurement while the kernels module is not there."""
    try:
        import nnarena.sparsity.kernels  # noqa: F401
    except ImportError:
        monkeypatch.setattr(Sparsifier, "measure_latency", lambda self, trainer, model: {})


def test_the_forward_is_the_soft_threshold_exactly() -> None:
    layer = nn.Linear(20, 10)
    w = layer.weight.detach().clone()
    parametrize.register_parametrization(layer, "weight", SoftThreshold(-3.0))
    tau = torch.sigmoid(torch.tensor(-3.0))
    expected = torch.sign(w) * torch.relu(w.abs() - tau)
    assert torch.equal(layer.weight, expected)
    assert 0 < int((expected == 0).sum()) < expected.numel()  # some masked, some kept


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_gradient_annealing_gives_masked_weights_alpha_times_their_gradient(alpha: float) -> None:
    w = torch.randn(200, requires_grad=True)
    s = torch.tensor(-0.5, requires_grad=True)
    upstream = torch.randn(200)
    (soft_threshold(w, torch.sigmoid(s), alpha) * upstream).sum().backward()
    tau = torch.sigmoid(torch.tensor(-0.5))
    kept = w.detach().abs() > tau
    assert 0 < int(kept.sum()) < 200
    assert torch.equal(w.grad, torch.where(kept, upstream, alpha * upstream))
    tau_grad = -(torch.sign(w.detach()) * torch.where(kept, 1.0, alpha) * upstream).sum()
    assert torch.allclose(s.grad, tau_grad * tau * (1 - tau), atol=1e-6)


def test_alpha_decays_nonlinearly_from_alpha_to_zero() -> None:
    assert ga_alpha(0.8, 0.0) == 0.8
    assert ga_alpha(0.8, 0.5) == pytest.approx(0.4)  # sigmoid and cosine cross at 1/2
    assert ga_alpha(0.8, 1.0) == ga_alpha(0.8, 1.2) == 0.0
    values = [ga_alpha(0.8, u / 200) for u in range(201)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert ga_alpha(0.8, 0.25) == pytest.approx(0.8 * (1 - torch.sigmoid(torch.tensor(-3.0))))
    assert ga_alpha(0.8, 0.9) == pytest.approx(0.4 * (1 + torch.cos(torch.tensor(0.9 * torch.pi))))


class _BeforeFreezing(Callback):
    """Runs before the sparsifier: alpha every step, and the effective weights and outputs just
    before the thresholds are frozen (after the last step)."""

    def __init__(self, sparsifier: AutoSparse, probe: torch.Tensor) -> None:
        self.sparsifier, self.probe = sparsifier, probe
        self.alphas: list[tuple[float, float]] = []
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.output: torch.Tensor | None = None

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        assert not self.sparsifier.thresholds  # the sparsifier runs after this

    def on_after_backward(self, trainer: Trainer, model: nn.Module) -> None:
        (alpha,) = {m.alpha for m in self.sparsifier.thresholds.values()}
        self.alphas.append((alpha, ga_alpha(self.sparsifier.alpha,
                                            trainer.step / trainer.total_steps)))
        if trainer.step == 0:
            self.start = {k: float(m.s.detach()) for k, m in self.sparsifier.thresholds.items()}

    def on_step_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, float]) -> None:
        if trainer.step == trainer.total_steps:
            self.end = {k: float(m.s.detach()) for k, m in self.sparsifier.thresholds.items()}
            self.weights = {t.name: t.weight.detach().clone() for t in self.sparsifier.targets}
            model.eval()
            with torch.no_grad():
                self.output = model(self.probe)


def test_thresholds_train_and_freeze_into_a_plain_mask(blobs: DataBundle) -> None:
    model = create_model("mlp", blobs.input_shape, blobs.n_outputs, width=32, depth=2)
    sparsifier = create_sparsifier("autosparse", threshold_decay=1.0)
    assert isinstance(sparsifier, AutoSparse)
    probe = blobs.test.x[:32]
    before = _BeforeFreezing(sparsifier, probe)
    trainer = Trainer(epochs=5, batch_size=16, lr=1e-2, measure=False,
                      callbacks=[before, sparsifier])
    result = trainer.fit(model, blobs)
    assert result.status == "ok", result.reason
    assert len(before.alphas) == trainer.total_steps
    assert all(a == pytest.approx(b) for a, b in before.alphas)
    assert before.start.keys() == before.end.keys() == {t.name for t in sparsifier.targets}
    assert all(before.end[k] > before.start[k] + 0.1 for k in before.start)  # thresholds rose
    assert len(trainer.optimizer.param_groups) == 1  # the thresholds left the optimizer
    assert not any(isinstance(m, SoftThreshold) for m in model.modules())
    for t in sparsifier.targets:
        assert torch.equal(t.weight, before.weights[t.name])
        (mask,) = [m for m in t.module.parametrizations[t.param] if isinstance(m, Mask)]
        assert torch.equal(mask.mask.bool(), before.weights[t.name] != 0)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(probe), before.output, rtol=0.0, atol=1e-6)
    nonzero, total = count_nonzero(model)
    assert result.metrics["sparsity"] == pytest.approx(1 - nonzero / total)
    assert result.metrics["sparsity"] > 0.1
    assert result.metrics["test_accuracy"] > 0.9


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match="alpha must be in"):
        create_sparsifier("autosparse", alpha=1.5)
    with pytest.raises(ConfigError, match="threshold_lr must be > 0"):
        create_sparsifier("autosparse", threshold_lr=0.0)
    with pytest.raises(ConfigError, match="threshold_decay must be >= 0"):
        create_sparsifier("autosparse", threshold_decay=-1.0)


def _run(dataset: str, seed: int, **kwargs: float) -> tuple[float, float]:
    cell = Cell(dataset=dataset, model="mlp", model_kwargs={"width": 256, "depth": 2},
                sparsity="autosparse", sparsity_kwargs=kwargs,
                trainer={"epochs": 15, "lr": 1e-3, "batch_size": 64, "measure": False},
                seed=seed)
    result = run_cell(cell)
    assert result.status == "ok", result.reason
    return result.metrics["test_accuracy"], result.metrics["sparsity"]


@pytest.mark.slow
def test_gradient_annealing_holds_the_thresholds_back_on_digits() -> None:
    """At the same threshold decay GA (alpha 0.8) ends about 2 points less sparse than alpha 0
    (0.798/0.794/0.794 vs 0.821/0.818/0.818 at seeds 0-2; accuracy 0.948 vs 0.946 mean). At
    matched sparsity GA is not better here: alpha 0 with decay 0.4 gives 0.949 at 0.800."""
    for seed in range(3):
        ga_accuracy, ga_sparsity = _run("digits", seed, threshold_decay=0.5, alpha=0.8)
        accuracy, sparsity = _run("digits", seed, threshold_decay=0.5, alpha=0.0)
        assert 0.75 < ga_sparsity < sparsity - 0.01
        assert min(ga_accuracy, accuracy) > 0.92
