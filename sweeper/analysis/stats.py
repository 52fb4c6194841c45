"""Rank correlation with honest uncertainty: Spearman's rho (scipy) and a percentile bootstrap
95% interval (scipy.stats.bootstrap, resampling trials in pairs, seeded)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.stats


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """nan when either side is constant or n < 3."""
    if len(x) < 3:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        return float(scipy.stats.spearmanr(x, y).statistic)


def _spearman_rows(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho of each resample at once (Pearson's r of the ranks, as spearmanr
    computes it): 2,000 resamples in milliseconds instead of a second."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")  # constant resamples: nan, left out below
        return scipy.stats.pearsonr(scipy.stats.rankdata(x, axis=axis),
                                    scipy.stats.rankdata(y, axis=axis), axis=axis).statistic


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's own interval is not used (nan resamples)
        res = scipy.stats.bootstrap((x, y), _spearman_rows, paired=True, vectorized=True,
                                    n_resamples=resamples, method="percentile",
                                    rng=np.random.default_rng(seed))
    # A resample that repeats one trial has no ranks (nan): leave it out of the percentiles.
    boots = res.bootstrap_distribution
    low, high = np.nanpercentile(boots, [2.5, 97.5]) if np.isfinite(boots).any() else (
        float("nan"), float("nan"))
    return Correlation(rho, float(low), float(high), len(x))
