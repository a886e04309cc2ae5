"""Direct Feedback Alignment: exact against backprop where the paper says it must be, per-block
reference computations elsewhere, memory, checkpoints, accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnarena.cell import Cell, run_cell
from nnarena.checkpoint import load_weights, save_weights
from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import Blocks, create_model
from nnarena.rules import LearningRule, create_rule
from nnarena.rules.dfa import DFA
from nnarena.train.metrics import SavedActivationMeter

MODES = ["two-pass", "one-pass"]
BACKPROP_MNIST5K = 0.944  # backprop, seed 0, same protocol (tests/test_accuracy.py keeps >= 0.92)


def _ready(rule: LearningRule, model: Blocks, x: torch.Tensor, y: torch.Tensor,
           task: str = "classification") -> LearningRule:
    rule.configure(task)
    rule.check(model)
    rule.prepare(model, (x, y))
    return rule


def _grads(model: nn.Module) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_one_hidden_layer_with_b_equal_to_the_head_weights_is_backprop(mode: str, task: str
                                                                       ) -> None:
    model = create_model("mlp", (6,), 3, width=5, depth=1)
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,)) if task == "classification" else torch.randn(8, 3)
    rule = _ready(create_rule("dfa", mode=mode), model, x, y, task)
    rule.owned["feedback"].b0.copy_(model.head.weight.detach())  # B = W2^T
    rule.step(model, x, y)
    dfa = _grads(model)
    rule.criterion(model(x), y).backward()
    for got, want in zip(dfa, _grads(model), strict=True):
        torch.testing.assert_close(got, want)


def test_each_block_gets_its_random_projection_of_the_output_error() -> None:
    model = create_model("mlp", (6,), 4, width=5, depth=3)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    rule = _ready(create_rule("dfa"), model, x, y)
    rule.step(model, x, y)
    with torch.no_grad():
        features, out = model.forward_intermediates(x)
    error = (F.softmax(out, 1) - F.one_hot(y, 4)) / len(y)  # dL/d(output) of mean cross-entropy
    inputs = [x, *features[:-1]]
    for i, block in enumerate(model.blocks):
        ref = _vjp(block, inputs[i], error @ rule.owned["feedback"].get_buffer(f"b{i}"))
        for p, r in zip(block.parameters(), ref, strict=True):
            torch.testing.assert_close(p.grad, r)
    head = torch.autograd.grad(F.cross_entropy(model.head(features[-1]), y),
                               list(model.head.parameters()))
    for p, r in zip(model.head.parameters(), head, strict=True):
        torch.testing.assert_close(p.grad, r)


def _vjp(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of ``module``'s parameters for output gradient ``grad`` at input ``x``."""
    params = list(module.parameters())
    return torch.autograd.grad(module(x.detach()), params, grad)


def test_one_pass_and_two_pass_agree_with_dropout_and_batch_norm() -> None:
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    results = []
    for mode in MODES:
        torch.manual_seed(0)
        model = create_model("mlp", (6,), 4, width=8, depth=3, norm="batch", dropout=0.3)
        rule = _ready(create_rule("dfa", mode=mode), model, x, y)
        torch.manual_seed(1)
        loss = rule.step(model, x, y)["loss"]
        results.append((loss, _grads(model), [b.clone() for b in model.buffers()]))
    (loss_a, grads_a, buffers_a), (loss_b, grads_b, buffers_b) = results
    assert loss_a == pytest.approx(loss_b)
    for a, b in zip(grads_a + buffers_a, grads_b + buffers_b, strict=True):
        torch.testing.assert_close(a, b)


def test_two_pass_sends_no_gradient_across_a_block_boundary() -> None:
    model = create_model("mlp", (6,), 4, width=5, depth=3)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    rule = _ready(create_rule("dfa"), model, x, y)
    inputs: list[bool] = []
    for module in [*model.blocks[1:], model.head]:
        module.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].requires_grad))
    rule.step(model, x, y)
    assert inputs and not any(inputs)


@pytest.mark.parametrize(("model_name", "shape", "block_shapes"), [
    ("cnn", (1, 8, 8), [(32, 4, 4), (64, 2, 2)]),
    ("rnn", (1, 12), [(12, 64)]),
])
def test_feedback_is_shaped_like_each_blocks_output(model_name: str, shape: tuple[int, ...],
                                                     block_shapes: list[tuple[int, ...]]) -> None:
    model = create_model(model_name, shape, 5)
    x, y = torch.randn(4, *shape), torch.randint(0, 5, (4,))
    rule = _ready(create_rule("dfa"), model, x, y)
    assert rule.owned["feedback"].shapes == block_shapes
    rule.step(model, x, y)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_two_pass_memory_is_one_blocks_and_flat_in_depth() -> None:
    def peak(rule: str, depth: int) -> int:
        torch.manual_seed(0)
        model = create_model("mlp", (784,), 10, width=256, depth=depth)
        x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
        learner = _ready(create_rule(rule), model, x, y)
        meter = SavedActivationMeter(model, learner.parameters(model))
        with meter.track(x, y):
            learner.step(model, x, y)
        return meter.peak

    assert peak("dfa", 2) == peak("dfa", 16)
    assert peak("dfa", 16) <= 0.25 * peak("backprop", 16)


def test_feedback_round_trips_through_a_checkpoint(tmp_path) -> None:
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    model = create_model("mlp", (6,), 4, width=5, depth=2)
    rule = _ready(create_rule("dfa"), model, x, y)
    save_weights(tmp_path / "w.safetensors", model, rule)
    torch.manual_seed(123)
    other_model = create_model("mlp", (6,), 4, width=5, depth=2)
    other = _ready(create_rule("dfa"), other_model, x, y)
    assert not torch.equal(other.owned["feedback"].b0, rule.owned["feedback"].b0)
    load_weights(tmp_path / "w.safetensors", other_model, other)
    for key, value in rule.state_dict().items():
        torch.testing.assert_close(other.state_dict()[key], value)
    rule.step(model, x, y)
    other.step(other_model, x, y)
    for a, b in zip(_grads(model), _grads(other_model), strict=True):
        torch.testing.assert_close(a, b)


def test_feedback_is_fixed_not_trained() -> None:
    model = create_model("mlp", (6,), 4, width=5, depth=2)
    rule = _ready(create_rule("dfa"), model, torch.randn(8, 6), torch.randint(0, 4, (8,)))
    assert [id(p) for p in rule.parameters(model)] == [id(p) for p in model.parameters()]
    assert set(rule.state_dict()) == {"feedback.b0", "feedback.b1"}


def test_bad_mode_and_plain_modules_are_rejected_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"mode 'three-pass'.*valid: two-pass, one-pass"):
        DFA(mode="three-pass")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="three-pass"):
        create_rule("dfa", mode="three-pass")
    with pytest.raises(IncompatibleError, match="needs a Blocks model"):
        create_rule("dfa").check(nn.Sequential(nn.Linear(3, 2)))


@pytest.mark.slow
def test_dfa_within_three_points_of_backprop_on_mnist5k() -> None:
    result = run_cell(Cell(dataset="mnist5k", model="mlp", model_kwargs={"width": 256, "depth": 2},
                           rule="dfa", trainer={"epochs": 15, "lr": 1e-3, "batch_size": 64,
                                                "optimizer": "adam"}, seed=0))
    assert result.status == "ok", result.reason
    assert result.metrics["test_accuracy"] >= BACKPROP_MNIST5K - 0.03
