"""IDX parsing: plain, gzipped, torchvision layout, and every way a file can be broken."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from sweeper import idx
from sweeper.errors import UserError


def idx_bytes(a: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + \
        a.astype(np.uint8).tobytes()


def write_split(root: Path, n: int = 7, n_labels: int | None = None, gz: bool = False) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n_labels if n_labels is not None else n, dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for name, a in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        data = idx_bytes(a)
        (root / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip(tmp_path, gz):
    a = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    p = tmp_path / ("x.gz" if gz else "x")
    p.write_bytes(gzip.compress(idx_bytes(a)) if gz else idx_bytes(a))
    np.testing.assert_array_equal(idx.read_idx(p), a)


def test_torchvision_layout_is_found(tmp_path):
    write_split(tmp_path / "MNIST" / "raw", n=5, gz=True)
    images, labels = idx.load_split(tmp_path, "train")
    assert images.shape == (5, 28, 28) and labels.shape == (5,) and labels.dtype == np.int64


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"\x00\x00\x09\x03" + b[4:], "wrong magic number"),
    (lambda b: b[:-10], "truncated"),
    (lambda b: b + b"\x00" * 3, "trailing bytes"),
    (lambda b: b[:2], "too short"),
])
def test_corrupt_files_are_named_with_the_problem(tmp_path, damage, message):
    write_split(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(UserError, match=message) as e:
        idx.load_split(tmp_path, "train")
    assert str(p) in str(e.value)


def test_truncated_gzip(tmp_path):
    write_split(tmp_path, gz=True)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt or truncated"):
        idx.load_split(tmp_path, "train")


def test_count_mismatch(tmp_path):
    write_split(tmp_path, n=7, n_labels=6)
    with pytest.raises(UserError, match="7 images but 6 labels"):
        idx.load_split(tmp_path, "train")


def test_missing_file(tmp_path):
    write_split(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match="no train-labels IDX file"):
        idx.load_split(tmp_path, "train")


def test_real_mnist(mnist_root):
    images, labels = idx.load_split(mnist_root, "train")
    assert images.shape == (60_000, 28, 28)
    assert np.bincount(labels).tolist()[:2] == [5923, 6742]  # the published class counts
