"""IDX files (the MNIST format): big-endian magic 0x0000TTDD (TT=0x08 for uint8, DD = number
of dimensions), one big-endian uint32 per dimension, then the raw bytes. Gzipped or not."""

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from sweeper.errors import UserError

UBYTE = 0x08
SPLITS = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read ({e}); the gzip stream is corrupt or truncated") \
            from None
    if len(raw) < 4:
        raise UserError(f"{path}: not an IDX file ({len(raw)} bytes, too short for a header)")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != UBYTE or ndim not in (1, 3):
        raise UserError(f"{path}: wrong magic number 0x{raw[:4].hex()} (expected 0x00000801 "
                        "for labels or 0x00000803 for images): not an MNIST IDX file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise UserError(f"{path}: {what}: header says {'x'.join(map(str, dims))} "
                        f"({expected} bytes) but the file has {len(raw)} bytes")
    # bytearray: a writable buffer, so torch.from_numpy can share it without a warning.
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=header).reshape(dims)


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
