"""Cost of on-device augmentation per training batch, side by side: affine maps alone, affine +
elastic with the elastic field blurred by two 1-D convolutions (the old way), and by two small
matmuls (lightning_modules/augment.py). Also checks that both blurs give the same field.

    python scripts/bench_augment.py [--batch 128] [--steps 200] [--threads 2]
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

from lightning_modules import augment
from lightning_modules.augment import BatchAugment


def conv_blur(d: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=d.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    d = F.conv2d(d, k.view(1, 1, 1, -1).expand(2, 1, 1, -1), padding=(0, radius), groups=2)
    return F.conv2d(d, k.view(1, 1, -1, 1).expand(2, 1, -1, 1), padding=(radius, 0), groups=2)


def timed(fn, x: torch.Tensor, steps: int) -> float:
    fn(x)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn(x)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand(args.batch, 1, 28, 28)
    d = torch.rand(args.batch, 2, 28, 28) * 2 - 1
    same = (conv_blur(d, 4.0) - augment._blur(28, 4.0, d) @ d @ augment._blur(28, 4.0, d).T)
    print(f"largest difference between the two blurs: {same.abs().max():.1e}")
    affine = BatchAugment(seed=0)
    elastic = BatchAugment(elastic_alpha=34.0, elastic_sigma=4.0, seed=0)
    old_aug = BatchAugment(elastic_alpha=34.0, elastic_sigma=4.0, seed=0)

    def old(x):  # the field as it was made before: convolution blur
        u, d = old_aug.draw(x.shape[0], x)
        assert d is not None
        h, w = x.shape[-2:]
        field = conv_blur(d, old_aug.sigma) * old_aug.alpha * torch.tensor(
            [2 / w, 2 / h], dtype=x.dtype).view(1, 2, 1, 1)
        grid = augment.affine_grid(x, u, math.radians(old_aug.rotate), old_aug.translate,
                                   old_aug.scale)
        return augment.sample(x, grid + field.permute(0, 2, 3, 1))

    rows = []
    for _ in range(3):  # interleaved rounds: this machine's speed drifts
        rows.append((timed(affine, x, args.steps), timed(old, x, args.steps),
                     timed(elastic, x, args.steps)))
    med = [sorted(r[i] for r in rows)[1] for i in range(3)]
    print(f"ms per batch of {args.batch} (median of 3 rounds, {args.threads} threads): "
          f"affine {med[0]:.2f} | affine + elastic, conv blur {med[1]:.2f} | "
          f"affine + elastic, matmul blur {med[2]:.2f}")
    print(f"elastic part: conv {med[1] - med[0]:.2f} ms, matmul {med[2] - med[0]:.2f} ms "
          f"({(med[1] - med[0]) / max(med[2] - med[0], 1e-9):.1f}x cheaper)")


if __name__ == "__main__":
    main()
