"""Accuracy of a Kaggle submission.csv against labels in the same format (ImageId,Label), e.g.
the test_labels.csv written by mnist_to_kaggle_csv.py.

    python scripts/score_submission.py export/submission.csv /tmp/kaggle/test_labels.csv
"""

import sys

import numpy as np


def main() -> None:
    sub, truth = (np.loadtxt(p, delimiter=",", skiprows=1, dtype=np.int64) for p in sys.argv[1:3])
    assert sub.shape == truth.shape and (sub[:, 0] == truth[:, 0]).all(), "ImageIds differ"
    print(f"{(sub[:, 1] == truth[:, 1]).mean():.4f} accuracy on {len(sub):,} images")


if __name__ == "__main__":
    main()
