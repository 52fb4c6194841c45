"""The gap's trend with size, trained the plain way: the reference for depth_vs_width's gap
sentence. Plain PyTorch (no Lightning, no Optuna): MLPs of the default design's sizes (20k-1M
parameters, depth 1 and 2, the width that gives the size), Adam at a constant lr 1e-3, batch 128,
no dropout, 15 epochs, on the study's own 50k/10k split (seed 0); train accuracy in eval mode on
the same fixed 10,000-image train subset the study uses. Prints train, validation and gap per
network, and per depth the gap's change from the smallest to the largest and where it peaks.

    python scripts/plain_gap.py --root ../shared/data/mnist
    python scripts/plain_gap.py --root ../shared/data/mnist --epochs 8 --sizes 20000,1000000
"""

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from lightning_modules.models import Architecture, build_model
from sweeper.settings.config import DataConfig
from sweeper.train import data
from sweeper.train.training import width_for_size


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + 5000]).argmax(1) == y[i:i + 5000]).sum())
                   for i in range(0, len(y), 5000))
    return 100.0 * hits / len(y)


def train(arch: Architecture, splits: data.Splits, epochs: int, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = build_model(arch, splits.in_shape, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    n = len(splits.y_train)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=g)
        for i in range(0, n, 128):
            j = order[i:i + 128]
            loss = F.cross_entropy(model(splits.x_train[j]), splits.y_train[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return (accuracy(model, splits.x_train_eval, splits.y_train_eval),
            accuracy(model, splits.x_val, splits.y_val))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--sizes", default="20000,50000,125000,300000,800000")
    ap.add_argument("--depths", default="1,2")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    splits = data.load_splits(DataConfig(name="mnist", root=args.root), args.seed,
                              torch.device("cpu"))
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{splits.describe()}; {args.epochs} epochs, Adam 1e-3 constant, batch 128, no dropout")
    print("depth  width  n_params  train %  val %   gap   seconds")
    for depth in (int(d) for d in args.depths.split(",")):
        gaps = []
        for size in sizes:
            arch = width_for_size(lambda w, d=depth: Architecture("mlp", (w,) * d, 0.0), size)
            n = sum(p.numel() for p in build_model(arch, (1, 28, 28), 10).parameters())
            t0 = time.perf_counter()
            tr, va = train(arch, splits, args.epochs, args.seed)
            gaps.append((n, tr - va))
            print(f"{depth:5d} {arch.hidden[0]:6d} {n:9,d} {tr:8.2f} {va:6.2f} {tr - va:+6.2f} "
                  f"{time.perf_counter() - t0:8.1f}", flush=True)
        top = max(gaps, key=lambda g: g[1])
        slope = np.polyfit([math.log10(n) for n, _ in gaps], [g for _, g in gaps], 1)[0]
        print(f"depth {depth}: gap {gaps[0][1]:+.2f} at {gaps[0][0]:,} -> {gaps[-1][1]:+.2f} at "
              f"{gaps[-1][0]:,} params ({gaps[-1][1] - gaps[0][1]:+.2f} points; straight-line "
              f"slope {slope:+.2f} per tenfold); largest gap {top[1]:+.2f} at {top[0]:,}")


if __name__ == "__main__":
    main()
