"""Kaggle CSVs: the good case and every bad case, on fixtures made here from synthetic pixels."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sweeper.settings.config import DataConfig
from sweeper.settings.errors import UserError
from sweeper.train import data, kaggle

HEADER = ",".join(kaggle.PIXELS)


def write(path: Path, header: str, rows: list[list]) -> Path:
    path.write_text("\n".join([header, *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 784))


def train_file(tmp_path: Path, n: int = 6) -> tuple[Path, np.ndarray, np.ndarray]:
    px, labels = pixels(n), np.arange(n) % 10
    rows = [[int(y), *map(int, p)] for y, p in zip(labels, px, strict=True)]
    return write(tmp_path / "train.csv", "label," + HEADER, rows), px, labels


def test_train_and_test_round_trip(tmp_path):
    path, px, labels = train_file(tmp_path)
    images, got = kaggle.read_train(path)
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images.reshape(6, -1), px)
    np.testing.assert_array_equal(got, labels)
    test = write(tmp_path / "test.csv", HEADER, [list(map(int, p)) for p in pixels(3, 1)])
    np.testing.assert_array_equal(kaggle.read_test(test).reshape(3, -1), pixels(3, 1))


def test_kaggle_data_source_splits_like_the_origin_study(tmp_path):
    path, _, _ = train_file(tmp_path, n=50)
    ds = data.load(DataConfig(name="kaggle", train_csv=str(path)))
    assert ds.source == f"kaggle:csv:{path}"
    s = data.make_splits(ds, 10, 0, torch.device("cpu"))
    assert (len(s.y_train), len(s.y_val)) == (40, 10)


def _bad_train(tmp_path, header=None, rows=None):
    good = [[3, *range(0, 784)] for _ in range(3)]
    good = [[r[0], *[v % 256 for v in r[1:]]] for r in good]
    return write(tmp_path / "train.csv", header or "label," + HEADER, rows or good)


@pytest.mark.parametrize("header, rows, message", [
    ("label," + ",".join(kaggle.PIXELS[:-1]), None, "missing column(s) pixel783"),
    ("label," + HEADER + ",extra", None, "unexpected column(s) extra"),
    ("label," + ",".join([kaggle.PIXELS[1], kaggle.PIXELS[0], *kaggle.PIXELS[2:]]), None,
     "columns out of order: column 2 is 'pixel1', expected 'pixel0'"),
    (HEADER, None, "no 'label' column: this looks like test.csv"),
    (None, [[3, *[0] * 784], [4, *[0] * 783]], "line 3: 784 values, expected 785"),
    (None, [[3, *[0] * 784], [4, *[0] * 785]], "Expected 785 fields in line 3, saw 786"),
    (None, [[3, *[0] * 783, 1.5]], "line 2, column pixel783: 1.5 is not an integer"),
    (None, [[3, *[0] * 783, "x"]], "line 2, column pixel783: 'x' is not an integer"),
    (None, [[3, 256, *[0] * 783]], "line 2, column pixel0: 256 is outside 0-255"),
    (None, [[3, -1, *[0] * 783]], "line 2, column pixel0: -1 is outside 0-255"),
    (None, [[12, *[0] * 784]], "line 2: label 12 is not a digit 0-9"),
    (None, [[3, "", *[0] * 783]], "line 2, column pixel0: empty value"),
    # issue 31: before, "-1 is outside 0-255", "empty value" and "missing column(s) label, ..."
    (None, [[-1, *[0] * 784]], "line 2: label -1 is not a digit 0-9"),
    (None, [[3, "NaN", *[0] * 783]], "line 2, column pixel0: 'NaN' is not a number"),
    (",".join(["3", *["0"] * 784]), None, "the first line is data, not a header: train.csv "
     "starts with the line label,pixel0,...,pixel783"),
])
def test_bad_train_csv(tmp_path, header, rows, message):
    path = _bad_train(tmp_path, header, rows)
    with pytest.raises(UserError, match=None) as e:
        kaggle.read_train(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_label_column_in_test_csv(tmp_path):
    path, _, _ = train_file(tmp_path)
    with pytest.raises(UserError, match=r"has a .label. column: this looks like train\.csv"):
        kaggle.read_test(path)


def test_empty_and_header_only_and_missing(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="empty file"):
        kaggle.read_test(tmp_path / "empty.csv")
    write(tmp_path / "header.csv", HEADER, [])
    with pytest.raises(UserError, match="no data rows"):
        kaggle.read_test(tmp_path / "header.csv")
    with pytest.raises(UserError, match="file not found"):
        kaggle.read_train(tmp_path / "nope.csv")
