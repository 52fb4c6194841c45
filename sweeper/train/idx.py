"""IDX files (the MNIST format): big-endian magic 0x0000TTDD (TT=0x08 for uint8, DD = number
of dimensions), one big-endian uint32 per dimension, then the raw bytes. Gzipped or not."""

import gzip
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from sweeper.settings.errors import UserError

UBYTE = 0x08
SPLITS = {"train": "train", "test": "t10k"}


MAX_BYTES = 1 << 30  # the largest data an IDX header may declare (MNIST's train images: 47 MB)


def read_idx(path: Path) -> np.ndarray:
    """The array, read in bounded memory: the header first, then at most the declared size and
    one byte more (a gzip bomb or a file with trailing data is refused, never inflated)."""
    try:
        with path.open("rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
            size_on_disk = path.stat().st_size
        with (gzip.open(path, "rb") if gz else path.open("rb")) as f:
            return _read(path, f, None if gz else size_on_disk)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not an IDX file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read ({e}); the gzip stream is corrupt or truncated") \
            from None


def _read(path: Path, f: io.BufferedIOBase, size_on_disk: int | None) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4:
        raise UserError(f"{path}: not an IDX file ({len(magic)} bytes, too short for a header)")
    zero, dtype, ndim = struct.unpack(">HBB", magic)
    if zero != 0 or dtype != UBYTE or ndim not in (1, 3):
        raise UserError(f"{path}: wrong magic number 0x{magic.hex()} (expected 0x00000801 "
                        "for labels or 0x00000803 for images): not an MNIST IDX file")
    shape = f.read(4 * ndim)
    if len(shape) < 4 * ndim:
        raise UserError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}I", shape)
    header, size = 4 + 4 * ndim, math.prod(dims)
    declared = f"header says {'x'.join(map(str, dims))} ({header + size} bytes)"
    if size > MAX_BYTES:
        raise UserError(f"{path}: {declared}, more than the {MAX_BYTES >> 20} MiB of data this "
                        "reader accepts: not an MNIST-family file")
    if size_on_disk is not None and size_on_disk != header + size:  # known before reading
        what = "truncated" if size_on_disk < header + size else "has trailing bytes"
        raise UserError(f"{path}: {what}: {declared} but the file has {size_on_disk} bytes")
    # bytearray: a writable buffer, so torch.from_numpy can share it without a warning.
    data = bytearray(size)
    view, got = memoryview(data), 0
    while got < size and (n := f.readinto(view[got:])):
        got += n
    if got < size:
        raise UserError(f"{path}: truncated: {declared} but the data ends after "
                        f"{header + got} bytes")
    if f.read(1):
        raise UserError(f"{path}: has trailing bytes: {declared} but the data goes on after "
                        "them")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def candidates(root: Path, split: str, kind: str) -> list[Path]:
    """Where the file for (split, kind) may live: `root/` or torchvision's `root/MNIST/raw/`,
    gzipped or not."""
    stem = f"{SPLITS[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    dirs = [root, root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    return [d / (stem + ext) for d in dirs for ext in ("", ".gz")]


def find(root: Path, split: str, kind: str) -> Path | None:
    return next((p for p in candidates(root, split, kind) if p.is_file()), None)


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] int64) of one split found under root."""
    paths = {k: find(root, split, k) for k in ("images", "labels")}
    for kind, p in paths.items():
        if p is None:
            raise UserError(f"{root}: no {SPLITS[split]}-{kind} IDX file "
                            f"(looked for {candidates(root, split, kind)[1].name} and variants)")
    images_path, labels_path = paths["images"], paths["labels"]
    assert images_path is not None and labels_path is not None
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise UserError(f"{images_path}: expected a 3-d image array, got {images.ndim}-d")
    if images.shape[1:] != (28, 28):
        raise UserError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]} pixels; "
                        "the models take 28x28 (the MNIST format)")
    if len(images) == 0:
        raise UserError(f"{images_path}: the header says 0 images")
    if labels.ndim != 1:
        raise UserError(f"{labels_path}: expected a 1-d label array, got {labels.ndim}-d")
    if len(images) != len(labels):
        raise UserError(f"{images_path.parent}: {len(images)} images but {len(labels)} labels "
                        f"({images_path.name} vs {labels_path.name})")
    if labels.size and labels.max() > 9:
        raise UserError(f"{labels_path}: label {labels.max()} out of range 0-9")
    return images, labels.astype(np.int64)


def has_split(root: Path, split: str) -> bool:
    return all(find(root, split, k) is not None for k in ("images", "labels"))
