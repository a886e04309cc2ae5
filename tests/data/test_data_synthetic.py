"""KAN-paper function-fitting sets: targets are the formulas evaluated on the stored inputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.special import j0

from nnarena.data import load
from nnarena.data.synthetic import FUNCTIONS
from nnarena.errors import ConfigError, UnknownNameError

# Written out independently of nnarena's table (KAN paper, Section 3.1).
REFERENCE: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "exp-sin-sq": (2, lambda x: np.exp(np.sin(np.pi * x[:, 0]) + x[:, 1] ** 2)),
    "xy": (2, lambda x: x[:, 0] * x[:, 1]),
    "bessel": (1, lambda x: j0(20 * x[:, 0])),
    "exp-4d": (4, lambda x: np.exp(0.5 * np.sin(np.pi * (x[:, 0] ** 2 + x[:, 1] ** 2))
                                   + 0.5 * np.sin(np.pi * (x[:, 2] ** 2 + x[:, 3] ** 2)))),
    "exp-100d": (100, lambda x: np.exp(sum(np.sin(np.pi * x[:, i] / 2) ** 2
                                           for i in range(100)) / 100)),
}


def test_reference_covers_every_function() -> None:
    assert set(REFERENCE) == set(FUNCTIONS)


@pytest.mark.parametrize("fn", list(REFERENCE))
def test_targets_are_the_formula(fn: str) -> None:
    n_in, f = REFERENCE[fn]
    b = load(f"synthetic:{fn}", seed=5, n_train=200, n_test=150)
    assert b.input_shape == (n_in,) and b.task == "regression" and b.n_outputs == 1
    assert (len(b.train), len(b.val), len(b.test)) == (180, 20, 150)
    for split in (b.train, b.val, b.test):
        x = split.x.double().numpy()
        assert split.y.dtype == torch.float32 and split.y.shape == (len(x), 1)
        assert x.min() >= -1 and x.max() <= 1  # not standardised: KAN grids live on [-1, 1]
        np.testing.assert_allclose(split.y.double().numpy()[:, 0], f(x), rtol=1e-6, atol=1e-6)
    x = b.train.x.numpy()
    assert x.min() < -0.9 and x.max() > 0.9 and abs(x.mean()) < 0.1  # uniform on [-1, 1]


def test_noise_on_train_only() -> None:
    _, f = REFERENCE["exp-sin-sq"]
    b = load("synthetic:exp-sin-sq", seed=1, n_train=2000, n_test=300, noise=0.1)
    residual = b.train.y.double().numpy()[:, 0] - f(b.train.x.double().numpy())
    assert 0.09 < residual.std() < 0.11
    np.testing.assert_allclose(b.test.y.double().numpy()[:, 0], f(b.test.x.double().numpy()),
                               rtol=1e-6)


def test_seed_changes_inputs() -> None:
    a, b = load("synthetic:xy", seed=0), load("synthetic:xy", seed=1)
    assert not torch.equal(a.test.x, b.test.x)
    assert torch.equal(a.test.x, load("synthetic:xy", seed=0).test.x)


def test_string_params_are_coerced() -> None:
    b = load("synthetic:xy", n_train="100", n_test="10", noise="0")
    assert len(b.train) + len(b.val) == 100 and len(b.test) == 10


def test_unknown_function() -> None:
    with pytest.raises(UnknownNameError, match=r"'xz'.*did you mean 'xy'.*valid: .*exp-sin-sq"):
        load("synthetic:xz")


@pytest.mark.parametrize("kw", [{"n_train": 5}, {"n_test": 0}, {"noise": -1.0}])
def test_bad_sizes(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        load("synthetic:xy", **kw)
