"""make_bundle: seeded stratified splits and standardisation from train statistics only."""

from __future__ import annotations

import numpy as np
import pytest

from nnarena.data import make_bundle


def test_regression_targets_untouched_by_default() -> None:
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    y = 5 + 3 * x[:, :1]
    b = make_bundle("t", x, y, task="regression", seed=0, standardize="none")
    np.testing.assert_array_equal(b.train.y.numpy(), 5 + 3 * b.train.x.numpy()[:, :1])
    assert "target_mean" not in b.meta


def test_standardize_targets_uses_train_stats_and_records_them() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    y = np.stack([100 + 20 * x[:, 0], -3 + 0.5 * x[:, 1]], axis=1)
    x_test = rng.normal(size=(50, 3))
    y_test = np.stack([100 + 20 * x_test[:, 0], -3 + 0.5 * x_test[:, 1]], axis=1)
    b = make_bundle("t", x, y, task="regression", seed=1, test=(x_test, y_test),
                    standardize_targets=True)
    ty = b.train.y.numpy()
    np.testing.assert_allclose(ty.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ty.std(0), 1, atol=1e-5)
    mean, std = np.array(b.meta["target_mean"]), np.array(b.meta["target_std"])
    assert mean.shape == std.shape == (2,)
    np.testing.assert_allclose(b.test.y.numpy() * std + mean, y_test, rtol=1e-4)
    assert b.n_outputs == 2


def test_standardize_targets_ignored_for_classification() -> None:
    x = np.random.default_rng(0).normal(size=(100, 2))
    y = np.arange(100) % 4
    b = make_bundle("t", x, y, task="classification", seed=0, standardize_targets=True)
    assert set(b.train.y.tolist()) == {0, 1, 2, 3} and "target_mean" not in b.meta


@pytest.mark.parametrize("seed", [0, 1])
def test_stratified_three_way_split(seed: int) -> None:
    y = np.repeat(np.arange(5), 40)  # sorted labels, like mnist5k's file
    x = np.arange(len(y), dtype=np.float32)[:, None]
    b = make_bundle("t", x, y, task="classification", seed=seed, standardize="none")
    assert (len(b.train), len(b.val), len(b.test)) == (140, 20, 40)
    for split, per_class in ((b.train, 28), (b.val, 4), (b.test, 8)):
        assert np.bincount(split.y.numpy(), minlength=5).tolist() == [per_class] * 5
    ids = np.concatenate([s.x.numpy()[:, 0] for s in (b.train, b.val, b.test)])
    assert sorted(ids.tolist()) == list(range(200))
