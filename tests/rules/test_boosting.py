"""Boosting rules: the merged network equals the boosted ensemble, closed-form steps equal
least-squares references, the arena runs them, accuracy on digits."""

from __future__ import annotations

from pathlib import Path
from statistics import fmean

import pytest
import torch
import torch.nn.functional as F

from nnarena.cell import Cell, run_cell
from nnarena.checkpoint import load_weights, save_weights
from nnarena.data import load
from nnarena.errors import IncompatibleError
from nnarena.models import create_model
from nnarena.rules import create_rule
from nnarena.rules.boosting import GBSequential, RFRBoost, ridge
from nnarena.train import Trainer

BACKPROP_DIGITS = 0.963  # Adam MLP 64-64-10, 15 epochs, mean of seeds 0-2 (report)


def _gb_fit(task: str) -> tuple[GBSequential, torch.nn.Module, torch.Tensor]:
    data = load("digits" if task == "classification" else "diabetes", seed=0)
    model = create_model("mlp", data.input_shape, data.n_outputs, width=12, depth=1)
    rule = create_rule("gb-sequential", units_per_block=4, epochs_per_block=2)
    assert isinstance(rule, GBSequential)
    trainer = Trainer(rule, lr=1e-2, seed=0, measure=False)
    rule.configure(task)
    rule.check(model)
    rule.prepare(model, (data.train.x[:4], data.train.y[:4]))
    logs = rule.fit(trainer, model, data)
    assert logs["blocks"] == 3
    return rule, model, data.train.x


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_gb_merged_network_reproduces_the_boosted_ensemble(task: str) -> None:
    rule, model, x = _gb_fit(task)
    hidden, act, head = rule._layers(model)
    offsets = rule.owned["offsets"].value
    with torch.no_grad():
        ensemble = offsets[0].expand(len(x), -1).clone()  # bias + sum of separate block outputs
        for t in range(rule.n_blocks):
            units = slice(4 * t, 4 * t + 4)
            h = act(x.flatten(1) @ hidden.weight[units].T + hidden.bias[units])
            ensemble += h @ head.weight[:, units].T + offsets[t + 1]
        torch.testing.assert_close(model(x), ensemble, atol=1e-6, rtol=1e-6)
        # switching off the last blocks keeps the first ones' sum
        rule.inference_blocks = 1
        h = act(x.flatten(1) @ hidden.weight[:4].T + hidden.bias[:4])
        torch.testing.assert_close(rule.predict(model, x),
                                   h @ head.weight[:, :4].T + offsets[:2].sum(0),
                                   atol=1e-6, rtol=1e-6)


def test_gb_anytime_offsets_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    rule, model, x = _gb_fit("classification")
    rule.inference_blocks = 2
    save_weights(tmp_path / "w.safetensors", model, rule)
    other_model = create_model("mlp", (1, 8, 8), 10, width=12, depth=1)
    other = create_rule("gb-sequential", units_per_block=4, inference_blocks=2)
    other.configure("classification")
    other.prepare(other_model, (x[:4], torch.zeros(4, dtype=torch.long)))
    load_weights(tmp_path / "w.safetensors", other_model, other)
    with torch.no_grad():
        torch.testing.assert_close(other.predict(other_model, x), rule.predict(model, x))


def test_gb_initial_bias_minimises_the_loss_and_residuals_are_negative_gradients() -> None:
    rule = GBSequential()
    rule.configure("classification")
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    base = F.one_hot(y, 3).float().mean(0).log().requires_grad_()
    F.cross_entropy(base.expand(6, -1), y).backward()
    assert base.grad is not None and base.grad.abs().max() < 1e-6
    out = torch.randn(6, 3, requires_grad=True)
    F.cross_entropy(out, y, reduction="sum").backward()
    assert out.grad is not None
    torch.testing.assert_close(rule.pseudo_residuals(out.detach(), F.one_hot(y, 3).float()),
                               -out.grad)


def test_gb_line_search_minimises_the_loss_along_the_block_output() -> None:
    torch.manual_seed(0)
    rule = GBSequential()
    out, update = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64)
    y = torch.randn(30, 3, dtype=torch.float64)
    rule.configure("regression")
    exact = ((y - out) * update).sum() / (update * update).sum()
    assert rule.line_search(out, update, y) == pytest.approx(exact.item())
    rule.configure("classification")
    labels = torch.randint(0, 3, (30,))
    rho = torch.tensor(rule.line_search(out, update, labels), requires_grad=True)
    F.cross_entropy(out + rho * update, labels).backward()
    assert rho.grad is not None and abs(rho.grad.item()) < 1e-8


def test_gb_rejects_a_width_that_is_not_blocks_times_units() -> None:
    result = run_cell(Cell(dataset="digits", model="mlp", model_kwargs={"width": 60, "depth": 1},
                           rule="gb-sequential", trainer={"epochs": 1}))
    assert result.status == "failed" and "multiple of units_per_block=8" in result.reason
    with pytest.raises(IncompatibleError, match="one hidden layer"):
        create_rule("gb-sequential").check(create_model("mlp", (4,), 2, width=8, depth=2))


