"""Predictive coding and incremental predictive coding: PC's update approaches backprop's
gradient, iPC's update is the sum of the per-step energy gradients, the shared relaxation loop
descends the energy, accuracy."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from nnarena.cell import Cell, run_cell
from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import Blocks, create_model
from nnarena.rules import LearningRule, create_rule
from nnarena.rules.relaxation import relax

BACKPROP_DIGITS = 0.972  # backprop, seed 0, same protocol on digits (mnist5k is too slow here)


def _ready(rule: LearningRule, model: Blocks, x: torch.Tensor, y: torch.Tensor,
           task: str = "classification") -> LearningRule:
    rule.configure(task)
    rule.check(model)
    rule.prepare(model, (x, y))
    return rule


def _grad(model: nn.Module) -> torch.Tensor:
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return flat


def _problem(task: str) -> tuple[Blocks, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("mlp", (20,), 5, width=16, depth=3)
    x = torch.randn(32, 20)
    y = torch.randint(0, 5, (32,)) if task == "classification" else torch.randn(32, 5)
    return model, x, y


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_pc_approaches_backprop_with_a_small_output_nudge_and_many_steps(task: str) -> None:
    model, x, y = _problem(task)
    _ready(create_rule("backprop"), model, x, y, task).step(model, x, y)
    reference = _grad(model)
    cosines = []
    for steps in (3, 200):
        rule = _ready(create_rule("pc", steps=steps, output_weight=0.01), model, x, y, task)
        rule.step(model, x, y)
        cosines.append(torch.cosine_similarity(_grad(model), reference, 0).item())
    assert cosines[1] > 0.99
    assert cosines[1] > cosines[0]


def test_pc_gradient_is_backprops_times_the_output_weight_in_the_limit() -> None:
    model, x, y = _problem("classification")
    _ready(create_rule("backprop"), model, x, y).step(model, x, y)
    reference = _grad(model)
    _ready(create_rule("pc", steps=300, output_weight=0.001), model, x, y).step(model, x, y)
    torch.testing.assert_close(_grad(model) / 0.001, reference, atol=2e-3, rtol=0.05)


def test_ipc_with_one_step_trains_only_the_head_with_backprops_gradient() -> None:
    model, x, y = _problem("classification")
    _ready(create_rule("backprop"), model, x, y).step(model, x, y)
    head = [p.grad.clone() for p in model.head.parameters()]
    model.zero_grad(set_to_none=True)
    _ready(create_rule("ipc", steps=1), model, x, y).step(model, x, y)
    for p, want in zip(model.head.parameters(), head, strict=True):
        torch.testing.assert_close(p.grad, want)
    assert all(p.grad.abs().max() == 0 for p in model.blocks.parameters())


def test_ipc_sums_the_energy_gradients_of_every_inference_step() -> None:
    model, x, y = _problem("classification")
    steps = 4
    _ready(create_rule("ipc", steps=1), model, x, y).step(model, x, y)
    expected = _grad(model)  # the gradient at the feed-forward start
    for taken in range(1, steps):  # PC with `taken` steps: the gradient after `taken` steps
        _ready(create_rule("pc", steps=taken), model, x, y).step(model, x, y)
        expected += _grad(model)
    _ready(create_rule("ipc", steps=steps), model, x, y).step(model, x, y)
    torch.testing.assert_close(_grad(model), expected)


def test_relaxation_descends_the_pc_energy_and_stops_early_at_tolerance() -> None:
    model, x, y = _problem("classification")
    rule = _ready(create_rule("pc"), model, x, y)
    with torch.no_grad():
        nodes, _ = model.forward_intermediates(x)
    energies = []
    for steps in range(1, 30, 4):
        relaxed, taken = relax(nodes, lambda n: rule.energy(model, x, y, n), steps, 0.1)
        assert taken == steps
        energies.append(rule.energy(model, x, y, relaxed).item())
    assert all(b < a for a, b in itertools.pairwise(energies))
    rule = _ready(create_rule("pc", steps=500, tol=1e-2), model, x, y)
    rule.step(model, x, y)
    assert 1 < rule.last_steps < 500


def test_value_nodes_are_step_state_not_parameters() -> None:
    model, x, y = _problem("classification")
    rule = _ready(create_rule("pc"), model, x, y)
    logs = rule.step(model, x, y)
    assert logs["inference_steps"] == 20
    assert rule.parameters(model) == [p for p in model.parameters()]
    assert rule.state_dict() == {}


@pytest.mark.parametrize("rule", ["pc", "ipc"])
def test_value_nodes_take_each_blocks_shape_so_conv_blocks_work(rule: str) -> None:
    model = create_model("cnn", (1, 8, 8), 5)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    _ready(create_rule(rule), model, x, y).step(model, x, y)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_bad_settings_and_models_are_rejected() -> None:
    with pytest.raises(ConfigError, match="steps >= 1"):
        create_rule("pc", steps=0)
    with pytest.raises(ConfigError, match="step_size"):
        create_rule("ipc", step_size=-0.1)
    with pytest.raises(IncompatibleError, match="needs a Blocks model"):
        create_rule("pc").check(nn.Sequential(nn.Linear(3, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["ipc", "pc"])
def test_pc_family_within_two_points_of_backprop_on_digits(rule: str) -> None:
    result = run_cell(Cell(dataset="digits", model="mlp", model_kwargs={"width": 256, "depth": 2},
                           rule=rule, trainer={"epochs": 15, "lr": 1e-3, "batch_size": 64,
                                               "optimizer": "adam"}, seed=0))
    assert result.status == "ok", result.reason
    assert result.metrics["test_accuracy"] >= BACKPROP_DIGITS - 0.02
