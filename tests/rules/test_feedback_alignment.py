"""Feedback alignment and sign symmetry: the feedback layers, `convert`, the rules, checkpoints.

Oracles: backprop (FA with ``B = W`` is backprop, exactly); an ordinary layer whose weight is
the expected ``B`` (its input gradient is what the feedback layer must produce); the model's own
Parameters and state_dict before conversion; a saved and reloaded checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnarena.cell import Cell, run_cell
from nnarena.checkpoint import load_weights, save_weights
from nnarena.data import DataBundle
from nnarena.errors import IncompatibleError
from nnarena.models.cnn import cnn
from nnarena.models.mlp import mlp
from nnarena.models.resnet import resnet
from nnarena.rules import create_rule
from nnarena.rules.feedback import FeedbackLayer, convert, sign_feedback
from nnarena.train import Trainer

# (builder, input shape); conv models cover Conv2d and Conv1d, resnet covers residual sums
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: mlp((1, 8, 8), 5, width=16, depth=2), (1, 8, 8)),
    "cnn-2d": (lambda: cnn((1, 8, 8), 5, channels=(4, 6)), (1, 8, 8)),
    "cnn-1d": (lambda: cnn((2, 16), 5, channels=(4, 6)), (2, 16)),
    "resnet-1d": (lambda: resnet((2, 16), 5, width=8, depth=2), (2, 16)),
}


def _batch(shape: tuple[int, ...], n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, *shape), torch.randint(0, 5, (n,))


def _feedback_layers(model: nn.Module) -> list[FeedbackLayer]:
    return [m for m in model.modules() if isinstance(m, FeedbackLayer)]


@pytest.mark.parametrize("name", MODELS)
def test_fa_with_feedback_equal_to_the_weights_is_backprop(name: str) -> None:
    build, shape = MODELS[name]
    model = build()
    reference = copy.deepcopy(model)
    x, y = _batch(shape)
    rule = create_rule("fa")
    rule.prepare(model, (x, y))
    bank = rule.owned["feedback"]
    for layer in _feedback_layers(model):
        bank.get_buffer(layer.feedback.key).copy_(layer.weight)
    rule.step(model, x, y)
    F.cross_entropy(reference(x), y).backward()
    for (key, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), key


@pytest.mark.parametrize("rule_name", ["fa", "sign-symmetry"])
def test_the_head_gets_backprops_gradient_and_the_layers_below_do_not(rule_name: str) -> None:
    model = mlp((12,), 5, width=16, depth=2)
    reference = copy.deepcopy(model)
    x, y = _batch((12,), n=32)
    rule = create_rule(rule_name)
    rule.prepare(model, (x, y))
    rule.step(model, x, y)
    F.cross_entropy(reference(x), y).backward()
    for (key, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if key.startswith("head."):  # the head sees the true output error
            torch.testing.assert_close(p.grad, q.grad)
        else:
            assert not torch.allclose(p.grad, q.grad, atol=1e-4), key


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
def test_sign_symmetry_sends_errors_down_through_sign_w_times_scale(kind: str) -> None:
    layer, shape = {
        "linear": (nn.Linear(6, 4), (3, 6)),
        "conv2d": (nn.Conv2d(3, 4, 3, padding=1, stride=2), (2, 3, 7, 7)),
        "conv1d": (nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect"), (2, 3, 9)),
    }[kind]
    plain = copy.deepcopy(layer)
    model = nn.Sequential(layer)
    convert(model, create_rule("sign-symmetry"), "sign")
    for _ in range(2):  # the second round checks B follows the current (changed) weight
        x = torch.randn(shape, requires_grad=True)
        x_plain = x.detach().clone().requires_grad_()
        out = model(x)
        grad = torch.randn_like(out)
        out.backward(grad)
        plain(x_plain).backward(grad)
        with_b = copy.deepcopy(plain)  # an ordinary layer whose weight is B
        with_b.weight.data = torch.sign(layer.weight.data) * layer.weight.data.abs().mean()
        torch.testing.assert_close(with_b.weight.data, sign_feedback(layer.weight.data))
        x_b = x.detach().clone().requires_grad_()
        with_b(x_b).backward(grad)
        torch.testing.assert_close(x.grad, x_b.grad)
        assert not torch.allclose(x.grad, x_plain.grad)
        torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
        torch.testing.assert_close(layer.bias.grad, plain.bias.grad)
        with torch.no_grad():
            layer.weight.mul_(torch.randn_like(layer.weight))
            plain.weight.copy_(layer.weight)
        layer.zero_grad()
        plain.zero_grad()


def test_convert_keeps_parameters_and_state_dict_keys_and_is_idempotent() -> None:
    model = resnet((2, 16), 5, width=8, depth=2)
    params, keys = list(model.parameters()), list(model.state_dict())
    targets = [n for n, m in model.named_modules()
               if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d)]
    rule = create_rule("fa")
    assert convert(model, rule, "random") == targets
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == keys
    assert len(_feedback_layers(model)) == len(targets)
    feedback = {k: v.clone() for k, v in rule.state_dict().items()}
    assert len(feedback) == len(targets)
    assert convert(model, rule, "random") == targets  # again: nothing changes
    assert rule.state_dict().keys() == feedback.keys()
    assert all(torch.equal(rule.state_dict()[k], v) for k, v in feedback.items())
    with pytest.raises(IncompatibleError, match="converted for another feedback rule"):
        convert(model, create_rule("fa"), "random")


@pytest.mark.parametrize("rule_name", ["fa", "sign-symmetry"])
def test_rule_state_round_trips_through_a_checkpoint(rule_name: str, tmp_path) -> None:
    build, shape = MODELS["cnn-2d"]
    x, y = _batch(shape)
    model, rule = build(), create_rule(rule_name)
    rule.prepare(model, (x, y))
    save_weights(tmp_path / "w.safetensors", model, rule)
    torch.manual_seed(1)
    fresh, fresh_rule = build(), create_rule(rule_name)
    fresh_rule.prepare(fresh, (x, y))
    load_weights(tmp_path / "w.safetensors", fresh, fresh_rule)
    rule.step(model, x, y)
    fresh_rule.step(fresh, x, y)
    for (key, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), key


def test_kan_layers_are_rejected_before_any_work() -> None:
    model = mlp((6,), 3, width=4, depth=1, layer="kan-bspline")
    with pytest.raises(IncompatibleError, match="KAN layer"):
        create_rule("fa").check(model)


@pytest.mark.parametrize("rule_name", ["fa", "sign-symmetry"])
def test_trains_a_cnn_in_the_trainer(rule_name: str, blobs: DataBundle) -> None:
    model = cnn(blobs.input_shape, 3, channels=(8,))
    result = Trainer(rule_name, epochs=5, lr=1e-2, batch_size=32).fit(model, blobs)
    assert result.status == "ok", result.reason
    assert result.metrics["test_accuracy"] >= 0.9


# Backprop under the mnist5k protocol (MLP 784-256-256-10, Adam 1e-3, 15 epochs, batch 64):
# 0.944 / 0.935 / 0.950 on seeds 0-2 (tests/test_accuracy.py keeps it >= 0.92).
BACKPROP_MNIST5K = 0.943


def _mnist5k_accuracy(rule: str, **model_kwargs: object) -> float:
    cell = Cell(dataset="mnist5k", model="mlp",
                model_kwargs={"width": 256, "depth": 2, **model_kwargs}, rule=rule,
                trainer={"epochs": 15, "lr": 1e-3, "batch_size": 64, "optimizer": "adam"})
    result = run_cell(cell)
    assert result.status == "ok", result.reason
    return result.metrics["test_accuracy"]


@pytest.mark.slow
def test_fa_is_within_3_points_of_backprop_on_mnist5k_with_batch_norm() -> None:
    # On the plain ReLU MLP, FA under Adam trails backprop by ~4.5 points after 15 epochs (its
    # hidden activity grows unchecked while B and W align); with batch norm, the normalisation
    # Liao et al. call indispensable for asymmetric feedback, the gap is under a point.
    assert _mnist5k_accuracy("fa", norm="batch") >= BACKPROP_MNIST5K - 0.03


@pytest.mark.slow
def test_sign_symmetry_is_within_3_points_of_backprop_on_mnist5k() -> None:
    assert _mnist5k_accuracy("sign-symmetry") >= BACKPROP_MNIST5K - 0.03
