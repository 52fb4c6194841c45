"""How well does predict read clean dark-on-light digits of varied size and position?

Takes held-out MNIST-style digits (a Kaggle-format test.csv + labels, or the embedded sample),
draws each dark on a light page at a random scale (2-10x) and position, saves it as PNG, and
reads it back through sweeper.predict's preprocessing and an exported model. Prints that
accuracy beside the model's accuracy on the original 28x28 images.

    python scripts/bench_predict.py --model export/ --test /tmp/kaggle/test.csv \
        --labels /tmp/kaggle/test_labels.csv --n 500
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sweeper import data, kaggle, predict
from sweeper.config import DataConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--test", type=Path)
    ap.add_argument("--labels", type=Path)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.test:
        images = kaggle.read_test(args.test)
        labels = np.loadtxt(args.labels, delimiter=",", skiprows=1, dtype=np.int64)[:, 1]
    else:
        ds = data.load(DataConfig(name="mnist_sample"))
        images, labels = ds.images, ds.labels
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(images), size=min(args.n, len(images)), replace=False)
    model = predict.load_model(args.model)
    ok_raw = ok_page = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in pick:
            scale = rng.uniform(2, 10)
            side = round(28 * scale)
            big = Image.fromarray(images[i]).resize((side, side), Image.Resampling.BICUBIC)
            w, h = side + rng.integers(0, 3 * side), side + rng.integers(0, 3 * side)
            page = Image.new("L", (int(w), int(h)), 255)
            page.paste(Image.fromarray(255 - np.asarray(big)),
                       (int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))))
            path = Path(tmp) / f"{i}.png"
            page.save(path)
            x = predict.to_mnist(predict.load_image(path))
            with torch.no_grad():
                pred_page = model(torch.from_numpy(x).float().div(255)[None, None]).argmax()
                pred_raw = model(torch.from_numpy(images[i]).float().div(255)[None, None]).argmax()
            ok_page += int(pred_page) == labels[i]
            ok_raw += int(pred_raw) == labels[i]
    n = len(pick)
    print(f"{n} digits: {ok_page / n:.4f} read correctly from dark-on-light pages (scale 2-10x, "
          f"random position); {ok_raw / n:.4f} on the original 28x28 images")


if __name__ == "__main__":
    main()
