"""BDWP N:M training (``nm``): exact N:M groups in both directions, gradients against reference
GEMMs, masks that follow the dense weights every step, an exactly N:M model at the end, early
errors, and accuracy against dense training on mnist5k."""

from __future__ import annotations

from collections.abc import Callable
from statistics import fmean
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnarena.cell import Cell, run_cell
from nnarena.data import load
from nnarena.errors import ConfigError, IncompatibleError
from nnarena.models import create_model
from nnarena.sparsity import create_sparsifier, finalize
from nnarena.sparsity.base import Sparsifier
from nnarena.sparsity.masks import Mask, count_nonzero, prunable_targets
from nnarena.sparsity.nm import BidirectionalNM, nm_mask
from nnarena.train import Callback, Trainer


@pytest.fixture(autouse=True)
def _no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency of the sparse kernels is measured elsewhere (test_kernels, benchmarks)."""
    monkeypatch.setattr(Sparsifier, "measure_latency", lambda self, trainer, model: {})


def _groups(weight: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """Nonzeros in every group of ``m`` consecutive entries along ``dim`` (a multiple of m)."""
    moved = weight.movedim(dim, -1)
    return (moved != 0).reshape(*moved.shape[:-1], -1, m).sum(-1)


def _attach(model: nn.Module, **kwargs: Any) -> BidirectionalNM:
    sparsifier = create_sparsifier("nm", **kwargs)
    assert isinstance(sparsifier, BidirectionalNM)
    sparsifier.on_fit_start(Trainer(measure=False), model)
    return sparsifier


def _saved_weight(run: Any, shape: torch.Size) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``run()`` recording what autograd saves; return the saved tensor of ``shape`` (the
    weight the backward-data GEMM will use) and everything saved."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    [weight] = [t for t in saved if t.shape == shape]
    return weight, out


@pytest.mark.parametrize(("shape", "dim"), [((48, 64), 1), ((48, 64), 0), ((10, 32), 0),
                                            ((16, 24, 3, 3), 1), ((16, 24, 3, 3), 0)])
def test_nm_mask_keeps_the_n_largest_of_every_group(shape: tuple[int, ...], dim: int) -> None:
    weight = torch.randn(shape)
    keep = nm_mask(weight, 2, 8, dim)
    scores = weight.abs().movedim(dim, 0)
    kept = keep.movedim(dim, 0)
    for start in range(0, shape[dim], 8):  # the last group of a 10-row tensor has 2 members
        group, chosen = scores[start:start + 8], kept[start:start + 8]
        assert torch.equal(chosen.sum(0), torch.full_like(chosen.sum(0), min(2, len(group))))
        smallest_kept = torch.where(chosen, group, torch.inf).amin(0)
        largest_dropped = torch.where(chosen, -torch.inf, group).amax(0)
        assert torch.all(smallest_kept >= largest_dropped)


def test_nm_mask_breaks_ties_by_position() -> None:
    assert nm_mask(torch.ones(1, 8), 2, 8, 1).tolist() == [[True, True] + [False] * 6]
    weight = torch.randint(-2, 3, (40, 64)).float()  # ties everywhere
    keep = nm_mask(weight, 3, 8, 1)
    groups, kept = weight.abs().view(40, 8, 8), keep.view(40, 8, 8)
    assert torch.all(kept.sum(-1) == 3)
    smallest_kept = torch.where(kept, groups, torch.inf).amin(-1, keepdim=True)
    assert torch.all(torch.where(kept, -torch.inf, groups) <= smallest_kept)
    # among members equal to the smallest kept value, the kept ones come first
    at_threshold = groups == smallest_kept
    after_a_dropped_one = (at_threshold & ~kept).int().cummax(-1).values.bool()
    assert not (after_a_dropped_one & at_threshold & kept).any()


def test_linear_forward_backward_and_weight_gradient_match_reference_gemms() -> None:
    layer = nn.Linear(64, 48).double()
    weight = layer.weight.detach().clone()
    _attach(layer, n=2, m=8)
    forward_w = weight * nm_mask(weight, 2, 8, 1)
    backward_w = weight * nm_mask(weight, 2, 8, 0)
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 48, dtype=torch.float64)
    used, out = _saved_weight(lambda: layer(x), weight.shape)

    torch.testing.assert_close(out, x @ forward_w.T + layer.bias, rtol=0, atol=1e-6)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ backward_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, grad.T @ x.detach(),
                               rtol=0, atol=1e-6)  # dense dW
    torch.testing.assert_close(layer.bias.grad, grad.sum(0), rtol=0, atol=1e-6)
    # what the two GEMMs used: N of every M along each one's reduction dimension
    assert torch.equal(used, backward_w)
    assert torch.all(_groups(layer.weight, 8, dim=1) == 2)  # forward: along the inputs
    assert torch.all(_groups(used, 8, dim=0) == 2)  # backward data: along the outputs
    # effective MACs per example: N/M of the dense layer's in both GEMMs
    assert int(torch.count_nonzero(layer.weight)) == weight.numel() * 2 // 8
    assert int(torch.count_nonzero(used)) == weight.numel() * 2 // 8
    assert not torch.equal(forward_w != 0, backward_w != 0)  # two different prunings


def test_conv_forward_backward_and_weight_gradient_match_reference_convolutions() -> None:
    layer = nn.Conv2d(16, 24, 3, padding=1, stride=2).double()
    weight = layer.weight.detach().clone()
    _attach(layer, n=2, m=4)
    forward_w = weight * nm_mask(weight, 2, 4, 1)
    backward_w = weight * nm_mask(weight, 2, 4, 0)
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64, requires_grad=True)
    used, out = _saved_weight(lambda: layer(x), weight.shape)
    grad = torch.randn_like(out)

    torch.testing.assert_close(out, F.conv2d(x, forward_w, layer.bias, 2, 1), rtol=0, atol=1e-6)
    out.backward(grad)
    torch.testing.assert_close(x.grad, torch.nn.grad.conv2d_input(x.shape, backward_w, grad, 2, 1),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.parametrizations.weight.original.grad,
                               torch.nn.grad.conv2d_weight(x.detach(), weight.shape, grad, 2, 1),
                               rtol=0, atol=1e-6)
    assert torch.all(_groups(layer.weight, 4, dim=1) == 2)  # along input channels
    assert torch.all(_groups(used, 4, dim=0) == 2)  # along output channels
    assert int(torch.count_nonzero(used)) == int(torch.count_nonzero(layer.weight)) == \
        weight.numel() // 2


def test_decay_adds_sr_ste_pull_on_the_weights_the_forward_mask_drops() -> None:
    layer = nn.Linear(16, 8).double()
    weight = layer.weight.detach().clone()
    _attach(layer, n=1, m=4, decay=0.5)
    x = torch.randn(3, 16, dtype=torch.float64)
    grad = torch.randn(3, 8, dtype=torch.float64)
    layer(x).backward(grad)
    dropped = ~nm_mask(weight, 1, 4, 1)
    torch.testing.assert_close(layer.parametrizations.weight.original.grad,
                               grad.T @ x + 0.5 * dropped * weight, rtol=0, atol=1e-9)


class _Check(Callback):
    """After every step (and nm's mask update): the masks are those of the current dense
    weights, and the dense weights are all still there."""

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m, self.steps = n, m, 0

    def on_step_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, float]) -> None:
        for t in prunable_targets(model):
            dense = t.original.detach()
            parametrization = t.module.parametrizations.weight[0]
            assert torch.equal(parametrization.mask.bool(), nm_mask(dense, self.n, self.m, 1))
            assert torch.equal(parametrization.backward_mask.bool(),
                               nm_mask(dense, self.n, self.m, 0))
            assert int(torch.count_nonzero(dense)) == dense.numel()  # nothing zeroed
        self.steps += 1


def test_fit_recomputes_masks_every_step_and_ends_exactly_n_of_m() -> None:
    data = load("digits", seed=0)
    model = create_model("mlp", data.input_shape, data.n_outputs, width=32, depth=2)
    check = _Check(2, 8)
    result = Trainer(epochs=1, callbacks=[create_sparsifier("nm"), check], seed=0,
                     measure=False).fit(model, data)
    assert result.status == "ok", result.reason
    assert check.steps == result.metrics["steps"] > 0
    targets = prunable_targets(model)
    assert len(targets) == 3  # 64-32-32-10: every Linear layer
    for t in targets:
        assert type(t.module.parametrizations.weight[0]) is Mask  # a plain mask again
        assert "forward" not in vars(t.module)
        assert torch.all(_groups(t.weight.detach(), 8, dim=1) == 2)
        assert int(torch.count_nonzero(t.original)) == t.numel() // 4  # zeros baked in
    nonzero, total = count_nonzero(model)
    assert nonzero == total // 4 and result.metrics["nonzero_params"] == nonzero
    assert result.metrics["sparsity"] == 0.75
    # the 10-output head's backward groups are 8 + 2 wide: 2 + 2 of every 10 kept
    head = 32 * 10
    assert result.metrics["backward_sparsity"] == pytest.approx(
        1 - ((64 * 32 + 32 * 32) // 4 + head * 4 // 10) / total)
    # the reported test accuracy is that of the N:M model left behind
    with torch.no_grad():
        accuracy = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
    assert result.metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    finalize(model)
    assert count_nonzero(model) == (nonzero, total)


def test_same_seed_same_result() -> None:
    cell = Cell(dataset="digits", model="mlp", model_kwargs={"width": 32, "depth": 1},
                sparsity="nm", sparsity_kwargs={"n": 2, "m": 4}, trainer={"epochs": 2}, seed=3)
    first, second = run_cell(cell), run_cell(cell)
    assert first.status == "ok", first.reason
    assert first.metrics["test_accuracy"] == second.metrics["test_accuracy"]
    assert first.metrics["test_loss"] == second.metrics["test_loss"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n": 8, "m": 8}, "1 <= n < m, got n=8, m=8"), ({"n": 0}, "1 <= n < m"),
    ({"n": 2.5}, "integers"), ({"decay": -1.0}, "decay must be >= 0")])
def test_bad_n_m_or_decay_fail_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_sparsifier("nm", **kwargs)


def test_layer_whose_input_is_not_a_multiple_of_m_is_named_before_any_work() -> None:
    model = nn.Sequential(nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 10))
    sparsifier = create_sparsifier("nm", n=2, m=8)
    with pytest.raises(IncompatibleError, match=r"'2\.weight' has in_features=20, not a "
                                                "multiple of m=8; pass skip_incompatible=True"):
        sparsifier.on_fit_start(Trainer(measure=False), model)
    assert all(t.mask is None for t in prunable_targets(model))  # untouched


def test_cnn_first_conv_is_rejected_or_left_dense_on_request() -> None:
    data = load("digits", seed=0)
    model = create_model("cnn-tiny", data.input_shape, data.n_outputs)
    with pytest.raises(IncompatibleError, match="in_channels=1, not a multiple of m=4"):
        _attach(model, n=2, m=4)
    result = Trainer(epochs=1, callbacks=[create_sparsifier("nm", n=2, m=4,
                                                            skip_incompatible=True)],
                     measure=False).fit(model, data)
    assert result.status == "ok", result.reason
    first, *rest = prunable_targets(model)
    assert first.mask is None and int(torch.count_nonzero(first.weight)) == first.numel()
    assert rest and all(int(torch.count_nonzero(t.weight)) == t.numel() // 2 for t in rest)


def test_feedback_rules_layers_are_rejected() -> None:
    cell = Cell(dataset="digits", model="mlp-tiny", rule="fa", sparsity="nm",
                trainer={"epochs": 1})
    result = run_cell(cell)
    assert result.status == "failed" and "FeedbackLinear" in result.reason


@pytest.mark.slow
def test_nm_2_8_within_one_and_a_half_points_of_dense_on_mnist5k(
        mnist5k_dense: list[float], mnist5k_accuracies: Callable[..., list[float]]) -> None:
    dense = mnist5k_dense
    sparse = mnist5k_accuracies("nm", n=2, m=8)
    assert fmean(dense) - fmean(sparse) <= 0.015, (dense, sparse)
