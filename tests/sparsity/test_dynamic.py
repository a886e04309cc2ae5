"""``set``, ``rigl``, ``dsl``: constant active count, moving masks, RigL's growth against a hand
computation, DSL's adapting densities and its matrix-factorisation check."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nnarena.errors import ConfigError
from nnarena.models import create_model
from nnarena.rules.base import RuleCapabilities
from nnarena.sparsity import Sparsifier, create_sparsifier
from nnarena.sparsity.allocation import keep_counts
from nnarena.sparsity.masks import count_nonzero, masked_targets
from nnarena.train import Callback, Trainer


@pytest.fixture(autouse=True)
def _no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the sparse-latency measurement while the kernels module is not there."""
    try:
        import nnarena.sparsity.kernels  # noqa: F401
    except ImportError:
        monkeypatch.setattr(Sparsifier, "measure_latency", lambda self, trainer, model: {})


class _Counts(Callback):
    """Runs after the sparsifier: the active count per tensor after every step."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.counts: list[dict[str, int]] = []
        self.nonzero: list[int] = []

    def on_fit_start(self, trainer: Trainer, model: nn.Module) -> None:
        self.initial = {t.name: t.mask.bool().clone() for t in masked_targets(model)}
        self.on_step_end(trainer, model, {})

    def on_step_end(self, trainer: Trainer, model: nn.Module, logs: dict[str, float]) -> None:
        self.counts.append({t.name: int(t.mask.sum()) for t in masked_targets(model)})
        self.nonzero.append(count_nonzero(model)[0])


def _fit(blobs, method: str, **kwargs):
    sparsifier = create_sparsifier(method, sparsity=0.8, every=5, end=1.0, **kwargs)
    counts = _Counts()
    model = create_model("mlp", blobs.input_shape, blobs.n_outputs, width=32, depth=2)
    trainer = Trainer(epochs=6, batch_size=16, lr=1e-2, measure=False,
                      callbacks=[sparsifier, counts])
    result = trainer.fit(model, blobs)
    assert result.status == "ok"
    return sparsifier, counts, model, result


@pytest.mark.parametrize(("method", "allocation"),
                         [("set", "erk"), ("rigl", "erk"), ("dsl", "layerwise")])
def test_active_count_is_constant_and_the_mask_moves(blobs, method, allocation) -> None:
    sparsifier, counts, model, result = _fit(blobs, method)
    shapes = {t.name: tuple(t.original.shape) for t in sparsifier.targets}
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    target = sum(keep_counts(sizes, 0.8, allocation, shapes).values())
    assert abs(target - 0.2 * sum(sizes.values())) <= len(sizes)
    assert len(counts.counts) == result.metrics["steps"] + 1
    assert all(sum(c.values()) == target for c in counts.counts)
    assert all(n <= target for n in counts.nonzero)  # regrown weights start at zero
    if method != "dsl":  # per tensor too
        assert all(c == counts.counts[0] for c in counts.counts)
    updates = [h for h in sparsifier.history if "regrown" in h]
    assert len(updates) == result.metrics["steps"] // 5 and updates[0]["regrown"] > 0
    moved = sum(int((t.mask.bool() & ~counts.initial[t.name]).sum())
                for t in masked_targets(model))
    assert moved > 0


def test_dsl_densities_adapt_across_tensors_at_a_fixed_total(blobs) -> None:
    _, counts, _, _ = _fit(blobs, "dsl")
    assert counts.counts[-1] != counts.counts[0]
    assert len({sum(c.values()) for c in counts.counts}) == 1


def test_drop_fraction_follows_the_cosine_schedule() -> None:
    rigl = create_sparsifier("rigl", drop=0.3, every=10, end=0.5)
    assert rigl.drop_fraction(0, 100) == pytest.approx(0.3)
    assert rigl.drop_fraction(25, 100) == 0.0  # not an update step
    assert rigl.drop_fraction(20, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi * 0.4)))
    assert rigl.drop_fraction(60, 100) == 0.0  # after end


def _driver(total_steps: int) -> SimpleNamespace:
    return SimpleNamespace(step=0, total_steps=total_steps, seed=0,
                           rule=SimpleNamespace(capabilities=RuleCapabilities(), name="manual"))


def test_rigl_grows_where_the_dense_gradient_is_largest() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    rigl = create_sparsifier("rigl", sparsity=0.5, drop=0.3, every=1, end=1.0)
    driver, lr = _driver(total_steps=4), 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    rigl.on_fit_start(driver, model)
    targets = masked_targets(model)
    masks = [t.mask.bool().clone() for t in targets]
    weights = [t.weight.detach().clone() for t in targets]

    # By hand: the gradient with respect to the effective (masked) weights, dense everywhere.
    w1, w2 = (w.clone().requires_grad_() for w in weights)
    b1, b2 = model[0].bias.detach(), model[2].bias.detach()
    loss = F.cross_entropy(F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2), y)
    dense = torch.autograd.grad(loss, [w1, w2])

    rigl.on_step_start(driver, model)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    rigl.on_before_optimizer_step(driver, model, optimizer)
    optimizer.step()
    driver.step = 1
    rigl.on_step_end(driver, model, {})

    fraction = 0.15 * (1 + math.cos(math.pi / 4))
    for t, mask, w, g in zip(targets, masks, weights, dense, strict=True):
        stepped = w - lr * g * mask  # SGD on the original, whose gradient is masked
        k = round(fraction * int(mask.sum()))
        assert k > 0
        active = mask.flatten().nonzero().squeeze(1)
        dropped = active[stepped.abs().flatten()[active].argsort()[:k]]
        keep = mask.flatten().clone()
        keep[dropped] = False
        inactive = (~keep).nonzero().squeeze(1)
        grown = inactive[g.abs().flatten()[inactive].argsort(descending=True)[:k]]
        expected = keep.clone()
        expected[grown] = True
        new = t.mask.bool().flatten()
        assert torch.equal(new, expected)
        survivors = keep & expected
        assert torch.equal(t.weight.detach().flatten()[survivors], stepped.flatten()[survivors])
        assert not t.weight.detach().flatten()[expected & ~survivors].any()  # regrown at zero


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match="drop"):
        create_sparsifier("set", drop=0.0)
    with pytest.raises(ConfigError, match="distribution"):
        create_sparsifier("rigl", distribution="normal")
    with pytest.raises(ConfigError, match="every"):
        create_sparsifier("dsl", every=0)


# DSL's paper check: implicit-feedback matrix factorisation on a synthetic low-rank model.

class _MF(nn.Module):
    def __init__(self, users: int, items: int, dim: int) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(users, dim), nn.Embedding(items, dim)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)


def _interactions(users: int = 300, items: int = 400, rank: int = 4, per_user: int = 20):
    """Each user's 20 best items under a rank-4 model plus noise; a fifth held out for testing."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(users, rank, generator=g), torch.randn(items, rank, generator=g)
    scores = u @ v.T + 0.5 * torch.randn(users, items, generator=g)
    seen = torch.zeros(users, items, dtype=torch.bool)
    seen.scatter_(1, scores.topk(per_user, dim=1).indices, True)
    test = seen & (torch.rand(users, items, generator=g) < 0.2)
    return seen & ~test, test


