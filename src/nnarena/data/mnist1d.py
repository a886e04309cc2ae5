"""MNIST-1D (Greydanus & Kobak, "Scaling down Deep Learning with MNIST-1D"), generated locally.

The arrays come from the ``mnist1d`` package's own generator (``mnist1d.data.make_dataset``) with
its default arguments (5000 length-40 signals, 4000/1000 train/test, generator seed 42); its
download path (``get_dataset``) is never used. The result is cached as ``.npz`` under
``platformdirs.user_cache_dir("nnarena")`` (or ``$NNARENA_CACHE_DIR``), keyed by a hash of the
generator arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from nnarena.data._bundle import DataBundle, make_bundle
from nnarena.errors import ConfigError, DataError
from nnarena.registry import register

__all__ = ["cache_dir", "mnist1d"]

_KEYS = ("x", "y", "x_test", "y_test")


def cache_dir() -> Path:
    """Where nnarena caches generated data: ``$NNARENA_CACHE_DIR`` or the user cache folder."""
    env = os.environ.get("NNARENA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("nnarena"))


def _generator_args(num_samples: int) -> dict[str, Any]:
    try:
        from mnist1d.data import get_dataset_args
    except ImportError as e:
        raise DataError(f"mnist1d needs the mnist1d package ({e}): pip install mnist1d") from None
    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # where get_dataset would download from; not a generator argument
    args["num_samples"] = num_samples
    return args


def _generate(args: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run mnist1d's generator, leaving numpy's and Python's global RNG states untouched."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {"x": np.asarray(data["x"], np.float32), "y": np.asarray(data["y"], np.int64),
            "x_test": np.asarray(data["x_test"], np.float32),
            "y_test": np.asarray(data["y_test"], np.int64)}


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or ``None`` when the file is absent or unreadable (then regenerate)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in _KEYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    ok = all(arrays[x].ndim == 2 and len(arrays[x]) == len(arrays[y])
             for x, y in (("x", "y"), ("x_test", "y_test")))
    return arrays if ok else None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file, then rename); a read-only cache folder only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        warnings.warn(f"could not cache MNIST-1D at {path}: {e}", stacklevel=3)


def load_arrays(num_samples: int = 5000) -> tuple[dict[str, np.ndarray], Path]:
    """The generated MNIST-1D arrays (from the cache when possible) and the cache file's path."""
    args = _generator_args(num_samples)
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-{key}.npz"
    arrays = _read_cache(path)
    if arrays is None:
        arrays = _generate(args)
        _write_cache(path, arrays)
    return arrays, path


@register("dataset", "mnist1d", summary="MNIST-1D: 10 classes of length-40 1-D signals, "
          "generated locally (4000/1000 train/test).")
def mnist1d(seed: int = 0, num_samples: int = 5000) -> DataBundle:
    """MNIST-1D as ``(1, 40)`` signals; the generator's 80/20 train/test split is kept fixed.

    The generator always runs with its canonical seed (42), so the signals are the same for every
    ``seed``; ``seed`` only picks the stratified validation tenth of the training signals.

    Args:
        seed: validation split seed.
        num_samples: signals to generate in all (train plus test; ``num_samples // 10`` per class).
    """
    if num_samples < 20:
        raise ConfigError(f"dataset 'mnist1d' num_samples must be >= 20, got {num_samples}")
    arrays, path = load_arrays(num_samples)
    x = arrays["x"]
    return make_bundle("mnist1d", x, arrays["y"], task="classification", seed=seed,
                       input_shape=(1, x.shape[1]), standardize="global",
                       test=(arrays["x_test"], arrays["y_test"]),
                       meta={"source": "mnist1d.data.make_dataset", "cache": str(path),
                             "num_samples": num_samples})
