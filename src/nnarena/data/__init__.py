"""Datasets: ``nnarena.data.load(name, seed=0, **kw) -> DataBundle``. Nothing is downloaded, ever.

Names take an argument after a colon where the dataset needs one: ``synthetic:xy``,
``mnist-idx:/path/to/dir``, ``cifar10:/path/to/cifar-10-batches-py``.
"""

from __future__ import annotations

from typing import Any

# Importing a loader module registers it.
from nnarena.data import cifar10, mnist, mnist1d, sklearn_sets, synthetic  # noqa: F401
from nnarena.data._bundle import DataBundle, Split, make_bundle
from nnarena.errors import ConfigError
from nnarena.registry import get as _get

__all__ = ["DataBundle", "Split", "load", "make_bundle"]


def load(name: str, seed: int = 0, **kwargs: Any) -> DataBundle:
    """Load dataset ``name`` (``base`` or ``base:argument``), deterministic for ``seed``.

    Raises:
        UnknownNameError: no such dataset (the message lists the valid ones and the closest).
        ConfigError: a bad keyword, or a missing/unexpected ``:argument``.
        DataError: a user file is missing, truncated or in the wrong format.
    """
    base, _, arg = name.partition(":")
    entry = _get("dataset", base)
    arg_name = entry.extra.get("arg")
    entry.check_kwargs(kwargs, given=["seed", *([arg_name] if arg_name else [])])
    if arg_name and not arg:
        raise ConfigError(f"dataset '{base}' needs an argument: '{base}:<{arg_name}>' "
                          f"({entry.extra.get('arg_help', arg_name)})")
    if arg and not arg_name:
        raise ConfigError(f"dataset '{base}' takes no ':' argument, got '{name}'")
    kwargs = entry.coerce_kwargs(kwargs)
    if arg_name:
        kwargs[arg_name] = arg
    return entry.factory(seed=seed, **kwargs)
