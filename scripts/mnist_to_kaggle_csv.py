"""Kaggle Digit Recognizer-format files built from MNIST's 60,000 training images, for trying
the Kaggle path without Kaggle: train.csv (42,000 rows, label first), test.csv (the other 18,000,
no label) and test_labels.csv (ImageId,Label) to score a submission. Writes OUT only; never
commit what it writes (MNIST's licence, and the project keeps no data).

    python scripts/mnist_to_kaggle_csv.py --root ../shared/data/mnist --out /tmp/kaggle
"""

import argparse
import time
from pathlib import Path

import numpy as np

from sweeper.train import idx, kaggle


def write_csv(path: Path, header: str, table: np.ndarray) -> None:
    np.savetxt(path, table, fmt="%d", delimiter=",", header=header, comments="")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/mnist")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-rows", type=int, default=42_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    images, labels = idx.load_split(Path(args.root), "train")
    order = np.random.default_rng(args.seed).permutation(len(labels))
    tr, te = order[:args.train_rows], order[args.train_rows:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = images.reshape(len(images), -1).astype(np.int64)
    header = ",".join(kaggle.PIXELS)
    write_csv(out / "train.csv", "label," + header, np.column_stack([labels[tr], pixels[tr]]))
    write_csv(out / "test.csv", header, pixels[te])
    write_csv(out / "test_labels.csv", "ImageId,Label",
              np.column_stack([np.arange(1, len(te) + 1), labels[te]]))
    t0 = time.perf_counter()
    kaggle.read_train(out / "train.csv")
    print(f"wrote {len(tr):,} train / {len(te):,} test rows to {out}; "
          f"parsing train.csv back took {time.perf_counter() - t0:.2f}s")


if __name__ == "__main__":
    main()
