"""IDX parsing: plain, gzipped, torchvision layout, and every way a file can be broken."""

import gzip
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from sweeper.settings.errors import UserError
from sweeper.train import idx


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


def test_a_gzip_bomb_is_refused_in_bounded_memory(tmp_path):
    # A valid 2-image header, then 256 MB of zeros that compress to ~250 KB: before, the whole
    # stream was inflated (and copied) before the size was checked.
    p = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(p, "wb", compresslevel=1) as f:
        f.write(struct.pack(">HBBIII", 0, 8, 3, 2, 28, 28) + bytes(2 * 28 * 28))
        zeros = bytes(1 << 20)
        for _ in range(256):
            f.write(zeros)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="has trailing bytes: header says 2x28x28"):
            idx.read_idx(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("gz", [False, True])
def test_a_header_that_declares_too_much_is_refused_before_reading(tmp_path, gz):
    data = struct.pack(">HBBIII", 0, 8, 3, 4_000_000_000, 28, 28) + bytes(100)
    p = tmp_path / "x"
    p.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(UserError, match="more than the 1024 MiB of data this reader accepts"):
        idx.read_idx(p)


def test_gzipped_data_shorter_than_its_header_says(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(gzip.compress(struct.pack(">HBBIII", 0, 8, 3, 3, 28, 28) + bytes(28 * 28)))
    with pytest.raises(UserError, match=r"truncated: header says 3x28x28 .* ends after 800 bytes"):
        idx.read_idx(p)
