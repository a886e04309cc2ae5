"""Convex ReLU training: the recovered net reproduces the convex model and its objective, which
beats SGD restarts of the same net on the same objective; the arena runs it; digits accuracy."""

from __future__ import annotations

import functools

import pytest
import torch

from nnarena.cell import Cell, run_cell
from nnarena.errors import IncompatibleError
from nnarena.models import create_model
from nnarena.rules import create_rule
from nnarena.rules.convex import ConvexReLU, relu_objective

BETA, WIDTH = 1e-2, 20


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 20)[:, None]
    return x, torch.sin(3 * x) + 0.1 * torch.randn(20, 1)


@functools.cache
def _convex() -> tuple[torch.nn.Module, float, torch.Tensor]:
    """Fit the convex program (all 1-D patterns sampled); return net, objective, predictions."""
    x, y = _data()
    model = create_model("mlp", (1,), 1, width=WIDTH, depth=1)
    rule = create_rule("convex-relu", beta=BETA, iterations=1000, n_patterns=200)
    assert isinstance(rule, ConvexReLU)
    program = rule.program(model, x, y, seed=0)
    z = program.solve(1000)
    assert program.max_violation(z) < 1e-6
    assert rule.load_solution(model, z) == 0
    return model, program.objective(z), program.predict(z).float() * len(x) ** 0.5


def test_recovered_relu_net_reproduces_the_convex_model() -> None:
    model, objective, predictions = _convex()
    x, y = _data()
    with torch.no_grad():
        torch.testing.assert_close(model(x), predictions, atol=1e-5, rtol=1e-5)
        assert relu_objective(model, x, y, BETA).item() == pytest.approx(objective, rel=1e-5)


def test_convex_objective_is_at_most_the_best_of_ten_sgd_restarts() -> None:
    model, _, _ = _convex()
    x, y = _data()
    with torch.no_grad():
        convex = relu_objective(model, x, y, BETA).item()
    best = float("inf")
    for seed in range(10):
        torch.manual_seed(seed)
        net = create_model("mlp", (1,), 1, width=WIDTH, depth=1)
        net.head.bias.requires_grad_(False).zero_()  # the convex net has no output bias
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-2)
        for _ in range(1500):
            optimizer.zero_grad()
            loss = relu_objective(net, x, y, BETA)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            best = min(best, relu_objective(net, x, y, BETA).item())
    assert convex <= best + 1e-7


def test_multiclass_units_feed_one_class_each() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(60, 3), torch.randint(0, 3, (60,))
    model = create_model("mlp", (3,), 3, width=24, depth=1)
    rule = create_rule("convex-relu", iterations=50)
    assert isinstance(rule, ConvexReLU)
    target = torch.nn.functional.one_hot(y, 3).float()
    program = rule.program(model, x, target, seed=0)
    z = program.solve(50)
    rule.load_solution(model, z)
    assert ((model.head.weight != 0).sum(0) <= 1).all()
    with torch.no_grad():
        torch.testing.assert_close(model(x), program.predict(z).float() * 60 ** 0.5,
                                   atol=0.05 + 2 * program.max_violation(z), rtol=0)


def test_needs_one_relu_hidden_layer() -> None:
    rule = create_rule("convex-relu")
    with pytest.raises(IncompatibleError, match="one ReLU hidden layer"):
        rule.check(create_model("mlp", (4,), 2, width=8, depth=2))
    with pytest.raises(IncompatibleError, match="one ReLU hidden layer"):
        rule.check(create_model("mlp", (4,), 2, width=8, depth=1, act="tanh"))


@pytest.mark.slow
def test_digits_accuracy() -> None:
    result = run_cell(Cell(dataset="digits", model="mlp", model_kwargs={"width": 200, "depth": 1},
                           rule="convex-relu", seed=0))
    assert result.status == "ok" and result.metrics["test_accuracy"] >= 0.95