def test_ridge_without_penalty_is_least_squares() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(50, 6, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    weight, bias = ridge(a, b, 0.0)
    ones = torch.ones(50, 1, dtype=torch.float64)
    ref = torch.linalg.lstsq(torch.cat([a, ones], 1), b).solution
    torch.testing.assert_close(weight, ref[:-1])
    torch.testing.assert_close(bias, ref[-1])


def test_rfrboost_block_is_the_least_squares_fit_of_the_functional_gradient() -> None:
    torch.manual_seed(0)
    model = create_model("rfr-resnet", (5,), 3, depth=1, features=16)
    rule = RFRBoost(eta=0.5, l2_features=0.0, l2_top=0.0)
    x, y = torch.randn(200, 5, dtype=torch.float64), torch.randn(200, 3, dtype=torch.float64)
    model.double()
    block = model.blocks[1]
    x_next = rule.boost_block(block, x, y)
    # reference: top layer, functional gradient and A by torch.linalg.lstsq
    ones = torch.ones(200, 1, dtype=torch.float64)
    top = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution
    residual = y - torch.cat([x, ones], 1) @ top
    gradient = residual @ top[:-1].T
    feats = torch.cat([block.body[1](block.body[0](x)), ones], 1)
    a = torch.linalg.lstsq(feats, gradient).solution
    direction = feats @ a
    moved = direction @ top[:-1]
    step = 0.5 * (residual * moved).sum() / (moved * moved).sum()
    with torch.no_grad():
        torch.testing.assert_close(block.body[2].weight, step * a[:-1].T)
        torch.testing.assert_close(block(x), x + step * direction)
    torch.testing.assert_close(x_next, x + step * direction)
    # the step lowers the squared loss of the refitted top layer
    def loss(z: torch.Tensor) -> float:
        w, b = ridge(z, y, 0.0)
        return (y - z @ w - b).pow(2).mean().item()
    assert loss(x_next) < loss(x)


def test_rfrboost_needs_its_model() -> None:
    with pytest.raises(IncompatibleError, match="rfr-resnet"):
        create_rule("rfrboost").check(create_model("mlp", (4,), 2, width=8, depth=1))


def test_rfrboost_error_decreases_with_boosting_layers() -> None:
    accs = []
    for depth in (0, 3):
        result = run_cell(Cell(dataset="digits", model="rfr-resnet",
                               model_kwargs={"depth": depth}, rule="rfrboost", seed=0))
        assert result.status == "ok"
        accs.append(result.metrics["test_accuracy"])
    assert accs[1] > accs[0] + 0.02


@pytest.mark.slow
def test_digits_accuracy() -> None:
    trainer = {"epochs": 15, "lr": 1e-2, "batch_size": 64, "optimizer": "adam"}
    gb = run_cell(Cell(dataset="digits", model="mlp", model_kwargs={"width": 64, "depth": 1},
                       rule="gb-sequential", trainer=trainer, seed=0))
    assert gb.status == "ok" and gb.metrics["test_accuracy"] >= BACKPROP_DIGITS - 0.03
    rfr = run_cell(Cell(dataset="digits", model="rfr-resnet", rule="rfrboost", seed=0))
    assert rfr.metrics["test_accuracy"] >= 0.97


@pytest.mark.slow
def test_switching_off_the_last_blocks_hurts_less_than_dropping_random_units() -> None:
    """The paper's anytime inference: the boosted net keeps its accuracy with half its blocks,
    while a jointly trained MLP of the same width loses more without a random half of its units
    (digits, width 64 = 8 blocks of 8, mean of 3 seeds)."""
    data = load("digits", seed=0)
    full, half, dropped = [], [], []
    for seed in range(3):
        torch.manual_seed(seed)
        boosted = create_model("mlp", data.input_shape, data.n_outputs, width=64, depth=1)
        rule = create_rule("gb-sequential")
        assert isinstance(rule, GBSequential)
        Trainer(rule, lr=1e-2, seed=seed, measure=False).fit(boosted, data)
        joint = create_model("mlp", data.input_shape, data.n_outputs, width=64, depth=1)
        Trainer("backprop", lr=1e-2, epochs=15, seed=seed, measure=False).fit(joint, data)
        keep = torch.zeros(64)
        keep[torch.randperm(64, generator=torch.Generator().manual_seed(seed))[:32]] = 1
        with torch.no_grad():
            full.append(_accuracy(rule.predict(boosted, data.test.x), data.test.y))
            rule.inference_blocks = 4
            half.append(_accuracy(rule.predict(boosted, data.test.x), data.test.y))
            hidden = joint.blocks[0](data.test.x) * keep
            dropped.append(_accuracy(joint.head(hidden), data.test.y))
    assert fmean(full) - fmean(half) <= 0.03, (full, half)
    assert fmean(half) >= fmean(dropped) + 0.03, (half, dropped)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_rfrboost_beats_one_random_feature_layer() -> None:
    """Digits, mean test accuracy of 3 seeds: boosting residual random-feature blocks beats a
    single random-feature layer of the same features and penalty with a ridge readout."""
    boosted, single = [], []
    for seed in range(3):
        data = load("digits", seed=seed)
        result = run_cell(Cell(dataset="digits", model="rfr-resnet", rule="rfrboost", seed=seed))
        boosted.append(result.metrics["test_accuracy"])
        torch.manual_seed(seed)
        model = create_model("rfr-resnet", data.input_shape, data.n_outputs, depth=1)
        features = model.blocks[1].body[:2]
        with torch.no_grad():
            x_train, x_test = model.blocks[0](data.train.x), model.blocks[0](data.test.x)
            targets = F.one_hot(data.train.y, data.n_outputs).float()
            weight, bias = ridge(features(x_train), targets, 0.1)
            single.append(_accuracy(features(x_test) @ weight + bias, data.test.y))
    assert fmean(boosted) >= fmean(single) + 0.01, (boosted, single)