def _bpr(train: torch.Tensor, method: str, epochs: int = 40, **kwargs: object) -> _MF:
    """BPR with one sampled negative per positive, Adam; the sparsifier driven as a callback."""
    torch.manual_seed(0)
    model = _MF(*train.shape, dim=64)
    pairs = train.nonzero()
    batches = math.ceil(len(pairs) / 256)
    driver = _driver(epochs * batches)
    sparsifier = None if method == "none" else create_sparsifier(method, **kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    if sparsifier:
        sparsifier.on_fit_start(driver, model)
        active = sum(int(t.mask.sum()) for t in sparsifier.targets)
        assert active == round(0.1 * 300 * 64) + round(0.1 * 400 * 64)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(pairs), generator=g).split(256):
            user, pos = pairs[idx, 0], pairs[idx, 1]
            neg = torch.randint(train.shape[1], (len(idx),), generator=g)
            if sparsifier:
                sparsifier.on_step_start(driver, model)
            optimizer.zero_grad()
            items = model.item.weight
            (-F.logsigmoid((model.user(user) * (items[pos] - items[neg])).sum(1))).mean().backward()
            if sparsifier:
                sparsifier.on_before_optimizer_step(driver, model, optimizer)
            optimizer.step()
            driver.step += 1
            if sparsifier:
                sparsifier.on_step_end(driver, model, {})
                assert sum(int(t.mask.sum()) for t in sparsifier.targets) == active
    return model


def _recall_at_20(model: _MF, train: torch.Tensor, test: torch.Tensor) -> float:
    with torch.no_grad():
        scores = (model.user.weight @ model.item.weight.T).masked_fill(train, -torch.inf)
    hits = test.gather(1, scores.topk(20, dim=1).indices).sum(1)
    n = test.sum(1)
    return float((hits[n > 0] / n[n > 0].clamp(max=20)).mean())


@pytest.mark.slow
def test_dsl_matrix_factorisation_beats_a_static_random_mask() -> None:
    """90% embedding sparsity: DSL's Recall@20 is several times a static random mask's and most
    of dense's (seeds 0-2 with this setup: dense 0.70, dsl 0.53, random 0.14)."""
    train, test = _interactions()
    dense = _recall_at_20(_bpr(train, "none"), train, test)
    dsl = _recall_at_20(_bpr(train, "dsl", sparsity=0.9, every=10), train, test)
    static = _recall_at_20(_bpr(train, "random", sparsity=0.9, distribution="uniform"), train,
                           test)
    assert dsl > 3 * static
    assert dsl > 0.65 * dense
