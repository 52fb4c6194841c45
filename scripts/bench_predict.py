"""How well does predict read digits from phone photos? Before and after issue 33, side by side.

Held-out digits (MNIST's t10k from --mnist, a Kaggle-format test.csv + labels, or the embedded
sample) are rendered as synthetic phone photos (sweeper.best_model.synthetic_photos: notebook lines,
a shadow, dust specks, blue pen, a small digit, perspective, vignetting, JPEG, and mixtures of all),
saved as files and read back through predict's reader; each file is prepared twice, by the
preparation before issue 33 (one background level, the bounding box of all ink: `to_mnist_before`
below) and by today's `predict.to_mnist`, and read by the exported model. Prints accuracy per
condition and strength, with the model's accuracy on the same digits as plain 28x28 images, and the
preparation's time per photo; then how often photos of two digits side by side and of an empty page
are refused rather than read as a digit.

    python scripts/bench_predict.py --model export/ --mnist /work/shared/data/mnist --n 100

The embedded sample's digits are MNIST *training* digits: a model trained on full MNIST has
seen them, so use --mnist (t10k) or --test for such a model.
"""

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sweeper.best_model import predict
from sweeper.best_model import synthetic_photos as sp
from sweeper.settings.config import DataConfig
from sweeper.settings.errors import UserError
from sweeper.train import data, idx, kaggle


def to_mnist_before(grey: np.ndarray) -> np.ndarray:
    """predict.to_mnist before issue 33 (its MNIST framing, unchanged, is shared): the
    background is one number (the border's median), everything darker is ink, the crop is the
    bounding box of all ink."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    darker, lighter = background - grey, grey - background
    ink = darker if darker.max() > lighter.max() else lighter
    contrast = float(ink.max())
    if contrast < 0.03:
        raise UserError("blank image: no ink found (nothing differs from the background)")
    return predict.mnist_framing(np.clip(ink / contrast, 0, 1))  # the framing: unchanged


def digits(args) -> tuple[np.ndarray, np.ndarray, str]:
    if args.mnist:
        images, labels = idx.load_split(args.mnist, "test")
        return images, labels, f"MNIST t10k ({args.mnist})"
    if args.test:
        labels = np.loadtxt(args.labels, delimiter=",", skiprows=1, dtype=np.int64)[:, 1]
        return kaggle.read_test(args.test), labels, f"Kaggle-format {args.test}"
    ds = data.load(DataConfig(name="mnist_sample"))
    return ds.images, ds.labels, "the embedded sample (MNIST training digits)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--mnist", type=Path, help="a folder with MNIST's t10k IDX files")
    ap.add_argument("--test", type=Path, help="a Kaggle-format test.csv (with --labels)")
    ap.add_argument("--labels", type=Path)
    ap.add_argument("--n", type=int, default=100,
                    help="photos per strength (3n for a condition with one strength)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="these conditions only")
    args = ap.parse_args()
    images, labels, source = digits(args)
    model = predict.load_model(args.model)
    rng = np.random.default_rng(args.seed)

    def read(batch: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(np.stack(batch)).float().div(255)[:, None]
            return model(x).argmax(1).numpy()

    print(f"digits from {source}, model {args.model}; before = the preparation before issue "
          "33, after = today's; ms = today's preparation per photo (wall time)\n")
    print("| condition | strength | photos | 28x28 | before | after | refused after | ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    totals: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for condition, levels in sp.CONDITIONS.items():
            if args.only and condition not in args.only:
                continue
            for strength in range(len(levels)):
                n = min(args.n * (3 // len(levels)), len(images))  # 3n photos per condition
                pick = rng.choice(len(images), size=n, replace=False)
                paths = sp.write_photos(images[pick], condition, strength, rng, Path(tmp))
                inputs: dict[str, list[np.ndarray]] = {"before": [], "after": []}
                kept: dict[str, list[int]] = {"before": [], "after": []}
                seconds = 0.0
                for k, path in enumerate(paths):
                    grey = predict.load_image(path)
                    for name, prepare in (("before", to_mnist_before),
                                          ("after", predict.to_mnist)):
                        start = time.perf_counter()
                        try:
                            inputs[name].append(prepare(grey))
                            kept[name].append(k)
                        except UserError:  # refused: counted as not read
                            pass
                        seconds += (time.perf_counter() - start) * (name == "after")
                    path.unlink()
                truth = labels[pick]
                right = {name: int((read(inputs[name]) == truth[kept[name]]).sum())
                         if inputs[name] else 0 for name in inputs}
                plain = float((read(list(images[pick])) == truth).mean())
                row = [plain, right["before"] / n, right["after"] / n]
                mean = totals.setdefault(condition, [0.0, 0.0, 0.0])  # over the strengths
                for k, value in enumerate(row):
                    mean[k] += value / len(levels)
                what = describe(levels[strength]) if condition != "mixture" else "random"
                print(f"| {condition} | {what} | {n} | {100 * plain:.1f}% | {100 * row[1]:.1f}% "
                      f"| {100 * row[2]:.1f}% | {n - len(kept['after'])} | "
                      f"{1000 * seconds / n:.0f} |", flush=True)
    print("\n| condition | 28x28 | before | after |\n| --- | --- | --- | --- |")
    for condition, (plain, before, after) in totals.items():
        print(f"| {condition} | {100 * plain:.1f}% | {100 * before:.1f}% | {100 * after:.1f}% |")
    if not args.only:
        refusals(images, rng, 3 * args.n)


def refusals(images: np.ndarray, rng: np.random.Generator, n: int) -> None:
    """How often a photo without a single digit is refused instead of guessed: two digits side
    by side, and an empty page (both with the mixtures' random conditions)."""
    print(f"\nrefused (of {n} photos each, the mixtures' conditions):")
    for what in ("two digits side by side", "an empty page"):
        refused = {"before": 0, "after": 0}
        for _ in range(n):
            if what == "an empty page":
                digit, settings = sp.EMPTY, sp.mixture(rng)
            else:
                a, b = images[rng.choice(len(images), 2, replace=False)]
                digit, settings = sp.pair(a, b), replace(sp.mixture(rng), height=(0.25, 0.4))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / ("photo.jpg" if settings.jpeg else "photo.png")
                path.write_bytes(sp.encode(sp.render(digit, settings, rng), settings))
                grey = predict.load_image(path)
            for name, prepare in (("before", to_mnist_before), ("after", predict.to_mnist)):
                try:
                    prepare(grey)
                except UserError:
                    refused[name] += 1
        print(f"- {what}: before {refused['before']}, after {refused['after']}")


def describe(s: sp.Photo) -> str:
    """What sets this strength apart from the base photo."""
    base = sp.CONDITIONS["clean"][0] if s.height == sp.CONDITIONS["clean"][0].height else sp.BASE
    pens = {sp.BLUE_PEN: "blue pen", sp.PENCIL: "pencil", (0.30, 0.40, 0.80): "light blue pen"}
    parts = [pens.get(v, str(v)) if k == "pen" else f"{k} {v}" for k, v in vars(s).items()
             if v != getattr(base, k)]
    return ", ".join(parts) or "digit 50-70% of the height"


if __name__ == "__main__":
    main()
