from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnarena.errors import ConfigError
from nnarena.models import create_model
from nnarena.rules import LearningRule
from nnarena.rules.backprop import Backprop
from nnarena.train import Callback, Trainer
from nnarena.train.optim import create_schedule

TIMING_KEYS = {"train_seconds", "samples_per_second", "hook_seconds", "inference_seconds",
               "peak_rss_bytes"}


def _fit(blobs, **kwargs):
    torch.manual_seed(kwargs.get("seed", 0))
    model = create_model("mlp", blobs.input_shape, blobs.n_outputs, width=16, depth=2)
    trainer = Trainer(kwargs.pop("rule", "backprop"), **kwargs)
    return trainer, model, trainer.fit(model, blobs)


def test_same_config_and_seed_give_identical_metrics(blobs) -> None:
    runs = [_fit(blobs, epochs=3, seed=5)[2] for _ in range(2)]
    strip = [{k: v for k, v in r.metrics.items() if k not in TIMING_KEYS} for r in runs]
    assert strip[0] == strip[1]
    assert runs[0].history[-1]["train_loss"] == runs[1].history[-1]["train_loss"]
    other = _fit(blobs, epochs=3, seed=6)[2]
    assert other.history[-1]["train_loss"] != runs[0].history[-1]["train_loss"]


def test_backprop_learns_an_easy_problem(blobs) -> None:
    result = _fit(blobs, epochs=10, lr=1e-2)[2]
    assert result.status == "ok"
    assert result.metrics["test_accuracy"] >= 0.95
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


class _NanAfter(Backprop):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps, self.calls = steps, 0

    def step(self, model, x, y):
        self.calls += 1
        logs = super().step(model, x, y)
        return {"loss": math.nan} if self.calls > self.steps else logs


def test_nan_loss_ends_the_run_as_diverged_not_an_exception(blobs) -> None:
    trainer, _, result = _fit(blobs, rule=_NanAfter(3), epochs=5)
    assert result.status == "diverged"
    assert "nan at step 3" in result.reason
    assert trainer.step == 3
    assert "test_accuracy" in result.metrics


def test_huge_learning_rate_diverges(blobs) -> None:
    result = _fit(blobs, optimizer="sgd", lr=1e12, epochs=3)[2]
    assert result.status == "diverged"


@pytest.mark.parametrize(("budget", "expected_steps"), [
    ({"epochs": 2}, 2 * math.ceil(210 / 32)),
    ({"epochs": 0.5}, math.ceil(0.5 * math.ceil(210 / 32))),
    ({"samples": 100}, math.ceil(100 / 32)),
])
def test_budget_in_epochs_or_samples(blobs, budget, expected_steps) -> None:
    assert len(blobs.train) == 210
    trainer, _, result = _fit(blobs, batch_size=32, **budget)
    assert trainer.step == expected_steps == result.metrics["steps"]


def test_seconds_budget_and_time_limit(blobs) -> None:
    _, _, ok = _fit(blobs, seconds=0.3, batch_size=8)
    assert ok.status == "ok" and 0.3 <= ok.metrics["train_seconds"] < 5
    _, _, late = _fit(blobs, epochs=10_000, time_limit=0.3, batch_size=8)
    assert late.status == "timeout" and "time limit" in late.reason


def test_bad_settings_fail_before_work() -> None:
    with pytest.raises(ConfigError, match="epochs must be > 0"):
        Trainer(epochs=0)
    with pytest.raises(ConfigError, match=r"unknown optimizer 'adm'.*'adam'"):
        Trainer(optimizer="adm")
    with pytest.raises(ConfigError, match=r"unknown schedule 'cosin'.*'cosine'"):
        Trainer(schedule="cosin")
    with pytest.raises(ConfigError, match="optimizer 'adam' has no parameter 'momentum'"):
        Trainer(optimizer_kwargs={"momentum": 0.9})


