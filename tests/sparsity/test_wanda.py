"""Wanda: masks equal a by-hand top-k of |W| * ||X|| per row, layers pruned in execution order
on recomputed inputs, conv layers as unfolded matrices, pruning after the last training step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnarena.data import load
from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import build, create_model
from nnarena.sparsity import create_sparsifier
from nnarena.sparsity.base import Sparsifier
from nnarena.sparsity.wanda import calibration_inputs, input_rows, wanda_masks
from nnarena.train import Trainer
from nnarena.train import metrics as M


@pytest.fixture(autouse=True)
def _no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency of the sparse kernels is measured elsewhere."""
    monkeypatch.setattr(Sparsifier, "measure_latency", lambda self, trainer, model: {})


def _reference_mask(weight: torch.Tensor, x: torch.Tensor, keep: int) -> torch.Tensor:
    """Per row, the ``keep`` largest |W_ij| * ||X_j||, by sorting."""
    scores = weight.abs() * x.norm(dim=0)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for i, row in enumerate(scores):
        mask[i, row.argsort(descending=True)[:keep]] = True
    return mask


def test_wanda_mask_is_the_per_row_top_k_of_weight_times_input_norm() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    x = torch.randn(10, 6) * torch.tensor([0.1, 5.0, 1.0, 3.0, 0.5, 2.0])
    weight = layer.weight.detach().clone()
    expected = _reference_mask(weight, x, keep=3)  # 6 * (1 - 0.5)
    masks = wanda_masks(nn.Sequential(layer), x, 0.5)
    assert torch.equal(masks["0.weight"], expected)
    # Magnitude alone would choose differently here: the input norms matter.
    assert not torch.equal(expected, _reference_mask(weight, torch.ones(1, 6), 3))


def test_layers_are_pruned_in_execution_order_on_inputs_recomputed_after_pruning() -> None:
    torch.manual_seed(1)
    first, second = nn.Linear(5, 16), nn.Linear(16, 6)

    class Reversed(nn.Module):  # registered second-first, run first-second
        def __init__(self) -> None:
            super().__init__()
            self.b, self.a = second, first

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    model = Reversed()
    x = torch.randn(32, 5)
    dense = copy.deepcopy(model)
    masks = wanda_masks(model, x, 0.6)
    mask_a = _reference_mask(dense.a.weight.detach(), x, keep=2)  # round(5 * 0.4)
    hidden = torch.relu(F.linear(x, dense.a.weight.detach() * mask_a, dense.a.bias.detach()))
    assert torch.equal(masks["a.weight"], mask_a)
    assert torch.equal(masks["b.weight"], _reference_mask(dense.b.weight.detach(), hidden, 6))
    # With the dense first layer the second layer's mask would differ (the test has teeth).
    dense_hidden = torch.relu(dense.a(x)).detach()
    assert not torch.equal(masks["b.weight"],
                           _reference_mask(dense.b.weight.detach(), dense_hidden, 6))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, (3, 2), stride=2, dilation=(1, 2)),
    nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), nn.Conv1d(3, 4, 5, padding=2),
])
def test_conv_inputs_unfold_to_rows_that_reproduce_the_conv(conv: nn.Module) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 3, 9, 8) if isinstance(conv, nn.Conv2d) else torch.randn(2, 3, 11)
    out = conv(x).detach()
    rows = input_rows(conv, x)
    flat = rows @ conv.weight.detach().flatten(1).T + conv.bias.detach()
    assert torch.allclose(flat, out.flatten(2).transpose(1, 2).reshape(-1, 4), atol=1e-5)


def test_conv_mask_matches_the_reference_on_unfolded_patches() -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 5, 3, padding=1)
    x = torch.randn(4, 2, 6, 6) * torch.tensor([1.0, 4.0]).view(1, 2, 1, 1)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    expected = _reference_mask(conv.weight.detach().flatten(1), patches, keep=5)  # 18 * 0.3
    masks = wanda_masks(nn.Sequential(conv), x, 0.7)
    assert torch.equal(masks["0.weight"].flatten(1), expected)


def test_calibration_examples_are_a_seeded_sample_of_the_training_set() -> None:
    data = load("digits", seed=0)
    a, b = calibration_inputs(data.train, 16, 0), calibration_inputs(data.train, 16, 0)
    assert torch.equal(a, b) and len(a) == 16
    assert not torch.equal(a, calibration_inputs(data.train, 16, 1))
    assert len(calibration_inputs(data.train, 10**6, 0)) == len(data.train)


def test_wanda_prunes_once_after_the_last_step_to_exact_per_row_counts() -> None:
    data = load("digits", seed=0)
    model = create_model("cnn-tiny", data.input_shape, data.n_outputs)
    dense = copy.deepcopy(model)
    Trainer(epochs=1, seed=0, measure=False).fit(dense, data)
    sparsifier = create_sparsifier("wanda", sparsity=0.7, n_calibration=64)
    trainer = Trainer(epochs=1, seed=0, callbacks=[sparsifier], measure=False)
    result = trainer.fit(model, data)
    assert [h["step"] for h in sparsifier.history] == [trainer.total_steps]
    for t in sparsifier.targets:
        trained = dict(dense.named_parameters())[t.name]
        mask = t.mask.bool().flatten(1)
        assert (mask.sum(1) == round(0.3 * mask.shape[1])).all()
        # Training ran dense to the end; the survivors are the dense run's trained values.
        assert torch.equal(t.original.detach().flatten(1)[mask], trained.detach().flatten(1)[mask])
    assert result.metrics["sparsity"] == pytest.approx(0.7, abs=0.01)


@pytest.mark.slow
def test_wanda_at_half_sparsity_keeps_digits_accuracy_without_retraining() -> None:
    data = load("digits", seed=0)
    torch.manual_seed(0)
    model = build("mlp", data)
    trainer = Trainer(epochs=30, seed=0, measure=False)
    dense = trainer.fit(model, data).metrics["test_accuracy"]
    wanda_masks(model, calibration_inputs(data.train, 128, 0), 0.5)
    pruned = M.evaluate(trainer.rule, model, data.test)["accuracy"]
    assert dense > 0.95 and pruned > dense - 0.03


def test_bad_options_and_unsupported_layers_fail_with_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="n_calibration"):
        create_sparsifier("wanda", n_calibration=0)
    with pytest.raises(ConfigError, match="sparsity"):
        create_sparsifier("wanda", sparsity=1.0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(IncompatibleError, match="Embedding"):
        wanda_masks(model, torch.randint(0, 10, (5, 2)), 0.5)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(IncompatibleError, match="Conv2d"):
        wanda_masks(grouped, torch.randn(2, 4, 5, 5), 0.5)
