from __future__ import annotations

import torch

from nnarena.models import create_model
from nnarena.rules.backprop import Backprop
from nnarena.train.metrics import SavedActivationMeter, count_params, flops_per_sample


def _saved_bytes(depth: int, width: int = 64, batch: int = 32) -> int:
    model = create_model("mlp", (width,), 10, width=width, depth=depth)
    rule = Backprop()
    meter = SavedActivationMeter(model)
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    with meter.track():
        rule.step(model, x, y)
    return meter.peak


def test_backprop_saved_activation_bytes_grow_with_depth() -> None:
    peaks = [_saved_bytes(d) for d in (1, 2, 4, 8)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    # Each hidden layer adds one batch x width float tensor: ReLU saves its output, and the next
    # Linear saves that same tensor as its input (one storage, counted once).
    per_layer = (peaks[3] - peaks[2]) / 4
    assert per_layer == 32 * 64 * 4


def test_meter_releases_bytes_after_backward_and_skips_parameters() -> None:
    w = torch.nn.Parameter(torch.randn(8, 8))
    meter = SavedActivationMeter(extra=[w])
    x = torch.randn(4, 8, requires_grad=True)
    with meter.track():
        (x @ w).tanh().sum().backward()
    assert meter.peak == 4 * 8 * 4 * 2  # x for matmul's backward, tanh's output; not w
    assert meter.live == 0


def test_meter_skips_the_batch_it_is_given() -> None:
    x, w = torch.randn(4, 8), torch.randn(8, 8, requires_grad=True)
    meter = SavedActivationMeter()
    with meter.track(x):
        (x @ w).tanh().sum().backward()
    assert meter.peak == 4 * 8 * 4  # tanh's output only: x exists whether or not a graph does
    with meter.track():
        (x @ w).tanh().sum().backward()
    assert meter.peak == 4 * 8 * 4 * 2


def test_mlp_flops_equal_the_analytic_count() -> None:
    model = create_model("mlp", (1, 8, 8), 10, hidden=(32, 16))
    expected = 2 * (64 * 32 + 32 * 16 + 16 * 10)
    assert flops_per_sample(Backprop(), model, torch.randn(5, 1, 8, 8)) == expected


def test_param_counts() -> None:
    model = create_model("mlp", (4,), 2, hidden=(3,))
    with torch.no_grad():
        model.head.weight.zero_()
    model.head.bias.requires_grad_(False)
    counts = count_params(model)
    assert counts["params_total"] == 4 * 3 + 3 + 3 * 2 + 2
    assert counts["params_trainable"] == counts["params_total"] - 2
    assert counts["params_nonzero"] == counts["params_total"] - 6 - int(
        (model.head.bias == 0).sum())
