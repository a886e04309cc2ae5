"""BiP: the first-order implicit gradient against autograd (exact for a linear loss, close for a
strongly regularised quadratic one), one trainer step against a hand-built reference on a 2-layer
net, the projection, exact counts at every mask update, and accuracy on digits."""

from __future__ import annotations

from statistics import fmean

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnarena.cell import Cell, run_cell
from nnarena.data import DataBundle, load
from nnarena.errors import ConfigError
from nnarena.models import create_model
from nnarena.sparsity import create_sparsifier
from nnarena.sparsity.base import Sparsifier
from nnarena.sparsity.bip import BiP, mask_gradient, project_scores
from nnarena.sparsity.masks import count_nonzero, prunable_targets
from nnarena.train import Callback, Trainer


@pytest.fixture(autouse=True)
def _no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency of the sparse kernels is measured elsewhere (test_kernels, benchmarks)."""
    monkeypatch.setattr(Sparsifier, "measure_latency", lambda self, trainer, model: {})


def test_mask_gradient_is_the_exact_implicit_gradient_of_a_linear_loss() -> None:
    """For ``ℓ(z) = cᵀz`` the Hessian-free assumption holds: ``θ*(m) = -m ⊙ c / γ`` in closed
    form, and autograd through it gives the total derivative the formula must equal."""
    g = torch.Generator().manual_seed(0)
    c, gamma = torch.randn(50, generator=g, dtype=torch.float64), 0.7
    m = torch.rand(50, generator=g, dtype=torch.float64).requires_grad_()
    theta = -m * c / gamma
    (true,) = torch.autograd.grad(c @ (m * theta), m)
    torch.testing.assert_close(mask_gradient(c, theta.detach(), m.detach(), 1 / gamma), true)


def test_mask_gradient_approaches_the_implicit_gradient_as_gamma_dominates_the_hessian() -> None:
    """Least squares: ``θ*(m)`` solved exactly, the true hypergradient by autograd through the
    solve; the first-order formula's error shrinks as ``γ`` outgrows the loss's curvature."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 10, generator=g, dtype=torch.float64)
    b = torch.randn(40, generator=g, dtype=torch.float64)
    m0 = torch.rand(10, generator=g, dtype=torch.float64)
    curvature = float(torch.linalg.matrix_norm(a.T @ a / 40, 2))

    def loss(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((a @ z - b) ** 2).mean()

    def error(gamma: float) -> float:
        m = m0.clone().requires_grad_()
        h = torch.diag(m) @ (a.T @ a / 40) @ torch.diag(m) + gamma * torch.eye(10)
        theta = torch.linalg.solve(h, m * (a.T @ b / 40))
        (true,) = torch.autograd.grad(loss(m * theta), m)
        z = (m0 * theta.detach()).requires_grad_()
        (grad_z,) = torch.autograd.grad(loss(z), z)
        approx = mask_gradient(grad_z, theta.detach(), m0, 1 / gamma)
        return float((approx - true).norm() / true.norm())

    errors = [error(k * curvature) for k in (1, 10, 100)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02


def test_projection_is_the_euclidean_projection_onto_the_relaxed_budget() -> None:
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(30, 20, generator=g) * 0.8 + 0.4, torch.randn(50, generator=g)]
    original = torch.cat([x.flatten() for x in v])
    project_scores(v, budget=100.0)
    p = torch.cat([x.flatten() for x in v])
    assert p.min() >= 0 and p.max() <= 1 and float(p.sum()) == pytest.approx(100.0, rel=1e-4)
    # Variational inequality: (v - p) . (q - p) <= 0 for every feasible q.
    for _ in range(200):
        q = torch.rand(p.numel(), generator=g)
        q = q * min(1.0, 100.0 / float(q.sum()))
        assert float((original - p) @ (q - p)) <= 1e-3
    inside = [torch.full((10,), 0.5)]
    project_scores(inside, budget=6.0)  # already feasible: unchanged
    assert torch.equal(inside[0], torch.full((10,), 0.5))


class _Record(Callback):
    """Snapshots in ``on_after_backward`` (before or after BiP's, by list position)."""

    def __init__(self, bip: BiP) -> None:
        self.bip, self.seen = bip, {}

    def on_after_backward(self, trainer: Trainer, model: nn.Module) -> None:
        self.seen = {
            "theta": {t.name: t.original.detach().clone() for t in self.bip.targets},
            "grad": {t.name: t.original.grad.clone() for t in self.bip.targets},
            "mask": {t.name: t.mask.clone() for t in self.bip.targets},
            "m": {k: v.clone() for k, v in self.bip.m.items()},
            "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        }


def test_one_step_matches_a_hand_built_reference_on_a_two_layer_net(blobs: DataBundle) -> None:
    """Full batch, one step: BiP's score step is ``-mask_lr`` times ``∇_m ℓ - c ∇_z ℓ ⊙ ∇_θ ℓ``
    evaluated by autograd on an explicit forward ``z = m ⊙ θ``, its caught ``∇_z ℓ`` is autograd's
    at every position (pruned ones too), and ``γθ`` was added to the weights' gradients."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    gamma, ig_scale, mask_lr = 0.05, 3.0, 0.5
    bip = BiP(sparsity=0.5, gamma=gamma, ig_scale=ig_scale, mask_lr=mask_lr, start=0.0, every=1)
    before, after = _Record(bip), _Record(bip)
    Trainer(epochs=1, batch_size=len(blobs.train), callbacks=[before, bip, after],
            measure=False).fit(model, blobs)
    x, y = blobs.train.x.flatten(1), blobs.train.y
    names = [t.name for t in bip.targets]
    theta = {k: before.seen["theta"][k].requires_grad_() for k in names}
    mask = {k: before.seen["mask"][k].requires_grad_() for k in names}
    z = {k: mask[k] * theta[k] for k in names}
    for v in z.values():
        v.retain_grad()
    bias = before.seen["params"]
    hidden = F.relu(F.linear(x, z["1.weight"], bias["1.bias"]))
    F.cross_entropy(F.linear(hidden, z["3.weight"], bias["3.bias"]), y).backward()
    for k in names:
        expected = mask[k].grad - ig_scale * z[k].grad * theta[k].grad
        step = (before.seen["m"][k] - after.seen["m"][k]) / mask_lr
        assert (mask[k].detach() == 0).any() and (expected != 0).all()
        torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bip.grad_z[k], z[k].grad)
        torch.testing.assert_close(after.seen["grad"][k],
                                   theta[k].grad + gamma * theta[k].detach())
    # The checks above are only valid if the projection left the stepped scores alone.
    stepped = torch.cat([v.flatten() for v in after.seen["m"].values()])
    assert stepped.min() > 0 and stepped.max() < 1 and stepped.sum() < 0.5 * stepped.numel()


class _Masks(Callback):
    def __init__(self, bip: BiP) -> None:
        self.bip, self.nonzero, self.masks = bip, [], []

    def on_step_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, float]) -> None:
        if self.bip.m:
            self.nonzero.append(count_nonzero(model)[0])
            self.masks.append(torch.cat([t.mask.flatten() for t in self.bip.targets]))


@pytest.mark.parametrize("allocation", ["global", "layerwise"])
def test_every_update_keeps_the_exact_count_and_the_mask_moves(allocation: str) -> None:
    data = load("digits", seed=0)
    model = create_model("mlp", data.input_shape, data.n_outputs, width=32, depth=2)
    bip = create_sparsifier("bip", sparsity=0.9, allocation=allocation, start=0.2, every=1)
    log = _Masks(bip)
    result = Trainer(epochs=3, callbacks=[bip, log], measure=False).fit(model, data)
    total = count_nonzero(model)[1]
    assert set(log.nonzero) == {round(0.1 * total)}  # exact at every step of the bi-level phase
    assert result.metrics["nonzero_params"] == round(0.1 * total)
    assert not torch.equal(log.masks[0], log.masks[-1])  # the upper level changed the mask
    for t in prunable_targets(model):
        assert t.mask is not None and torch.all(t.original[t.mask == 0] == 0)  # zeroed at the end
        if allocation == "layerwise":
            assert int(t.mask.sum()) == round(0.1 * t.numel())


def test_bad_options_name_the_valid_range() -> None:
    with pytest.raises(ConfigError, match="mask_lr > 0"):
        create_sparsifier("bip", mask_lr=0.0)
    with pytest.raises(ConfigError, match="0 <= start <= end <= 1"):
        create_sparsifier("bip", start=0.8, end=0.5)
    with pytest.raises(ConfigError, match="every must be >= 1"):
        create_sparsifier("bip", every=0)
    with pytest.raises(ConfigError, match="'global', 'layerwise', 'erk'"):
        create_sparsifier("bip", allocation="uniform")


@pytest.mark.slow
def test_digits_bip_beats_gradual_magnitude_and_double_budget_lottery_at_90() -> None:
    """Digits MLP 64-64-64-10, Adam 1e-3, seeds 0-2, 90% sparsity: BiP (15 epochs) above
    gradual global magnitude (15 epochs) and IMP with rewinding at twice the epochs (30)."""
    def accuracy(sparsity: str, epochs: int) -> float:
        accs = []
        for seed in range(3):
            result = run_cell(Cell(dataset="digits", model="mlp",
                                   model_kwargs={"width": 64, "depth": 2}, sparsity=sparsity,
                                   sparsity_kwargs={"sparsity": 0.9}, seed=seed,
                                   trainer={"epochs": epochs, "lr": 1e-3, "batch_size": 64,
                                            "measure": False}))
            assert result.status == "ok", result.reason
            assert result.metrics["sparsity"] == pytest.approx(0.9, abs=1e-3)
            accs.append(result.metrics["test_accuracy"])
        return fmean(accs)

    bip = accuracy("bip", 15)
    assert bip > accuracy("global-magnitude", 15) + 0.01
    assert bip > accuracy("lottery", 30)
