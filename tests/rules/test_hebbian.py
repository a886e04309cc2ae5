"""SoftHebb (rule ``hebbian``): the update against a per-neuron reference, what the step writes
into ``.grad``, the unit-norm fixed point the paper proves, and accuracy on digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnarena.cell import Cell, run_cell
from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import create_model
from nnarena.registry import REGISTRY
from nnarena.rules import create_rule
from nnarena.rules.hebbian import softhebb_update


def test_update_matches_the_per_neuron_formula() -> None:
    g = torch.Generator().manual_seed(0)
    w, x, temperature = torch.randn(5, 7, generator=g), torch.randn(4, 7, generator=g), 0.7
    want = torch.zeros_like(w)
    for xn in x:
        u = w @ xn
        y = torch.exp(u / temperature) / torch.exp(u / temperature).sum()
        for k in range(w.shape[0]):
            want[k] += y[k] * (xn - u[k] * w[k])
    torch.testing.assert_close(softhebb_update(w, x, temperature), want / len(x))


def test_step_writes_minus_the_update_per_block_and_trains_the_head_on_detached_features(
) -> None:
    torch.manual_seed(0)
    model = create_model("mlp", (1, 6, 6), 3, width=10, depth=3)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    rule = create_rule("hebbian", temperature=0.5)
    rule.configure("classification")
    rule.check(model)
    logs = rule.step(model, x, y)
    h = x
    for block in model.blocks:
        linear = next(m for m in block.modules() if isinstance(m, nn.Linear))
        inp = h.flatten(1)
        torch.testing.assert_close(linear.weight.grad,
                                   -softhebb_update(linear.weight.detach(), inp, 0.5))
        assert linear.bias.grad is None  # SoftHebb has no bias: it is not learned
        h = block(h).detach()
    head = model.head
    loss = nn.functional.cross_entropy(head(h), y)
    wanted = torch.autograd.grad(loss, [head.weight, head.bias])
    torch.testing.assert_close(head.weight.grad, wanted[0])
    torch.testing.assert_close(head.bias.grad, wanted[1])
    assert logs["loss"] == pytest.approx(loss.item())


def test_repeated_updates_drive_every_weight_vector_to_unit_norm() -> None:
    g = torch.Generator().manual_seed(1)
    w = 0.1 * torch.randn(6, 10, generator=g)
    for _ in range(400):
        w += 0.2 * softhebb_update(w, torch.randn(64, 10, generator=g), 1.0)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(6), atol=0.05, rtol=0)


def test_bad_configuration_fails_with_the_cause() -> None:
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        create_rule("hebbian", temperature=0.0)
    with pytest.raises(IncompatibleError, match="does not support conv"):
        create_rule("hebbian").check(create_model("cnn", (1, 8, 8), 3, channels=(4, 4)))
    with pytest.raises(IncompatibleError, match="needs a Blocks model"):
        create_rule("hebbian").check(nn.Sequential(nn.Linear(3, 2)))
    entry = REGISTRY.get("rule", "hebbian")
    assert entry.paper == "Hebbian Deep Learning Without Feedback"


@pytest.mark.slow
def test_hebbian_features_with_a_readout_learn_digits() -> None:
    result = run_cell(Cell(dataset="digits", model="mlp", model_kwargs={"width": 256, "depth": 2},
                           rule="hebbian", trainer={"epochs": 15, "lr": 3e-3, "batch_size": 64,
                                                    "optimizer": "adam"}, seed=0))
    assert result.status == "ok", result.reason
    assert result.metrics["test_accuracy"] >= 0.88
