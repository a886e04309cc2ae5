"""cifar10: tiny batches in the real pickle format; tampered pickles never run code."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from nnarena.data import load
from nnarena.data.cifar10 import read_batch
from nnarena.errors import ConfigError, DataError

N_BATCH, N_TEST = 20, 10


class Py2Pickler(pickle._Pickler):  # type: ignore[misc]
    """Writes str and bytes the way Python 2's cPickle wrote ``str`` (SHORT_BINSTRING)."""

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def save_binstring(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_binstring
    dispatch[str] = save_binstring


def batch(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return data, [int(v) for v in (np.arange(n) + seed) % 10]


def py2_pickle(obj: Any) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # Python 2 numpy named the module numpy.core.multiarray.
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        data, labels = batch(N_BATCH, i)
        obj = {b"batch_label": b"training batch %d of 5" % i, b"data": data, b"labels": labels,
               b"filenames": [b"x.png"] * N_BATCH}
        # batch 1 as Python 2 wrote it; the others as Python 3 with protocol 2.
        raw = py2_pickle(obj) if i == 1 else pickle.dumps(obj, protocol=2)
        (folder / f"data_batch_{i}").write_bytes(raw)
    data, labels = batch(N_TEST, 0)
    data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 100, 250  # R < G < B
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": data, b"labels": labels}, protocol=2))
    return folder


def test_loads(cifar_dir: Path) -> None:
    b = load(f"cifar10:{cifar_dir}", seed=0)
    assert b.input_shape == (3, 32, 32) and b.n_classes == 10
    assert len(b.train) + len(b.val) == 5 * N_BATCH and len(b.test) == N_TEST
    assert b.train.x.shape[1:] == (3, 32, 32) and b.train.x.dtype == torch.float32
    assert b.train.y.dtype == torch.int64
    np.testing.assert_array_equal(b.test.y.numpy(), batch(N_TEST, 0)[1])
    # Rows are channel-major: the first 1024 bytes are the red plane.
    r, g, bl = (b.test.x[0, c] for c in range(3))
    assert torch.all(r == r[0, 0]) and float(r[0, 0]) < float(g[0, 0]) < float(bl[0, 0])
    assert abs(float(b.train.x.mean())) < 1e-4 and abs(float(b.train.x.std()) - 1) < 1e-3
    again, other = load(f"cifar10:{cifar_dir}", seed=0), load(f"cifar10:{cifar_dir}", seed=1)
    assert torch.equal(b.train.x, again.train.x)
    assert not torch.equal(b.train.x, other.train.x)


def test_python2_batch_reads_like_python3(cifar_dir: Path) -> None:
    raw = (cifar_dir / "data_batch_1").read_bytes()
    assert b"_codecs" not in raw and b"numpy.core.multiarray" in raw
    data, labels = read_batch(cifar_dir / "data_batch_1")
    ref_data, ref_labels = batch(N_BATCH, 1)
    np.testing.assert_array_equal(data, ref_data)
    np.testing.assert_array_equal(labels, ref_labels)


def test_limit(cifar_dir: Path) -> None:
    b = load(f"cifar10:{cifar_dir}", limit=30)
    assert len(b.train) + len(b.val) == 30 and len(b.test) == N_TEST
    with pytest.raises(ConfigError, match="limit"):
        load(f"cifar10:{cifar_dir}", limit=0)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


def test_forbidden_global_is_refused_not_run(cifar_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = cifar_dir / "data_batch_3"
    path.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=re.escape(str(path)) + r": refusing to unpickle "
                       r"global '(os|posix)\.system'"):
        load(f"cifar10:{cifar_dir}")
    assert not marker.exists()


def test_forbidden_builtin_eval(tmp_path: Path) -> None:
    path = tmp_path / "evil"
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(DataError, match=r"builtins\.eval"):
        read_batch(path)


def test_codecs_other_than_latin1_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x06\x00\x00\x00base64\x86R.")
    with pytest.raises(DataError, match="base64"):
        read_batch(path)


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
def test_damaged_file(cifar_dir: Path, damage: str) -> None:
    path = cifar_dir / "data_batch_2"
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[: len(raw) // 2], "garble": bytes(range(256)) * 4,
                      "empty": b""}[damage])
    with pytest.raises(DataError, match=re.escape(str(path)) + r": cannot unpickle.*CIFAR-10"):
        load(f"cifar10:{cifar_dir}")


@pytest.mark.parametrize(("obj", "says"), [
    ([1, 2, 3], "not a dict"),
    ({b"labels": [0]}, "'data' is NoneType"),
    ({b"data": np.zeros((2, 3072), np.float64), b"labels": [0, 1]}, "'data' is float64"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"'data' is uint8 \(2, 100\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}, "labels outside 0-9"),
])
def test_wrong_structure(tmp_path: Path, obj: Any, says: str) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match=re.escape(str(path)) + ": .*" + says):
        read_batch(path)


def test_missing_folder_and_file(cifar_dir: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(cifar_dir / "x")) + ": no such folder"):
        load(f"cifar10:{cifar_dir / 'x'}")
    (cifar_dir / "test_batch").unlink()
    with pytest.raises(DataError, match=re.escape(str(cifar_dir)) + ": missing test_batch"):
        load(f"cifar10:{cifar_dir}")