def test_schedules_follow_their_formulas() -> None:
    cos = create_schedule("cosine", 100, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(55) == pytest.approx(0.5)
    assert cos(100) == pytest.approx(0.0, abs=1e-9)
    lin = create_schedule("linear", 100)
    assert lin(25) == pytest.approx(0.75)
    assert create_schedule("constant", 100)(70) == 1.0


def test_trainer_applies_the_schedule_to_the_optimizer(blobs) -> None:
    lrs = []

    class Spy(Callback):
        def on_before_optimizer_step(self, trainer, model, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

    _fit(blobs, lr=0.1, schedule="linear", warmup_steps=2, epochs=1, batch_size=30,
         callbacks=[Spy()])
    steps = 7
    expected = [0.1 * create_schedule("linear", steps, 2)(s) for s in range(steps)]
    assert lrs == pytest.approx(expected)


class _Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattribute__(self, name: str):
        if name.startswith("on_"):
            self.calls.append(name)
        return super().__getattribute__(name)


def test_hook_order_for_a_short_fit(blobs) -> None:
    rec = _Recorder()
    _fit(blobs, epochs=2, batch_size=105, callbacks=[rec])  # 2 steps an epoch
    step = ["on_step_start", "on_after_backward", "on_before_optimizer_step", "on_step_end"]
    epoch = step * 2 + ["on_epoch_end"]
    assert rec.calls == ["on_fit_start", *epoch, *epoch, "on_fit_end"]


def test_callbacks_run_in_list_order(blobs) -> None:
    order = []

    class Named(Callback):
        def __init__(self, name):
            self.name = name

        def on_fit_start(self, trainer, model):
            order.append(self.name)

    _fit(blobs, epochs=1, callbacks=[Named("b"), Named("a"), Named("c")])
    assert order == ["b", "a", "c"]


def test_rule_only_fills_grad_and_trainer_steps_the_optimizer(blobs) -> None:
    seen = {}

    class Check(Callback):
        def on_after_backward(self, trainer, model):
            seen["grads"] = all(p.grad is not None for p in model.parameters())

    _, model, _ = _fit(blobs, epochs=1, callbacks=[Check()], optimizer="sgd", lr=0.0)
    assert seen["grads"]
    torch.manual_seed(0)
    fresh = create_model("mlp", blobs.input_shape, blobs.n_outputs, width=16, depth=2)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # lr 0: the rule itself moved nothing


class _Closed(LearningRule):
    from nnarena.rules.base import RuleCapabilities
    capabilities = RuleCapabilities(closed_form=True)

    def step(self, model, x, y):
        raise AssertionError("closed-form rules are not stepped")

    def fit(self, trainer, model, data):
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return {"train_loss": 0.0}


def test_closed_form_rules_train_through_fit(blobs) -> None:
    result = _fit(blobs, rule=_Closed(), epochs=3)[2]
    assert result.status == "ok" and result.metrics["steps"] == 0
    assert result.metrics["params_nonzero"] == 0


def test_metrics_cover_every_listed_quantity(blobs) -> None:
    metrics = _fit(blobs, epochs=1)[2].metrics
    for key in ("test_accuracy", "test_loss", "val_accuracy", "train_seconds",
                "samples_per_second", "peak_saved_activation_bytes", "peak_rss_bytes",
                "params_total", "params_trainable", "params_nonzero", "flops_per_sample",
                "inference_seconds"):
        assert key in metrics and metrics[key] >= 0, key
    assert metrics["task_metric"] == "accuracy"


def test_regression_reports_rmse() -> None:
    from nnarena.data import make_bundle

    x = torch.rand(200, 2) * 2 - 1
    y = (x[:, :1] * x[:, 1:]).numpy()
    bundle = make_bundle("xy", x.numpy(), y, task="regression", seed=0, standardize="none")
    model = create_model("mlp", (2,), 1, width=32, depth=2)
    metrics = Trainer(epochs=30, lr=1e-2).fit(model, bundle).metrics
    pred = model(bundle.test.x).detach()
    rmse = ((pred - bundle.test.y) ** 2).mean().sqrt().item()
    assert metrics["task_metric"] == "rmse"
    assert metrics["test_rmse"] == pytest.approx(rmse, rel=1e-5)
    assert metrics["test_rmse"] < bundle.test.y.std().item()


def test_gradient_clipping_bounds_the_norm(blobs) -> None:
    norms = []

    class Spy(Callback):
        def on_before_optimizer_step(self, trainer, model, optimizer):
            norms.append(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()])).item())

    _fit(blobs, epochs=1, clip_grad_norm=0.01, callbacks=[Spy()])
    assert max(norms) <= 0.01 + 1e-6


def test_device_moves_model_and_rule(blobs) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    Trainer(epochs=1, device="cpu").fit(model, blobs)
    assert next(model.parameters()).device.type == "cpu"
