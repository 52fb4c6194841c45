"""Reading the user's own digits: MNIST-style preprocessing and per-file error handling."""

import numpy as np
import pytest
from PIL import Image

from sweeper import data, predict
from sweeper.config import DataConfig
from sweeper.errors import UserError


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    return data.load(DataConfig(name="mnist_sample")).images[7]  # white on black, 28x28


def save(path, array: np.ndarray, mode: str = "L"):
    Image.fromarray(array).convert(mode).save(path)
    return path


def variants(digit: np.ndarray, tmp_path):
    big = np.asarray(Image.fromarray(digit).resize((280, 280), Image.Resampling.BICUBIC))
    page = np.full((500, 700), 255, np.uint8)  # dark ink on a white page, off-centre, 10x
    page[30:310, 390:670] = 255 - big
    rgb = np.stack([digit, digit // 2, digit], axis=-1)
    return {"clean": save(tmp_path / "clean.png", digit),
            "page": save(tmp_path / "page.jpg", page),
            "rgb": save(tmp_path / "rgb.bmp", rgb, "RGB"),
            "inverted": save(tmp_path / "inverted.gif", 255 - digit)}


def test_variants_become_the_same_mnist_input(digit, tmp_path):
    files = variants(digit, tmp_path)
    prepared = {k: predict.to_mnist(predict.load_image(p)).astype(float) / 255
                for k, p in files.items()}
    clean = prepared["clean"]
    assert clean.shape == (28, 28)
    # Colour and polarity change nothing; a 10x JPEG photo of the page differs by resampling
    # and compression only (sub-pixel framing), so it gets a looser tolerance.
    for name, (max_mean, min_corr) in {"rgb": (0.005, 0.999), "inverted": (0.005, 0.999),
                                       "page": (0.08, 0.9)}.items():
        diff = np.abs(prepared[name] - clean)
        corr = np.corrcoef(prepared[name].ravel(), clean.ravel())[0, 1]
        assert diff.mean() < max_mean and corr > min_corr, (name, diff.mean(), corr)


def test_framing_follows_mnist(digit):
    out = predict.to_mnist(np.pad(digit, 40).astype(np.float32) / 255)
    rows, cols = np.nonzero(out > 0.2 * 255)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 21  # the longest side is about 20 px
    ys, xs = np.indices(out.shape)
    w = out / out.sum()
    assert abs((ys * w).sum() - 14) < 1 and abs((xs * w).sum() - 14) < 1  # centre of mass


def test_blank_image_is_an_error():
    with pytest.raises(UserError, match="blank image"):
        predict.to_mnist(np.full((50, 50), 0.8, np.float32))


def test_predict_cli_reports_each_file(tmp_path, digit, capsys, monkeypatch):
    import torch

    class Fixed(torch.nn.Module):  # stands in for an export: always "3", then "8"
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 10)
            logits[:, 3], logits[:, 8] = 5.0, 2.0
            return logits

    folder = tmp_path / "model"
    folder.mkdir()
    batch = ({0: torch.export.Dim("batch")},)
    program = torch.export.export(Fixed(), (torch.zeros(2, 1, 28, 28),), dynamic_shapes=batch)
    torch.export.save(program, str(folder / "model.pt2"))
    good = save(tmp_path / "good.png", digit)
    (tmp_path / "notes.txt").write_text("not an image")
    blank = save(tmp_path / "blank.png", np.full((40, 40), 255, np.uint8))
    rc = predict.main([str(good), str(tmp_path / "missing.png"), str(tmp_path / "notes.txt"),
                       str(blank), "--model", str(folder), "--sheet", str(tmp_path / "s.png")])
    out, err = capsys.readouterr()
    assert rc == 1
    assert f"{good}: 3 (" in out and "runner-up 8" in out
    assert "missing.png: error: file not found" in err
    assert "notes.txt: error: not a readable image" in err
    assert "blank.png: error: blank image" in err
    assert (tmp_path / "s.png").exists()
    monkeypatch.chdir(tmp_path)  # no export here: a clear error, not a traceback
    assert predict.main([str(good)]) == 2
    assert "no model" in capsys.readouterr().err
    (tmp_path / "old").mkdir()  # an export made before model.pt2: TorchScript's model.pt
    (tmp_path / "old" / "model.pt").write_bytes(b"PK")
    assert predict.main([str(good), "--model", str(tmp_path / "old")]) == 2
    assert "older TorchScript export: export it again" in capsys.readouterr().err
