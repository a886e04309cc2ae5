"""CIFAR-10 (Krizhevsky 2009) from a local ``cifar-10-batches-py`` folder; nothing is downloaded.

The folder is the one in the official ``cifar-10-python.tar.gz``: ``data_batch_1`` to
``data_batch_5`` and ``test_batch``, each a Python pickle of a dict with ``b"data"`` (uint8
``(N, 3072)``, channel-major 3x32x32 rows) and ``b"labels"`` (N ints 0-9). The pickles are read
with a restricted unpickler that only rebuilds numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from nnarena.data._bundle import DataBundle, make_bundle
from nnarena.errors import ConfigError, DataError
from nnarena.registry import register

__all__ = ["cifar10", "read_batch"]

_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST = "test_batch"
_FORMAT = ("a CIFAR-10 python batch: a pickled dict with b'data' (uint8, N x 3072) and "
           "b'labels' (N ints 0-9)")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes, latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = _frombuffer
    return allowed


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 array rebuild, for plain (non-object) dtypes only."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(f"{self._path}: refusing to unpickle global '{module}.{name}' "
                            f"(only numpy arrays are allowed); expected {_FORMAT}") from None


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch file: ``(uint8 (N, 3072) images, int64 (N,) labels)``.

    Raises:
        DataError: the file is missing, truncated, not a safe pickle, or not a CIFAR-10 batch.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, path).load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; expected {_FORMAT}") from None
    except Exception as e:  # truncated or garbled pickles raise many different errors
        raise DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); "
                        f"expected {_FORMAT}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a dict; expected {_FORMAT}")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is {got}; expected {_FORMAT}")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' is not a list of ints; expected {_FORMAT}") from None
    if len(y) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(y)} labels; expected {_FORMAT}")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels outside 0-9; expected {_FORMAT}")
    return data, y


@register("dataset", "cifar10", summary="CIFAR-10 (50k/10k 32x32 colour images, 10 classes) "
          "from a local cifar-10-batches-py folder.", arg="path",
          arg_help="the cifar-10-batches-py folder")
def cifar10(seed: int = 0, *, path: str, limit: int | None = None) -> DataBundle:
    """CIFAR-10 as ``(3, 32, 32)`` images scaled to [0, 1], then globally standardised.

    ``test_batch`` is the fixed test split; a stratified tenth of the training batches is held
    out for validation.

    Args:
        seed: validation split seed (and the subsample's, with ``limit``).
        path: the ``cifar-10-batches-py`` folder.
        limit: keep a seeded random subset of this many training images (test set unchanged).

    Raises:
        DataError: the folder or a batch is missing, truncated or not a CIFAR-10 batch.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; expected the cifar-10-batches-py folder "
                        f"holding {', '.join(_TRAIN)} and {_TEST}")
    missing = [n for n in (*_TRAIN, _TEST) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; expected the "
                        f"cifar-10-batches-py folder holding {', '.join(_TRAIN)} and {_TEST}")
    if limit is not None and limit < 1:
        raise ConfigError(f"dataset 'cifar10' limit must be >= 1, got {limit}")
    batches = [read_batch(folder / n) for n in _TRAIN]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    x_test, y_test = read_batch(folder / _TEST)
    if limit is not None and limit < len(y):
        keep = np.sort(np.random.default_rng([seed, 1]).choice(len(y), limit, replace=False))
        x, y = x[keep], y[keep]

    def scale(a: np.ndarray) -> np.ndarray:
        out = a.astype(np.float32)
        out /= 255.0
        return out

    return make_bundle("cifar10", scale(x), y, task="classification", seed=seed,
                       input_shape=(3, 32, 32), standardize="global",
                       test=(scale(x_test), y_test),
                       meta={"source": str(folder), "limit": limit})
