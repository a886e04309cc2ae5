"""Every bundled dataset loads, with the right shapes, dtypes and disjoint, seeded splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnarena.data import DataBundle, load
from nnarena.registry import list_entries

# name -> (task, input_shape, n_classes, n_outputs, total rows)
EXPECTED = {
    "digits": ("classification", (1, 8, 8), 10, 10, 1797),
    "breast-cancer": ("classification", (30,), 2, 2, 569),
    "wine": ("classification", (13,), 3, 3, 178),
    "diabetes": ("regression", (10,), None, 1, 442),
    "mnist5k": ("classification", (1, 28, 28), 10, 10, 5000),
    "mnist1d": ("classification", (1, 40), 10, 10, 5000),
    "synthetic:exp-sin-sq": ("regression", (2,), None, 1, 2000),
    "synthetic:exp-100d": ("regression", (100,), None, 1, 2000),
}


def _splits(b: DataBundle) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": (b.train.x, b.train.y), "val": (b.val.x, b.val.y),
            "test": (b.test.x, b.test.y)}


def test_registered_names() -> None:
    names = {e.name for e in list_entries("dataset")}
    assert names >= {"digits", "breast-cancer", "wine", "diabetes", "mnist5k", "mnist-idx",
                     "mnist1d", "synthetic", "cifar10"}
    for e in list_entries("dataset"):
        assert e.summary, e.name
        assert e.param("seed") is not None and e.param("seed").default == 0


@pytest.mark.parametrize("name", list(EXPECTED))
def test_loads_with_right_shapes(name: str) -> None:
    task, shape, n_classes, n_outputs, total = EXPECTED[name]
    b = load(name)
    assert (b.task, b.input_shape, b.n_classes, b.n_outputs) == (task, shape, n_classes, n_outputs)
    assert len(b.train) + len(b.val) + len(b.test) == total
    assert min(len(b.train), len(b.val), len(b.test)) > 0
    for split, (x, y) in _splits(b).items():
        assert x.dtype == torch.float32, split
        assert tuple(x.shape[1:]) == shape, split
        assert torch.isfinite(x).all(), split
        if task == "classification":
            assert y.dtype == torch.int64 and y.shape == (len(x),), split
            assert int(y.min()) >= 0 and int(y.max()) < n_classes
        else:
            assert y.dtype == torch.float32 and y.shape == (len(x), n_outputs), split
    assert b.meta["seed"] == 0 and b.meta.get("source")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_same_seed_same_bundle_other_seed_other_split(name: str) -> None:
    a, b, c = load(name, seed=3), load(name, seed=3), load(name, seed=4)
    for (xa, ya), (xb, yb) in zip(_splits(a).values(), _splits(b).values(), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.train.x[:50], c.train.x[:50])


@pytest.mark.parametrize("name", ["digits", "breast-cancer", "wine", "mnist5k", "mnist1d"])
def test_splits_do_not_overlap(name: str) -> None:
    # These sets hold no duplicate rows, so a row in two splits means a leaked example.
    b = load(name, seed=1)
    rows = {k: {r.tobytes() for r in x.reshape(len(x), -1).numpy()}
            for k, (x, _) in _splits(b).items()}
    assert sum(map(len, rows.values())) == len(b.train) + len(b.val) + len(b.test)
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]


def test_mnist5k_stratified_and_standardised() -> None:
    b = load("mnist5k", seed=7)
    assert (len(b.train), len(b.val), len(b.test)) == (3500, 500, 1000)
    for split in (b.train, b.val, b.test):
        counts = np.bincount(split.y.numpy(), minlength=10)
        assert (counts > 0).all()
        assert np.abs(counts / counts.sum() - 0.1).max() < 0.02
    assert abs(float(b.train.x.mean())) < 1e-3 and abs(float(b.train.x.std()) - 1) < 1e-3
    # Real digits: a 28x28 image has mostly background and some ink.
    assert float((b.train.x[0] > 0).float().mean()) < 0.5


def test_digits_global_standardisation() -> None:
    b = load("digits")
    x = b.train.x
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    # Global, not per feature: the always-blank corner pixel stays one constant value.
    corner = torch.cat([b.train.x, b.val.x, b.test.x])[:, 0, 0, 0]
    assert torch.all(corner == corner[0]) and float(corner[0]) < 0


def test_diabetes_targets_standardised_on_train() -> None:
    from sklearn.datasets import load_diabetes

    b = load("diabetes", seed=2)
    y = b.train.y.numpy()[:, 0]
    assert abs(y.mean()) < 1e-5 and abs(y.std() - 1) < 1e-5
    mean, std = b.meta["target_mean"][0], b.meta["target_std"][0]
    assert 100 < mean < 200 and 50 < std < 100
    restored = torch.cat([b.train.y, b.val.y, b.test.y]).numpy()[:, 0] * std + mean
    np.testing.assert_allclose(np.sort(restored), np.sort(load_diabetes().target), rtol=1e-5)


def test_mnist1d_test_split_fixed_across_seeds() -> None:
    a, b = load("mnist1d", seed=0), load("mnist1d", seed=1)
    assert torch.equal(a.test.y, b.test.y)
    assert len(a.test) == 1000 and len(a.train) + len(a.val) == 4000
    assert not torch.equal(a.val.y, b.val.y)
