"""Counter-current learning (``ccl``).

Oracles: every block's, the head's and every feedback layer's gradient against a per-layer
reference computation (inputs detached: no gradient crosses a layer boundary or passes between
the two networks), the feedback network's mirrored shapes, a checkpoint round trip of its state,
a saved-activation peak that does not grow with depth, and accuracy on digits against backprop.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnarena.cell import Cell, run_cell
from nnarena.checkpoint import load_weights, save_weights
from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import Blocks, create_model
from nnarena.registry import REGISTRY
from nnarena.rules import create_rule
from nnarena.rules.counter_current import CounterCurrent
from nnarena.train.metrics import SavedActivationMeter


def _setup(depth: int = 3, task: str = "classification", **rule_kwargs
           ) -> tuple[Blocks, CounterCurrent, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("mlp", (1, 6, 6), 4, width=12, depth=depth)
    x = torch.randn(16, 1, 6, 6)
    y = torch.randint(0, 4, (16,)) if task == "classification" else torch.randn(16, 4)
    rule = create_rule("ccl", **rule_kwargs)
    rule.configure(task)
    rule.check(model)
    rule.prepare(model, (x, y))
    return model, rule, x, y


def _cosine_pairing(a: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    similarity = F.normalize(a.flatten(1), dim=1) @ F.normalize(b.flatten(1), dim=1).T
    return ((similarity - (y[:, None] == y[None, :]).float()) ** 2).mean()


@pytest.mark.parametrize("loss", ["similarity", "mse"])
def test_every_layer_of_both_networks_learns_from_its_own_pairing_only(loss: str) -> None:
    model, rule, x, y = _setup(loss=loss)
    ref_model, ref_g = copy.deepcopy(model), copy.deepcopy(rule.owned["feedback"])
    inputs_need_grad: list[bool] = []
    for module in [*model.blocks, model.head, *rule.owned["feedback"]]:
        module.register_forward_pre_hook(
            lambda _m, args: inputs_need_grad.append(args[0].requires_grad))
    rule.step(model, x, y)
    assert not any(inputs_need_grad)  # every layer of F and G runs on a detached input

    def pairing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _cosine_pairing(a, b, y) if loss == "similarity" else F.mse_loss(a.flatten(1), b)

    g = [F.one_hot(y, 4).float()]  # G's activations, top (the target) down to input space
    with torch.no_grad():
        for layer in reversed(ref_g):
            g.insert(0, layer(g[0]))
    assert [t.shape[1] for t in g] == [36, 12, 12, 12, 4]  # mirrored widths
    f = [x.flatten(1)]
    for k, block in enumerate(ref_model.blocks):
        out = block(f[-1])
        wanted = torch.autograd.grad(pairing(out, g[k + 1]), list(block.parameters()))
        for p, w in zip(model.blocks[k].parameters(), wanted, strict=True):
            torch.testing.assert_close(p.grad, w)
        f.append(out.detach())
    wanted = torch.autograd.grad(F.cross_entropy(ref_model.head(f[-1]), y),
                                 list(ref_model.head.parameters()))
    for p, w in zip(model.head.parameters(), wanted, strict=True):
        torch.testing.assert_close(p.grad, w)
    for i, layer in enumerate(ref_g):  # G_i: from g_{i+1} toward f_i
        wanted = torch.autograd.grad(pairing(layer(g[i + 1]), f[i]), list(layer.parameters()))
        for p, w in zip(rule.owned["feedback"][i].parameters(), wanted, strict=True):
            torch.testing.assert_close(p.grad, w)


def test_feedback_state_round_trips_through_a_checkpoint(tmp_path) -> None:
    model, rule, x, y = _setup()
    optimizer = torch.optim.Adam(rule.parameters(model), lr=1e-2)
    assert {id(p) for p in rule.owned.parameters()} <= {id(p) for p in rule.parameters(model)}
    for _ in range(3):
        optimizer.zero_grad()
        rule.step(model, x, y)
        optimizer.step()
    save_weights(tmp_path / "w.safetensors", model, rule)
    torch.manual_seed(1)
    other_model, other_rule, _, _ = _setup()
    load_weights(tmp_path / "w.safetensors", other_model, other_rule)
    state, loaded = rule.state_dict(), other_rule.state_dict()
    assert state.keys() == loaded.keys() and len(state) == 8  # 4 feedback layers x (W, b)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value)


def test_saved_activation_peak_does_not_grow_with_depth() -> None:
    peaks = {}
    for depth in (2, 6):
        model, rule, x, y = _setup(depth=depth)
        meter = SavedActivationMeter(model, rule.parameters(model))
        with meter.track(x, y):
            rule.step(model, x, y)
        peaks[depth] = meter.peak
    assert peaks[2] > 0 and peaks[6] == peaks[2]


def test_regression_trains_with_the_mse_pairing_only() -> None:
    model, rule, x, y = _setup(task="regression", loss="mse")
    assert rule.owned["feedback"][-1][0].in_features == 4  # G starts from the target itself
    out = rule.step(model, x, y)
    assert out["loss"] > 0 and all(p.grad is not None for p in rule.parameters(model))
    with pytest.raises(IncompatibleError, match="use loss 'mse' for regression"):
        create_rule("ccl").configure("regression")


def test_bad_configurations_fail_with_the_valid_choices() -> None:
    with pytest.raises(ConfigError, match="valid: similarity, mse"):
        create_rule("ccl", loss="l1")
    with pytest.raises(ConfigError, match="valid: relu"):
        create_rule("ccl", act="elux")
    with pytest.raises(IncompatibleError, match="does not support conv"):
        Cell(dataset="digits", model="cnn", rule="ccl").check()
    with pytest.raises(IncompatibleError, match="needs a Blocks model"):
        create_rule("ccl").check(nn.Linear(3, 3))
    assert REGISTRY.get("rule", "ccl").paper == ("Counter-Current Learning: A Biologically "
                                                 "Plausible Dual Network Approach for Deep "
                                                 "Learning")


@pytest.mark.slow
def test_digits_accuracy_is_within_a_few_points_of_backprop() -> None:
    result = run_cell(Cell(dataset="digits", model="mlp", model_kwargs={"width": 256, "depth": 2},
                           rule="ccl", trainer={"epochs": 15, "lr": 1e-3, "batch_size": 64,
                                                "optimizer": "adam"}, seed=0))
    assert result.status == "ok" and result.metrics["test_accuracy"] >= 0.97 - 0.03  # BP 0.972
