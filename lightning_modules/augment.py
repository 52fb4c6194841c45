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

    def draw(self, b: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The random numbers of one batch of b images like x: uniform [b, 4] for the affine
        map, and [b, 2, h, w] for the elastic field (None without it)."""
        g = self._gen(x.device)
        u = torch.rand(b, 4, generator=g, device=x.device, dtype=x.dtype) * 2 - 1
        if self.alpha <= 0:
            return u, None
        h, w = x.shape[-2:]
        return u, torch.rand(b, 2, h, w, generator=g, device=x.device, dtype=x.dtype) * 2 - 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u, d = self.draw(x.shape[0], x)
        return warp(x, u, d, math.radians(self.rotate), self.translate, self.scale, self.alpha,
                    self.sigma)


Strength = float | torch.Tensor  # one value for the batch, or one per image ([b])


def warp(x: torch.Tensor, u: torch.Tensor, d: torch.Tensor | None, rotate: Strength,
         translate: Strength, scale: Strength, alpha: Strength, sigma: float) -> torch.Tensor:
    """Apply the affine maps drawn as u (and the elastic fields d) to x [b, c, h, w]; rotate in
    radians."""
    grid = affine_grid(x, u, rotate, translate, scale)
    if d is not None:
        grid = grid + elastic_field(d, alpha, sigma, x)
    return sample(x, grid)


def affine_grid(x: torch.Tensor, u: torch.Tensor, rotate: Strength, translate: Strength,
                scale: Strength) -> torch.Tensor:
    b, _, h, w = x.shape
    angle = u[:, 0] * rotate
    zoom = 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of f of the image is 2f
    # there.
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * 2 * translate], 1),
                         torch.stack([sin, cos, u[:, 3] * 2 * translate], 1)], 1)
    return F.affine_grid(theta, [b, 1, h, w], align_corners=False)


def elastic_field(d: torch.Tensor, alpha: Strength, sigma: float,
                  x: torch.Tensor) -> torch.Tensor:
    """Uniform noise d [b, 2, h, w] -> displacement [b, h, w, 2] in grid units."""
    h, w = d.shape[-2:]
    # Separable Gaussian blur (zero padding) of both displacement channels, as two small
    # matmuls: the same numbers as two 1-D convolutions, and the elastic part of a batch 3.2x
    # cheaper on a 2-core CPU (scripts/bench_augment.py).
    d = _blur(h, sigma, x) @ d @ _blur(w, sigma, x).T
    a = alpha if isinstance(alpha, float | int) else alpha.view(-1, 1, 1, 1)
    # pixels -> grid units ([-1, 1] spans the image)
    d = d * a * _units(h, w, x)
    return d.permute(0, 2, 3, 1)


def sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    # Pad with each image's background (its darkest value after normalization), not 0.
    bg = x.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + bg


def strengths(augments: list[BatchAugment], like: torch.Tensor) -> torch.Tensor:
    """[N, 4]: each member's rotate (radians), translate, scale and elastic alpha, on like's
    device. Made once per population (and after members stop), not per step: building a
    device tensor from Python numbers waits for the GPU."""
    return torch.tensor([[math.radians(a.rotate), a.translate, a.scale, a.alpha]
                         for a in augments], device=like.device, dtype=like.dtype)


def warp_members(augments: list[BatchAugment], x: torch.Tensor,
                 strength: torch.Tensor | None = None) -> torch.Tensor:
    """Population: x [N, B, c, h, w], member i augmented by augments[i] (its own generator and
    strength, the draws its solo trial makes) in one batched warp. Members share sigma.
    strength: `strengths(augments, x)`, made once by the caller."""
    n, b = x.shape[:2]
    if strength is None:
        strength = strengths(augments, x)
    assert strength.shape[0] == len(augments) == n, "one strength row per member"
    draws = [a.draw(b, x[i]) for i, a in enumerate(augments)]
    u = torch.cat([u for u, _ in draws])
    d = None
    if any(d is not None for _, d in draws):  # a member without elastic (alpha 0) adds 0
        d = torch.cat([torch.zeros(b, 2, *x.shape[-2:], device=x.device, dtype=x.dtype)
                       if d is None else d for _, d in draws])
    per_image = strength.repeat_interleave(b, dim=0)  # [N * B, 4]
    out = warp(x.reshape(n * b, *x.shape[2:]), u, d, per_image[:, 0], per_image[:, 1],
               per_image[:, 2], per_image[:, 3], augments[0].sigma)
    return out.view(x.shape)


_BLURS: dict[tuple[int, float, torch.device, torch.dtype], torch.Tensor] = {}
_UNITS: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}


def _units(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """Pixels -> grid units per displacement channel, [1, 2, 1, 1]; cached per device (made
    from Python numbers, it would wait for the GPU on every batch)."""
    key = (h, w, like.device, like.dtype)
    if key not in _UNITS:
        _UNITS[key] = torch.tensor([2 / w, 2 / h], device=like.device,
                                   dtype=like.dtype).view(1, 2, 1, 1)
    return _UNITS[key]


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
