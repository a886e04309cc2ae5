"""mnist-idx: tiny files in the real IDX format, gzipped or not, and every way they can be bad."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from nnarena.data import load
from nnarena.data.mnist import read_idx
from nnarena.errors import DataError

N_TRAIN, N_TEST = 100, 20


def idx_bytes(a: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x0800 + a.ndim if magic is None else magic
    return struct.pack(f">I{a.ndim}I", magic, *a.shape) + a.astype(np.uint8).tobytes()


def write(folder: Path, name: str, data: bytes, gz: bool) -> Path:
    path = folder / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, 28, 28)) ** 4 * 255).astype(np.uint8)


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """A folder with the four files, two gzipped and two not."""
    write(tmp_path, "train-images-idx3-ubyte", idx_bytes(images(N_TRAIN, 0)), gz=True)
    write(tmp_path, "train-labels-idx1-ubyte", idx_bytes(np.arange(N_TRAIN) % 10), gz=False)
    write(tmp_path, "t10k-images-idx3-ubyte", idx_bytes(images(N_TEST, 1)), gz=False)
    write(tmp_path, "t10k-labels-idx1-ubyte", idx_bytes(np.arange(N_TEST)[::-1] % 10), gz=True)
    return tmp_path


def test_loads(mnist_dir: Path) -> None:
    b = load(f"mnist-idx:{mnist_dir}", seed=0)
    assert b.input_shape == (1, 28, 28) and b.n_classes == 10 and b.task == "classification"
    assert len(b.train) + len(b.val) == N_TRAIN and len(b.val) == N_TRAIN // 10
    assert b.test.x.shape == (N_TEST, 1, 28, 28) and b.test.x.dtype == torch.float32
    # The t10k files are the test split, in file order; pixels only rescaled affinely.
    np.testing.assert_array_equal(b.test.y.numpy(), np.arange(N_TEST)[::-1] % 10)
    corr = np.corrcoef(b.test.x.numpy().ravel(), images(N_TEST, 1).ravel())[0, 1]
    assert corr > 0.99999
    assert abs(float(b.train.x.mean())) < 1e-4 and abs(float(b.train.x.std()) - 1) < 1e-3
    again, other = load(f"mnist-idx:{mnist_dir}", seed=0), load(f"mnist-idx:{mnist_dir}", seed=1)
    assert torch.equal(b.train.x, again.train.x) and torch.equal(b.val.y, again.val.y)
    assert not torch.equal(b.train.x, other.train.x)


def test_limit(mnist_dir: Path) -> None:
    b = load(f"mnist-idx:{mnist_dir}", limit="30")
    assert len(b.train) + len(b.val) == 30 and len(b.test) == N_TEST


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write(tmp_path, "x-idx3-ubyte", idx_bytes(a), gz=True)
    np.testing.assert_array_equal(read_idx(path, ndim=3), a)


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(str(missing)) + ".*no such folder.*IDX"):
        load(f"mnist-idx:{missing}")


def test_missing_file(mnist_dir: Path) -> None:
    (mnist_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=re.escape(str(mnist_dir))
                       + r": missing t10k-labels-idx1-ubyte \(.*train-images-idx3-ubyte"):
        load(f"mnist-idx:{mnist_dir}")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload(mnist_dir: Path, gz: bool) -> None:
    for old in mnist_dir.glob("t10k-images*"):
        old.unlink()
    data = idx_bytes(images(N_TEST, 1))[:-100]
    path = write(mnist_dir, "t10k-images-idx3-ubyte", data, gz=gz)
    with pytest.raises(DataError, match=re.escape(str(path)) + ": truncated IDX payload.*15680"):
        load(f"mnist-idx:{mnist_dir}")


def test_truncated_gzip_stream(mnist_dir: Path) -> None:
    path = mnist_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=re.escape(str(path)) + ": cannot read.*IDX"):
        load(f"mnist-idx:{mnist_dir}")


def test_wrong_magic(mnist_dir: Path) -> None:
    path = mnist_dir / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.arange(N_TRAIN) % 10, magic=0x00000803))
    with pytest.raises(DataError, match=re.escape(str(path)) + r": wrong magic number "
                       r"0x00000803.*0x00000801"):
        load(f"mnist-idx:{mnist_dir}")


def test_count_mismatch(mnist_dir: Path) -> None:
    path = mnist_dir / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.arange(N_TRAIN - 1) % 10))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: 100 images but "
                       r"train-labels-idx1-ubyte has 99 labels"):
        load(f"mnist-idx:{mnist_dir}")


def test_not_idx_at_all(mnist_dir: Path) -> None:
    path = mnist_dir / "train-labels-idx1-ubyte"
    path.write_bytes(b"hi")
    with pytest.raises(DataError, match=re.escape(str(path)) + ": truncated header"):
        load(f"mnist-idx:{mnist_dir}")
