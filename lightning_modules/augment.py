"""Batched data augmentation on the training device: one random affine map (and optionally an
elastic displacement field) per image, applied to a whole [B, C, H, W] batch with one
`grid_sample`; no per-sample CPU transforms. Training batches only: evaluation never sees it."""

import math

import torch
import torch.nn.functional as F


class BatchAugment:
    """rotate: degrees, uniform in [-rotate, rotate]; translate: fraction of the image size per
    axis; scale: zoom uniform in [1 - scale, 1 + scale]; elastic_alpha > 0 adds Simard et al.'s
    (2003) elastic distortion: a uniform random displacement field, Gaussian-smoothed with
    `elastic_sigma` pixels, scaled to `elastic_alpha` pixels. Own generator: deterministic for a
    seed and independent of the model's random stream."""

    def __init__(self, rotate: float = 10.0, translate: float = 0.1, scale: float = 0.1,
                 elastic_alpha: float = 0.0, elastic_sigma: float = 4.0, seed: int = 0):
        self.rotate, self.translate, self.scale = rotate, translate, scale
        self.alpha, self.sigma, self.seed = elastic_alpha, elastic_sigma, seed
        self.generator: torch.Generator | None = None

    def _gen(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        g = self._gen(x.device)
        u = torch.rand(b, 4, generator=g, device=x.device, dtype=x.dtype) * 2 - 1
        angle = u[:, 0] * math.radians(self.rotate)
        zoom = 1 + u[:, 1] * self.scale
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # affine_grid maps output to input coordinates in [-1, 1]: a shift of f of the image
        # is 2f there.
        theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * 2 * self.translate], 1),
                             torch.stack([sin, cos, u[:, 3] * 2 * self.translate], 1)], 1)
        grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
        if self.alpha > 0:
            grid = grid + self._elastic(b, h, w, g, x)
        # Pad with each image's background (its darkest value after normalization), not 0.
        bg = x.amin(dim=(1, 2, 3), keepdim=True)
        return F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False) + bg

    def _elastic(self, b: int, h: int, w: int, g: torch.Generator,
                 x: torch.Tensor) -> torch.Tensor:
        d = torch.rand(b, 2, h, w, generator=g, device=x.device, dtype=x.dtype) * 2 - 1
        # Separable Gaussian blur (zero padding) of both displacement channels, as two small
        # matmuls: the same numbers as two 1-D convolutions, and the elastic part of a batch
        # 3.2x cheaper on a 2-core CPU (scripts/bench_augment.py).
        d = _blur(h, self.sigma, x) @ d @ _blur(w, self.sigma, x).T
        # pixels -> grid units ([-1, 1] spans the image)
        d = d * self.alpha * torch.tensor([2 / w, 2 / h], device=x.device,
                                          dtype=x.dtype).view(1, 2, 1, 1)
        return d.permute(0, 2, 3, 1)


_BLURS: dict[tuple[int, float, torch.device, torch.dtype], torch.Tensor] = {}


def _blur(n: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """[n, n] matrix of a 1-D Gaussian blur: kernel radius 2 sigma, normalized over the whole
    kernel, zero beyond the edges."""
    key = (n, sigma, like.device, like.dtype)
    if key not in _BLURS:
        radius = max(1, int(2 * sigma))
        i = torch.arange(n, device=like.device, dtype=like.dtype)
        offset = i[None, :] - i[:, None]
        t = torch.arange(-radius, radius + 1, device=like.device, dtype=like.dtype)
        kernel = torch.exp(-offset ** 2 / (2 * sigma ** 2)) / torch.exp(
            -t ** 2 / (2 * sigma ** 2)).sum()
        _BLURS[key] = torch.where(offset.abs() <= radius, kernel, torch.zeros_like(kernel))
    return _BLURS[key]
