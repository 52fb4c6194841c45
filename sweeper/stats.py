"""Rank correlation with honest uncertainty: Spearman's rho and a percentile bootstrap 95%
interval (resampling trials with replacement, seeded)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), from 1."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the ranks; nan when either side is constant or n < 3."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


@dataclass
class Correlation:
    rho: float
    low: float  # 95% bootstrap interval
    high: float
    n: int

    def __str__(self) -> str:
        if np.isnan(self.rho):
            return f"n/a (n={self.n})"
        return f"{self.rho:+.2f} [{self.low:+.2f}, {self.high:+.2f}] (n={self.n})"

    @property
    def sign(self) -> int:
        """+1 / -1 when the whole interval is on one side of 0, else 0 (no clear relation)."""
        if np.isnan(self.low) or np.isnan(self.high):
            return 0
        return 1 if self.low > 0 else -1 if self.high < 0 else 0


def correlation(x: np.ndarray, y: np.ndarray, resamples: int = 2000,
                seed: int = 0) -> Correlation:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rho = spearman(x, y)
    if np.isnan(rho):
        return Correlation(rho, float("nan"), float("nan"), len(x))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(resamples):
        i = rng.integers(0, len(x), len(x))
        r = spearman(x[i], y[i])
        if not np.isnan(r):  # a resample of one repeated trial has no ranks
            boots.append(r)
    low, high = np.percentile(boots, [2.5, 97.5]) if boots else (float("nan"),) * 2
    return Correlation(rho, float(low), float(high), len(x))
