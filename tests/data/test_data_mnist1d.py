"""MNIST-1D: generated locally once, then read from the .npz cache; global RNGs untouched."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import mnist1d.data
import numpy as np
import pytest
import torch

from nnarena.data import load

N = 300  # small, so generating is quick


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Point the cache at an empty folder and count calls to mnist1d's generator."""
    monkeypatch.setenv("NNARENA_CACHE_DIR", str(tmp_path))
    counter: list[int] = []
    real = mnist1d.data.make_dataset

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        counter.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mnist1d.data, "make_dataset", counting)
    monkeypatch.setattr(mnist1d.data, "get_dataset", _no_download)
    return counter


def _no_download(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("get_dataset (the download path) must not be called")


def test_second_load_hits_cache(calls: list[int], tmp_path: Path) -> None:
    a = load("mnist1d", num_samples=N)
    assert len(calls) == 1
    files = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(files) == 1 and a.meta["cache"] == str(files[0])
    b = load("mnist1d", num_samples=N)
    assert len(calls) == 1
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert len(a.train) + len(a.val) == int(0.8 * N) and len(a.test) == N - int(0.8 * N)
    assert a.input_shape == (1, 40)
    # Other generator arguments get their own cache file.
    load("mnist1d", num_samples=N + 100)
    assert len(calls) == 2 and len(list(tmp_path.glob("mnist1d-*.npz"))) == 2


def test_corrupt_cache_is_regenerated(calls: list[int], tmp_path: Path) -> None:
    a = load("mnist1d", num_samples=N)
    (cache,) = tmp_path.glob("mnist1d-*.npz")
    cache.write_bytes(b"not a zip file at all")
    b = load("mnist1d", num_samples=N)
    assert len(calls) == 2
    assert torch.equal(a.train.x, b.train.x)
    load("mnist1d", num_samples=N)
    assert len(calls) == 2  # rewritten, readable again


def test_matches_the_canonical_generator(calls: list[int]) -> None:
    args = mnist1d.data.get_dataset_args()
    args.num_samples = N
    ref = mnist1d.data.make_dataset(args)
    b = load("mnist1d", num_samples=N)
    # The test split is the generator's, in its order; x only differs by the train-stat scaling.
    np.testing.assert_array_equal(b.test.y.numpy(), ref["y_test"])
    corr = np.corrcoef(b.test.x.numpy().ravel(), ref["x_test"].ravel())[0, 1]
    assert corr > 0.99999


def test_global_rng_state_untouched(calls: list[int]) -> None:
    np.random.seed(1234)
    random.seed(1234)
    np_before, py_before = np.random.get_state(), random.getstate()
    load("mnist1d", num_samples=N)  # generates
    load("mnist1d", num_samples=N)  # reads the cache
    assert len(calls) == 1
    np_after = np.random.get_state()
    assert np_before[0] == np_after[0] and np.array_equal(np_before[1], np_after[1])
    assert np_before[2:] == np_after[2:]
    assert random.getstate() == py_before


def test_bad_num_samples() -> None:
    from nnarena.errors import ConfigError

    with pytest.raises(ConfigError, match="num_samples"):
        load("mnist1d", num_samples=5)
